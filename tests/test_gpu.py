"""CUDA checks: ``pytest -m gpu`` on a machine with a GPU (``make gpu-check`` runs them
with the benchmark). Skipped without CUDA; deselected by default.

They import only torch, hydra-core and omegaconf (no MLflow, Optuna or torch-fidelity),
so they run on a GPU machine that has just those carried in.
"""

from __future__ import annotations

import math

import pytest
import torch

from grafccsr.config import load_config

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]

CUDA = torch.device("cuda")
SMOKE = ["+exp=smoke", "tracking=none", "train.device=cuda"]
NUM_CLASSES = 2


def _step(overrides):
    from grafccsr.sizing.synthetic import synthetic_run

    return synthetic_run(load_config(SMOKE + list(overrides)), NUM_CLASSES, CUDA, seed=0)


@pytest.mark.parametrize("overrides", [
    [],
    ["train.amp.policy=generator", "train.amp.dtype=bf16"],
    ["train.amp.policy=all", "train.amp.dtype=fp16"],
    ["memory.grad_checkpoint=true", "memory.checkpoint_segment_points=512"],
    ["train.grad_accum_steps=2"],
])
def test_training_iterations_on_cuda_give_finite_losses(overrides):
    step, batch = _step(overrides)
    for it in range(3):
        d = step.d_step(batch, it)
        g = step.g_step(batch, it)
    for name, value in {**d, **g}.items():
        assert torch.isfinite(value).all(), (overrides, name, value)
        assert value.device.type == "cuda"
    assert all(p.device.type == "cuda" for p in step.generator.parameters())


def test_the_same_render_on_cpu_and_cuda():
    """Device from the config, same code: the generator's render agrees across devices."""
    from grafccsr.models import RenderSettings, build_models
    from grafccsr.models.rays import PatchSampler

    cfg = load_config(SMOKE)
    torch.manual_seed(0)
    generator, _ = build_models(cfg, NUM_CLASSES)
    grid, _ = PatchSampler(cfg.model.patch).sample(2, 0, "cpu")
    z = torch.randn(2, cfg.model.z_dim)
    labels = torch.tensor([0, 1])
    u, v, settings = torch.tensor([0.1, 0.6]), torch.tensor([0.4, 0.5]), RenderSettings.from_config(cfg)
    tf32 = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        with torch.no_grad():
            on_cpu = generator.render(z, labels, u, v, grid, settings)["rgb"]
            generator.to(CUDA)
            on_cuda = generator.render(z.to(CUDA), labels.to(CUDA), u.to(CUDA), v.to(CUDA), grid.to(CUDA),
                                       settings)["rgb"]
    finally:
        torch.backends.cuda.matmul.allow_tf32 = tf32
    torch.testing.assert_close(on_cuda.cpu(), on_cpu, atol=1e-4, rtol=1e-4)


def test_phase_peaks_are_measured_and_reset_per_phase():
    from grafccsr.measure import PhaseMemory

    step, batch = _step([])
    memory = PhaseMemory(CUDA)
    state = step.modules_and_optimizers() + (batch.images, batch.labels)
    for it in range(2):
        with memory.phase("d_step", track_live=True, state=state):
            step.d_step(batch, it)
        with memory.phase("g_step", track_live=True, state=state):
            step.g_step(batch, it)
    peaks = memory.summary()
    for phase in ("d_step", "g_step"):
        alloc = peaks[f"mem/{phase}/peak_allocated_mb"]
        assert 0 < alloc <= peaks[f"mem/{phase}/peak_reserved_mb"]
    assert peaks["mem/peak_allocated_mb"] == max(peaks["mem/d_step/peak_allocated_mb"],
                                                 peaks["mem/g_step/peak_allocated_mb"])


def test_estimator_is_within_ten_percent_of_measured_allocated():
    """The issue's calibration target, on the first configs of the CUDA grid (GRAF sizes)."""
    from grafccsr.sizing.calibrate import calibrate

    rows = calibrate(CUDA, grid="cuda", limit=3)
    for row in rows:
        assert math.isfinite(row["measured_alloc_mb"]), row
        assert abs(row["err_alloc_pct"]) <= 10.0, row


def test_max_batch_confirms_the_budget_on_cuda():
    from grafccsr.sizing.batch_finder import find_max_batch

    budget = 1024.0
    report = find_max_batch(["+exp=smoke", "tracking=none"], budget, device="cuda", cap=256, log=print)
    assert report.chosen is not None and report.chosen.source == "cuda"
    assert report.chosen.batch_size >= 1
    assert report.chosen.memory_mb <= budget


def test_bench_smoke_grid_on_cuda(tmp_path):
    from grafccsr.bench import load_grid, run_grid

    results = run_grid(load_grid("smoke"), CUDA, repeats=2, warmup=1, row_budget_s=30)
    assert [r.status for r in results] == ["ok"] * len(results)
    for r in results:
        assert r.cuda_alloc_peak_mb > 0 and math.isfinite(r.speedup_vs_ref)
