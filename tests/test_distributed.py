"""Several ranks (gloo on the CPU): equivalence with one process, sharded data, torchrun runs,
failures that end every rank alike."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from grafccsr.config import load_config
from grafccsr.data.loader import InfiniteSampler
from grafccsr.paths import PROJECT_ROOT
from grafccsr.services.local import free_port

TORCHRUN = shutil.which("torchrun") or str(Path(sys.executable).with_name("torchrun"))
EXACT = ["+exp=smoke", "tracking=none", "train.batch_size=4", "model.render.perturb=false",
         "model.render.density_noise_std=0", "model.ccsr.mode=off"]
"""No render jitter: one process and two ranks then draw the same random numbers. CCSR only where a
case names its mode: with the regulariser, accumulation alone (one process) already moves a few
near-zero gradients of the field's feature layer by 1e-7 (relative 1e-5), which RMSprop's first
steps (nearly lr x sign) turn into 6e-3 parameter differences."""


def _train_steps(rank: int, world: int, overrides, iterations: int, out: str, port: int) -> None:
    """Run ``iterations`` D+G steps on a fixed global batch (this rank's shard of it)."""
    from grafccsr.sizing.synthetic import synthetic_batch
    from grafccsr.training import distributed
    from grafccsr.training.build import build_run
    from grafccsr.training.step import Batch

    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    cfg = load_config(list(overrides))
    info = distributed.Dist(rank, world, rank)
    device = distributed.init(info, torch.device("cpu"), 120)
    step = build_run(cfg, 2, device, seed=0, dist=info)
    batch = synthetic_batch(cfg, 2, generator=torch.Generator().manual_seed(7))
    local = Batch(info.shard(batch.images), info.shard(batch.labels))
    for it in range(iterations):
        step.d_step(local, it)
        step.g_step(local, it)
    if rank == 0:
        torch.save({"generator": step.generator.state_dict(), "discriminator": step.discriminator.state_dict(),
                    "ema": step.generator_ema.state_dict()}, out)
    distributed.shutdown(together=True)


def _states(tmp_path: Path, overrides, iterations: int = 3):
    single, double = tmp_path / "single.pt", tmp_path / "double.pt"
    _train_steps(0, 1, overrides, iterations, str(single), 0)
    torch.multiprocessing.spawn(_train_steps, args=(2, overrides, iterations, str(double), free_port()), nprocs=2)
    return torch.load(single), torch.load(double)


@pytest.mark.parametrize("extra", [
    ["model.ccsr.mode=regularizer"],
    ["model.ccsr.mode=discriminator", "model.ccsr.num_layers=1", "model.ccsr.hidden_channels=8",
     "train.grad_accum_steps=2"],
    ["train.grad_accum_steps=2", "train.r1_every=2"],
])
def test_two_ranks_equal_one_process_with_the_global_batch(tmp_path, extra):
    """2 ranks x batch 2 for 3 iterations give the parameters (generator, discriminator with its
    spectral-norm vectors, EMA) of 1 process x batch 4 with the same seeds, R1 on. Tolerance:
    2e-3 absolute on any parameter after 3 RMSprop steps of lr 6e-4 / 1e-4 in float32 (the two
    sum in another order; RMSprop's first steps are nearly sign(gradient), which turns rounding
    in near-zero gradients into steps of lr)."""
    one, two = _states(tmp_path, EXACT + extra)
    for part in ("generator", "discriminator", "ema"):
        for name, value in one[part].items():
            if value.is_floating_point():
                torch.testing.assert_close(two[part][name], value, atol=2e-3, rtol=0, msg=f"{part}.{name}")


def test_each_rank_gets_a_disjoint_shard_of_each_global_batch():
    single = iter(InfiniteSampler(50, seed=3, start=8))
    ranks = [iter(InfiniteSampler(50, seed=3, start=8, rank=r, world_size=2, batch_size=4)) for r in range(2)]
    for _ in range(20):  # 20 global batches, across epochs
        whole = [next(single) for _ in range(8)]
        parts = [[next(it) for _ in range(4)] for it in ranks]
        assert parts[0] + parts[1] == whole
        assert not set(parts[0]) & set(parts[1]) or len(set(whole)) < 8  # disjoint within an epoch


def _env(tmp_path: Path) -> dict:
    """One thread per rank; torchrun's own log folders under the test's folder, not /tmp."""
    return {**os.environ, "OMP_NUM_THREADS": "1", "TMPDIR": str(tmp_path)}


def _torchrun(tmp_path: Path, *args: str, env=None, timeout: int = 300) -> subprocess.CompletedProcess:
    env = {**_env(tmp_path), **(env or {})}
    return subprocess.run([TORCHRUN, "--standalone", "--nproc_per_node=2", "-m", "grafccsr.train", *args],
                          cwd=PROJECT_ROOT, capture_output=True, text=True, timeout=timeout, env=env)


def _runs(uri: str):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    return [r for e in client.search_experiments() for r in client.search_runs([e.experiment_id])]


def test_torchrun_smoke_run_logs_once_and_resumes(tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    run_dir = tmp_path / "run"
    common = ["+exp=smoke", "train.device=cpu", "train.batch_size=4", f"tracking.uri={uri}",
              "tracking.system_metrics=false"]
    first = _torchrun(tmp_path, *common, "train.max_iters=3", f"hydra.run.dir={run_dir}")
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    summary = json.loads((run_dir / "metrics.json").read_text())
    assert summary["status"] == "FINISHED" and summary["iteration"] == 3
    runs = _runs(uri)
    assert len(runs) == 1 and runs[0].data.tags["world_size"] == "2"
    assert runs[0].data.params["train.batch_size"] == "4"  # the global batch
    assert [p for p in tmp_path.rglob("metrics.json") if "mlartifacts" not in p.parts] == [run_dir / "metrics.json"]
    assert len(torch.load(run_dir / "checkpoint.pt", weights_only=True)["ranks"]) == 2
    resumed = _torchrun(tmp_path, f"resume={run_dir}", "train.max_iters=5")
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    assert json.loads((run_dir / "metrics.json").read_text())["iteration"] == 5
    assert len(_runs(uri)) == 1


@pytest.mark.parametrize("fault, reason", [("oom@2:rank1", "oom"), pytest.param("error@2:rank1", "error", marks=pytest.mark.slow)])
def test_a_failing_rank_ends_every_rank_alike(tmp_path, fault, reason):
    """One rank fails at iteration 2: the job exits non-zero within seconds (torchrun exits 1
    when a worker fails) and rank 0 records FAILED with the same reason in metrics.json and
    MLflow (what the sweep driver reads); no checkpoint is half-written."""
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    run_dir = tmp_path / "run"
    start = time.perf_counter()
    result = _torchrun(tmp_path, "+exp=smoke", "train.device=cpu", "train.batch_size=4", "train.max_iters=50",
                       f"tracking.uri={uri}", f"hydra.run.dir={run_dir}", "tracking.system_metrics=false",
                       "train.dist_timeout_s=60", env={"GRAFCCSR_FAULT": fault}, timeout=180)
    assert result.returncode != 0 and time.perf_counter() - start < 120
    summary = json.loads((run_dir / "metrics.json").read_text())
    assert summary["status"] == "FAILED" and summary["reason"] == reason, summary
    assert [r.info.status for r in _runs(uri)] == ["FAILED"]
    assert not list(run_dir.rglob("*.tmp"))


@pytest.mark.slow  # long end to end; `make test-slow`
def test_sigterm_to_torchrun_checkpoints_once_and_ends_killed(tmp_path):
    import signal

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    run_dir = tmp_path / "run"
    env = _env(tmp_path)
    proc = subprocess.Popen([TORCHRUN, "--standalone", "--nproc_per_node=2", "-m", "grafccsr.train", "+exp=smoke",
                             "train.device=cpu", "train.batch_size=4", "train.max_iters=100000", "train.ckpt_every=0",
                             "train.sample_every=0", f"tracking.uri={uri}", f"hydra.run.dir={run_dir}",
                             "tracking.system_metrics=false"], cwd=PROJECT_ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        line = proc.stdout.readline()
        if "it 3/100000" in line:  # a few iterations ran
            break
    proc.send_signal(signal.SIGTERM)
    proc.communicate(timeout=120)
    summary = json.loads((run_dir / "metrics.json").read_text())
    assert summary["status"] == "KILLED" and summary["reason"] == "interrupted", summary
    state = torch.load(run_dir / "checkpoint.pt", weights_only=True)
    assert state["iteration"] == summary["iteration"] > 0 and len(state["ranks"]) == 2
    assert [r.info.status for r in _runs(uri)] == ["KILLED"]


@pytest.mark.slow  # long end to end; `make test-slow`
def test_a_job_restarted_by_torchrun_resumes_from_its_checkpoint(tmp_path):
    """A rank killed for real (SIGKILL, as the OOM killer would) under ``--max-restarts=1``:
    torchrun restarts both ranks, which resume from the run folder's checkpoint in the same
    MLflow run; a SIGTERM then ends the restarted job KILLED, past the checkpoint."""
    import signal

    import psutil

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    run_dir = tmp_path / "run"
    env = _env(tmp_path)
    proc = subprocess.Popen([TORCHRUN, "--standalone", "--nproc_per_node=2", "--max-restarts=1", "-m",
                             "grafccsr.train", "+exp=smoke", "train.device=cpu", "train.batch_size=4",
                             "train.max_iters=100000", "train.ckpt_every=4", "train.sample_every=0",
                             f"tracking.uri={uri}", f"hydra.run.dir={run_dir}", "tracking.system_metrics=false",
                             "train.dist_timeout_s=60"], cwd=PROJECT_ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    seen, killed, deadline = [], None, time.time() + 240
    try:
        while time.time() < deadline and proc.poll() is None:
            line = proc.stdout.readline()
            seen.append(line)
            if killed is None and "(iteration 4)" in line:  # the first checkpoint is written
                workers = [p for p in psutil.Process(proc.pid).children(recursive=True)
                           if p.environ().get("RANK") == "1"]
                assert len(workers) == 1, workers
                workers[0].send_signal(signal.SIGKILL)
                killed = time.time()
            elif killed is not None and "resuming" in line:
                break
        assert killed is not None and "resuming" in seen[-1], "".join(seen[-40:])
        while time.time() < deadline and proc.poll() is None:  # the restarted job trains on
            line = proc.stdout.readline()
            seen.append(line)
            if "it 12/100000" in line:
                break
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    log = "".join(seen) + (out or "")
    before_restart = log.split("resuming iterations")[0]
    assert "another rank stopped answering" in before_restart and "Traceback" not in before_restart
    resumed_from = int(re.search(r"resuming iterations (\d+)\.\.", log).group(1))
    assert resumed_from >= 4 and resumed_from % 4 == 0  # a checkpoint's iteration
    summary = json.loads((run_dir / "metrics.json").read_text())
    assert summary["status"] == "KILLED" and summary["iteration"] >= 12, (summary, log[-3000:])
    runs = _runs(uri)
    assert len(runs) == 1 and runs[0].info.status == "KILLED"
    state = torch.load(run_dir / "checkpoint.pt", weights_only=True)
    assert state["iteration"] == summary["iteration"] and len(state["ranks"]) == 2
