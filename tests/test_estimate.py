"""The fake-tensor CUDA peak estimator, its calibration command and the batch-size finder (CPU paths)."""

from __future__ import annotations

import csv
import dataclasses
import math
import time

import pytest
import torch

from grafccsr.config import load_config
from grafccsr.cli.memory import main
from grafccsr.sizing.batch_finder import cached_estimate, find_max_batch, largest_fitting, samples_candidates
from grafccsr.sizing.calibrate import format_calibration, measure_real
from grafccsr.sizing.estimate import CATEGORIES, CudaOverhead, estimate_peak_mb

SMOKE = ["+exp=smoke", "tracking=none", "model.ccsr.mode=off"]
"""Without CCSR, so that the render's activations set the peaks these tests reason about."""


def _estimate(*overrides, render_phases=False):
    """Estimates are memoised per config (the batch finder's cache), so tests share them."""
    return cached_estimate(load_config(SMOKE + list(overrides)), 2, render_phases)


@pytest.fixture(scope="module")
def warm():
    """The plain smoke config, render phases included. The first fake-tensor run of a
    process also pays one-off imports and caches (seconds)."""
    return _estimate(render_phases=True)


BF16_CCSR = ("train.amp.policy=generator", "model.ccsr.mode=regularizer")


def test_estimate_agrees_with_real_live_tensor_measurement(warm):
    """The honest validation without a GPU: the same live-tensor count on a real CPU step
    (bf16 autocast and the CCSR regulariser; the plain config is checked by the
    calibration test)."""
    est = _estimate(*BF16_CCSR)
    real = measure_real(load_config(SMOKE + list(BF16_CCSR)), 2, torch.device("cpu"))
    assert real["live"] > 0
    assert est.live_tensor_peak_mb == pytest.approx(real["live"], rel=0.02)  # measured: 0.1 % here


def test_breakdown_adds_up_and_reports_cuda_numbers(warm):
    est = warm
    assert set(est.breakdown_mb) == set(CATEGORIES)
    assert sum(est.breakdown_mb.values()) == pytest.approx(est.live_tensor_peak_mb, rel=1e-9)
    assert est.breakdown_mb["activations"] > est.breakdown_mb["parameters"] > 0
    assert est.breakdown_mb["optimizer"] > 0 and est.breakdown_mb["ema"] > 0  # lazily created in iteration 0
    assert {p.name for p in est.phases} == {"d_step", "g_step", "sample", "eval"}
    overhead = CudaOverhead()
    assert est.estimated_allocated_mb == pytest.approx(est.live_tensor_peak_mb + overhead.workspace_mb)
    assert est.estimated_reserved_mb >= est.estimated_allocated_mb
    assert est.estimated_reserved_mb % overhead.segment_mb == 0
    assert est.run_estimated_reserved_mb >= est.estimated_reserved_mb
    text = est.table()
    assert "activations / temporaries" in text and "estimated_reserved" in text


def test_activations_grow_linearly_in_batch_and_samples(warm):
    by_batch = {2: warm.activations_mb, **{b: _estimate(f"train.batch_size={b}").activations_mb for b in (4, 8)}}
    slope = (by_batch[8] - by_batch[2]) / 6
    predicted_4 = by_batch[2] + 2 * slope
    assert by_batch[4] == pytest.approx(predicted_4, rel=0.02)  # on a line (measured: 0.1 %)
    assert by_batch[8] / by_batch[2] == pytest.approx(4.0, rel=0.05)
    s8 = warm.activations_mb  # smoke: 8 samples per ray
    s16 = _estimate("model.render.samples_per_ray=16").activations_mb
    assert 1.8 <= s16 / s8 <= 2.1  # doubling samples per ray ~doubles activations (measured 1.99)


def test_bf16_generator_autocast_lowers_activations(warm):
    fp32 = _estimate("model.ccsr.mode=regularizer").activations_mb
    bf16 = _estimate(*BF16_CCSR).activations_mb
    assert bf16 < 0.85 * fp32  # the MLP activations halve, compositing and the CCSR stay fp32


def test_estimate_peak_mb_picks_the_requested_number(warm, monkeypatch):
    import grafccsr.sizing.estimate as estimate_module

    monkeypatch.setattr(estimate_module, "estimate_overrides", lambda *a, **k: warm)
    # what metrics.json reports as peak_memory_mb: CUDA reserved over the run / CPU live tensors of D+G steps
    assert estimate_peak_mb(SMOKE + ["train.device=cuda"]) == warm.run_estimated_reserved_mb
    assert estimate_peak_mb(SMOKE + ["train.device=cpu"]) == warm.live_tensor_peak_mb
    assert estimate_peak_mb(SMOKE, measure="allocated", phases="all") == warm.run_estimated_allocated_mb


def test_estimate_cli_is_fast_and_prints_the_table(warm, capsys):
    t0 = time.perf_counter()
    assert main(["estimate", *SMOKE, "--train-only"]) == 0
    assert time.perf_counter() - t0 < 10.0  # smoke-sized, after the process's first fake run
    out = capsys.readouterr().out
    assert "optimiser state" in out and "estimated_allocated" in out
    assert f"{warm.live_tensor_peak_mb:>11.3f}" in out


def test_calibrate_cpu_path_writes_an_error_table(warm, tmp_path, capsys):
    """CPU calibration: "measured" = live tensor bytes of a real step (plain smoke config)."""
    out = tmp_path / "calibration.csv"
    assert main(["calibrate", "--device", "cpu", "--limit", "1", "--out", str(out)]) == 0
    assert "live-tensor agreement" in capsys.readouterr().out
    with out.open() as fh:
        (row,) = list(csv.DictReader(fh))
    assert float(row["est_live_mb"]) == pytest.approx(float(row["measured_live_mb"]), rel=0.02)
    assert abs(float(row["err_live_pct"])) < 2.0
    assert math.isnan(float(row["measured_alloc_mb"]))  # CUDA numbers need --device cuda
    assert "fitted" not in format_calibration([{k: float(v) if k != "config" else v for k, v in row.items()}],
                                              torch.device("cpu"))


# --------------------------------------------------------------------------- batch finder


@pytest.mark.parametrize("step", [1, 2, 3])
def test_largest_fitting_matches_brute_force(step):
    def memory(b):
        return 10 + 3 * b + 0.01 * b * b

    for budget in (9.0, 40.0, 333.0, 5000.0):
        result = largest_fitting(memory, budget, step=step, cap=512, start=8)
        brute = max((b for b in range(step, 513, step) if memory(b) <= budget), default=None)
        assert result.best == brute
        assert len(result.trials) <= 16


def test_largest_fitting_treats_oom_as_not_fitting():
    result = largest_fitting(lambda b: math.inf if b > 37 else float(b), 100.0, step=1, cap=256, start=64)
    assert result.best == 37


def test_samples_candidates():
    assert samples_candidates(64) == [64, 48, 32, 24, 16]
    assert samples_candidates(8) == [8, 6, 4]


def test_max_batch_cpu_path(warm, capsys):
    budget = _estimate("train.batch_size=4").live_tensor_peak_mb  # exactly the estimate at batch 4
    report = find_max_batch(SMOKE, budget, measure="live", cap=16)
    choice = report.chosen
    assert choice is not None and choice.batch_size == 4 and choice.source == "estimate"
    assert choice.trials[5] > budget and choice.trials[4] == budget
    assert report.override_line(SMOKE) == " ".join(SMOKE + ["train.batch_size=4"])
    # smoke's sample/eval render batch (16 whole 32x32 images) needs more than the training step: warned
    assert report.render_phase_mb > budget and "memory.render_chunk" in report.notes[0]
    assert main(["max-batch", *SMOKE, "--budget-mb", str(budget), "--measure", "live", "--cap", "16"]) == 0
    out = capsys.readouterr().out  # the same configs again: served from the estimate cache
    assert out.rstrip().endswith("override line: " + " ".join(SMOKE + ["train.batch_size=4"]))


# --------------------------------------------------------------------------- what the estimates showed


def test_checkpointing_in_segments_lowers_the_g_step_peak():
    """Checkpointing the whole field as one segment recomputes all of it at once in
    backward and lowers no peak; segments of rays do (the estimator found this), and
    smaller segments lower it further."""
    def g_peak(*overrides):
        return measure_real(load_config(SMOKE + list(overrides)), 2, torch.device("cpu"), iterations=1,
                            phases=("g_step",))["live"]

    plain = g_peak()
    # smoke renders 2 x 256 x 8 = 4096 points
    one_segment = g_peak("memory.grad_checkpoint=true", "memory.checkpoint_segment_points=4096")
    segments_1024 = g_peak("memory.grad_checkpoint=true", "memory.checkpoint_segment_points=1024")
    segments_256 = g_peak("memory.grad_checkpoint=true", "memory.checkpoint_segment_points=256")
    assert one_segment > 0.9 * plain
    assert segments_1024 < 0.5 * plain
    assert segments_256 < segments_1024


def test_segmented_rendering_gives_the_same_result():
    import grafccsr.models.render as render
    from grafccsr.models.field import RadianceField

    cfg = load_config(SMOKE)
    torch.manual_seed(0)
    field = RadianceField(cfg.model.field)
    origins, directions = torch.randn(2, 40, 3), torch.randn(2, 40, 3)
    z_shape, z_app = torch.randn(2, 8, requires_grad=True), torch.randn(2, 8, requires_grad=True)
    base = dataclasses.replace(render.RenderSettings.from_config(cfg), near=1.0, far=2.0, samples_per_ray=8,
                               grad_checkpoint=False)
    whole = render.render_rays(field, origins, directions, z_shape, z_app, base)["rgb"]
    whole.square().sum().backward()
    grads = [p.grad.clone() for p in field.parameters()]
    field.zero_grad(set_to_none=True)
    with torch.no_grad():
        torch.testing.assert_close(render.render_rays(field, origins, directions, z_shape, z_app,
                                                      dataclasses.replace(base, no_grad_segment_points=100))["rgb"], whole)
    segmented = render.render_rays(field, origins, directions, z_shape, z_app,
                                   dataclasses.replace(base, grad_checkpoint=True, checkpoint_segment_points=100))["rgb"]
    torch.testing.assert_close(segmented, whole)
    segmented.square().sum().backward()
    for a, b in zip(grads, (p.grad for p in field.parameters())):
        torch.testing.assert_close(b, a)


def test_peak_rss_resets_and_rss_command_reports_iterations(tmp_path, capsys):
    """`python -m grafccsr.memory rss`: per-iteration seconds and the peak RSS above
    the baseline, the high-water mark reset before the first iteration."""
    import json

    from grafccsr.cli.memory import main
    from grafccsr.measure.process import peak_rss_mb, process_memory_supported, reset_peak_rss, rss_mb

    if not process_memory_supported():
        pytest.skip("needs Linux /proc/self/clear_refs")
    big = torch.ones(64 * 2**20)  # 256 MB resident
    del big
    assert peak_rss_mb() > rss_mb() + 100  # the high-water mark remembers it
    reset_peak_rss()
    assert peak_rss_mb() < rss_mb() + 50

    out = tmp_path / "rss.json"
    assert main(["rss", "+exp=smoke", "--iterations", "2", "--json", str(out)]) == 0
    result = json.loads(out.read_text())
    assert len(result["iteration_s"]) == 2 and all(s > 0 for s in result["iteration_s"])
    assert result["peak_rss_above_baseline_mb"] >= 0 and result["baseline_rss_mb"] > 0
    assert "peak RSS above baseline" in capsys.readouterr().out


def test_the_estimate_of_one_rank_refuses_a_batch_training_refuses():
    """Per rank, batch 4 over 2 ranks is 2 images: 4 accumulation steps cannot split it."""
    from grafccsr.config import ConfigError
    from grafccsr.sizing.estimate import estimate

    cfg = load_config(["+exp=smoke", "train.batch_size=4", "train.grad_accum_steps=4"])
    with pytest.raises(ConfigError, match="2 per rank, not divisible by train.grad_accum_steps=4"):
        estimate(cfg, 2, world_size=2)
