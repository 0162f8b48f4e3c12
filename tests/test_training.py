"""The training step and loop: memory toggles, accumulation, resume, failures, tracking."""

import copy
import json
import subprocess
import sys

import pytest
import torch

from grafccsr.config import load_config
from grafccsr.paths import PROJECT_ROOT
from grafccsr.data import build_dataset
from grafccsr.measure import PhaseMemory
from grafccsr.tracking.base import Tracker
from grafccsr.training.build import build_run
from grafccsr.training.faults import FAULT_ENV
from grafccsr.training.loop import train
from grafccsr.training.outcome import EXIT_NONFINITE, EXIT_OOM
from grafccsr.training.step import Batch

SMOKE = ["+exp=smoke", "tracking=none"]


class RecordingTracker(Tracker):
    def __init__(self):
        self.metrics, self.tags, self.params, self.status = {}, {}, {}, None
        self.run_id = "recorded"

    def __call__(self, *args, **kwargs):  # used as the tracker factory
        return self

    def log_params(self, params):
        self.params.update(params)

    def set_tags(self, tags):
        self.tags.update(tags)

    def log_metrics(self, metrics, step):
        for k, v in metrics.items():
            self.metrics.setdefault(k, {})[step] = v

    def end(self, status):
        self.status = status


def make_step(overrides=(), seed=0):
    cfg = load_config(SMOKE + list(overrides))
    dataset = build_dataset(cfg.data, cfg.camera)
    step = build_run(cfg, dataset.num_classes, "cpu", seed=seed)
    idx = torch.arange(cfg.train.batch_size) * 7 % len(dataset)
    batch = Batch(dataset.images[idx].float() / 127.5 - 1, dataset.labels[idx])
    return cfg, step, batch


def test_set_to_none_toggle():
    _, step, batch = make_step(["memory.set_to_none=true"])
    step.d_step(batch, 0)
    step.opt_d.zero_grad(set_to_none=step.cfg.memory.set_to_none)
    assert all(p.grad is None for p in step.discriminator.parameters())
    _, step, batch = make_step(["memory.set_to_none=false"])
    step.d_step(batch, 0)
    step.d_step(batch, 1)  # the second zero_grad keeps zero-filled buffers
    step.opt_d.zero_grad(set_to_none=step.cfg.memory.set_to_none)
    grads = [p.grad for p in step.discriminator.parameters()]
    assert all(g is not None and torch.count_nonzero(g) == 0 for g in grads)


@pytest.mark.parametrize("phase", ["d_step", "g_step"])
def test_grad_accumulation_matches_full_batch(phase):
    # Deterministic inputs (no jitter or density noise, no power iteration) so the
    # two runs see the same maths; only the micro-batching differs. Gradients are
    # compared (RMSprop's first step is nearly sign(grad), which would amplify
    # float rounding in near-zero entries).
    common = ["train.batch_size=4", "model.render.perturb=false", "model.render.density_noise_std=0",
              "model.discriminator.spectral_norm=false"]
    grads = []
    for accum in (1, 2):
        _, step, batch = make_step(common + [f"train.grad_accum_steps={accum}"])
        getattr(step, phase)(batch, 0)
        module = step.discriminator if phase == "d_step" else step.generator
        grads.append(torch.cat([p.grad.flatten() for p in module.parameters() if p.grad is not None]))
    assert grads[0].abs().sum() > 0
    torch.testing.assert_close(grads[1], grads[0], rtol=1e-4, atol=1e-6)


def _live_peak(overrides, phase="g_step"):
    _, step, batch = make_step(overrides)
    memory = PhaseMemory(torch.device("cpu"))
    with memory.phase(phase, track_live=True, state=step.modules_and_optimizers() + (batch.images,)):
        getattr(step, phase)(batch, 0)
    return memory.summary()[f"mem/{phase}/peak_live_tensors_mb"]


def test_live_peak_grows_with_batch_size():
    small = _live_peak(["train.batch_size=2"])
    large = _live_peak(["train.batch_size=8"])
    assert large > 2.0 * small


def test_live_peak_shrinks_with_bf16_autocast():
    overrides = ["train.batch_size=2", "model.render.samples_per_ray=32", "model.field.width=128"]
    fp32 = _live_peak(overrides)
    bf16 = _live_peak(overrides + ["train.amp.policy=generator", "train.amp.dtype=bf16"])
    assert bf16 < 0.8 * fp32  # measured ~0.67 here: the MLP activations halve, compositing stays fp32


def test_fakes_without_graph_lowers_d_step_peak():
    with_graph = _live_peak(["memory.fakes_without_graph=false", "memory.eager_free=false"], "d_step")
    without = _live_peak(["memory.fakes_without_graph=true"], "d_step")
    assert without < with_graph


def test_ccsr_no_grad_stops_ccsr_learning():
    for no_grad, learns in ((False, True), (True, False)):
        _, step, batch = make_step(["model.ccsr.mode=regularizer", f"memory.ccsr_no_grad={no_grad}"])
        codes = step.generator.ccsr.codes.detach().clone()
        step.g_step(batch, 0)
        moved = not torch.equal(codes, step.generator.ccsr.codes.detach())
        assert moved == learns


def _run(tmp_path, name, overrides):
    cfg = load_config(SMOKE + overrides)
    tracker = RecordingTracker()
    result = train(cfg, tmp_path / name, tracker_factory=tracker)
    return result, tracker


def test_resume_reproduces_losses(tmp_path):
    common = ["train.max_iters=4", "train.sample_every=0", "eval.at_end=false", "train.ckpt_every=2"]
    _, full = _run(tmp_path, "full", common)
    _, first = _run(tmp_path, "first", ["train.max_iters=2", "train.sample_every=0", "eval.at_end=false"])
    resumed_result, resumed = _run(tmp_path, "resumed", common + [f"resume={tmp_path / 'first'}"])
    assert resumed_result.status == "FINISHED"
    for key in ("train/loss_d", "train/loss_g"):
        assert set(resumed.metrics[key]) == {3, 4}
        for it in (3, 4):
            assert resumed.metrics[key][it] == pytest.approx(full.metrics[key][it], rel=1e-5, abs=1e-6)
        assert first.metrics[key][2] == pytest.approx(full.metrics[key][2], rel=1e-5, abs=1e-6)


def test_injected_oom_ends_failed_with_reason(tmp_path, monkeypatch):
    monkeypatch.setenv(FAULT_ENV, "oom@2")
    result, tracker = _run(tmp_path, "oom", [])
    assert (result.status, result.reason, result.exit_code) == ("FAILED", "oom", EXIT_OOM)
    summary = json.loads((tmp_path / "oom" / "metrics.json").read_text())
    assert summary["reason"] == "oom" and summary["iteration"] == 2
    assert summary["memory"]["mem/peak_live_tensors_mb"] > 0  # statistics gathered so far survive
    assert tracker.status == "FAILED" and tracker.tags["failure_reason"] == "oom"


def test_injected_nan_stops_and_keeps_last_good_checkpoint(tmp_path, monkeypatch):
    monkeypatch.setenv(FAULT_ENV, "nan@3")  # a batch of NaN images at iteration 3
    result, tracker = _run(tmp_path, "nan", ["train.ckpt_every=2", "eval.at_end=false"])
    assert (result.status, result.reason, result.exit_code) == ("FAILED", "nonfinite", EXIT_NONFINITE)
    assert "loss/d" in result.summary["message"] and "iteration 3" in result.summary["message"]
    ckpt = torch.load(tmp_path / "nan" / "checkpoint.pt", weights_only=True)
    assert ckpt["iteration"] == 2
    assert all(torch.isfinite(v).all() for v in ckpt["step"]["discriminator"].values() if v.is_floating_point())


def test_nan_skip_policy_continues(tmp_path, monkeypatch):
    monkeypatch.setenv(FAULT_ENV, "nan@1")
    result, _ = _run(tmp_path, "skip", ["train.nan_policy=skip", "eval.at_end=false"])
    assert result.status == "FINISHED" and result.summary["iteration"] == 4


def test_smoke_run_logs_metric_names_to_mlflow(tmp_path, mlflow_uri):
    run_dir = tmp_path / "run"
    out = subprocess.run(
        [sys.executable, "-m", "grafccsr.train", "+exp=smoke", "model.ccsr.mode=regularizer",
         f"tracking.uri={mlflow_uri}", f"hydra.run.dir={run_dir}"],
        capture_output=True, text=True, timeout=300, cwd=PROJECT_ROOT,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    summary = json.loads((run_dir / "metrics.json").read_text())
    assert summary["status"] == "FINISHED" and summary["mlflow_run_id"]
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=mlflow_uri)
    run = client.get_run(summary["mlflow_run_id"])
    names = set(run.data.metrics)
    for name in ("train/loss_d", "train/loss_g", "train/loss_r1", "train/loss_ccsr", "train/d_real_logit",
                 "train/lr_g", "perf/it_per_s", "perf/rays_per_s", "mem/peak_live_tensors_mb",
                 "mem/train_peak_live_tensors_mb", "mem/d_step/peak_live_tensors_mb", "mem/g_step/peak_live_tensors_mb",
                 "eval/fid_rf", "eval/kid_rf_mean", "eval/kid_rf_std", "perf/step_s", "perf/data_s"):
        assert name in names, name
    # MLflow's UI groups charts by the key's prefix, alphabetically: eval/, images/, mem/ first, and
    # nothing before them; what does not change during a run is a tag or a param, not a chart
    assert {n.split("/")[0] for n in names} <= {"eval", "mem", "perf", "train", "system"} | {
        n.split("/")[0] for n in names if n.startswith("view_")}, sorted(names)
    assert not names & {"dist/world_size", "train/global_batch"}
    assert run.data.params["train.batch_size"] == "2" and run.data.tags["world_size"] == "1"
    assert run.data.tags["exp"] == "smoke" and run.data.tags["fid_extractor"] == "random-features"
    assert run.info.status == "FINISHED"
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"metrics.json", "config.yaml", "images"} <= artifacts  # samples: MLflow images with a step slider
    assert "eval/fid" not in names  # a random-feature FID never joins the Inception series
    assert (run_dir / "checkpoint.pt").is_file()


def test_sigterm_checkpoints_and_ends_killed(tmp_path, mlflow_uri):
    import signal
    import time

    run_dir = tmp_path / "run"
    proc = subprocess.Popen(
        [sys.executable, "-m", "grafccsr.train", "+exp=smoke", "train.max_iters=100000", "train.sample_every=0",
         "train.ckpt_every=0", f"tracking.uri={mlflow_uri}", f"hydra.run.dir={run_dir}"],
        cwd=PROJECT_ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    deadline = time.time() + 120
    while not (run_dir / "config.yaml").exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.5)
    time.sleep(3.0)  # let a few iterations run
    proc.send_signal(signal.SIGTERM)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 130, stderr[-2000:]
    summary = json.loads((run_dir / "metrics.json").read_text())
    assert summary["status"] == "KILLED" and summary["reason"] == "interrupted"
    ckpt = torch.load(run_dir / "checkpoint.pt", weights_only=True)
    assert ckpt["iteration"] == summary["iteration"] > 0
    from mlflow.tracking import MlflowClient

    assert MlflowClient(tracking_uri=mlflow_uri).get_run(summary["mlflow_run_id"]).info.status == "KILLED"


@pytest.mark.parametrize("extra, every", [([], 1), (["train.amp.policy=all", "train.amp.dtype=bf16"], 1), ([], 3)])
def test_d_step_adds_grafs_r1_penalty(extra, every):
    """The D step's R1 is GRAF's penalty (an independent formula on the same real patches),
    in FP32 under AMP too, and the step's loss grows by exactly gamma * r1_every times it
    (without AMP the real forward is the same with and without R1, so the difference is the
    penalty alone); a lazy step in between adds nothing."""
    from grafccsr.sizing.synthetic import synthetic_batch
    from test_losses import graf_r1

    gamma = 10.0
    overrides = ["train.batch_size=4", f"train.r1_every={every}", *extra]
    losses, recorded, reference = {}, {}, None
    for g in (gamma, 0.0):
        cfg, step, _ = make_step(overrides + [f"train.r1_gamma={g}"])
        batch = synthetic_batch(cfg, 2, generator=torch.Generator().manual_seed(3))
        if g:  # GRAF's penalty on exactly the patches the step will draw, through D as it is now
            disc, rng = copy.deepcopy(step.discriminator), step.rng.get_state()
            reals = step.real_patches(batch.images, 0)
            step.rng.set_state(rng)
            reference = graf_r1(lambda x: disc(x, batch.labels[:, 0])[0], reals, gamma).item()
        sums = step.d_step(batch, 0)
        losses[g], recorded[g] = sums["loss/d"].item(), sums["loss/r1"].item()
        if every > 1:
            assert step.d_step(batch, 1)["loss/r1"].item() == 0.0  # lazy: no penalty on this step
    assert reference > 1e-4
    assert gamma * recorded[gamma] == pytest.approx(reference, rel=1e-5)
    if not extra:
        assert losses[gamma] - losses[0.0] == pytest.approx(every * reference, rel=2e-3)
