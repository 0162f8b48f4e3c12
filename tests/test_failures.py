"""Failures met as a user meets them: real subprocesses, real signals, a real allocation
failure, real file systems (a read-only bind mount, a folder without write permission, a full
tmpfs, a file-size limit), a tracking server that refuses connections or never answers. Each
ends with one line (no traceback), its documented exit code, and leaves nothing behind that the
run did not start, or a complete record (metrics.json, MLflow) when it did."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from grafccsr.paths import PROJECT_ROOT

SMOKE = ["+exp=smoke", "train.sample_every=0", "eval.at_end=false"]


def train(*args: str, env=None, timeout: int = 240, prefix=()) -> subprocess.CompletedProcess:
    return subprocess.run([*prefix, sys.executable, "-m", "grafccsr.train", *args], cwd=PROJECT_ROOT,
                          capture_output=True, text=True, timeout=timeout, env=env)


def mlflow_runs(uri: str):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    return [run for exp in client.search_experiments() for run in client.search_runs([exp.experiment_id])]


def one_error_line(result: subprocess.CompletedProcess) -> str:
    """The error line a user sees; asserts there is no traceback."""
    text = result.stdout + result.stderr
    assert "Traceback" not in text, text[-3000:]
    errors = [line for line in result.stderr.splitlines() if "error:" in line]
    assert len(errors) == 1, result.stderr[-3000:]
    return errors[0]


@pytest.mark.parametrize("override, expected", [
    ("+train.btach_size=2", "train.btach_size is not a config key; did you mean 'train.batch_size'?"),
    ("train.btach_size=2", "train.btach_size is not a config key; did you mean 'train.batch_size'?"),
    ("train.batch_size=eight", "train.batch_size"),
    ("model.patch.rays_per_patch=2048", "model.patch.rays_per_patch=2048 is not a perfect square"),
    ("train.device=cuda:7", "train.device"),
    ("resume=/nonexistent/run", "no checkpoint at /nonexistent/run"),
])
def test_config_errors_exit_2_and_leave_nothing(tmp_path, override, expected):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    run_dir = tmp_path / "run"
    result = train(*SMOKE, override, f"tracking.uri={uri}", f"hydra.run.dir={run_dir}", timeout=120)
    assert result.returncode == 2, result.stderr[-2000:]
    assert expected in one_error_line(result)
    assert not run_dir.exists()
    assert not (tmp_path / "mlflow.db").exists() or mlflow_runs(uri) == []


def test_cuda_without_a_gpu_is_a_config_error(tmp_path):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    result = train(*SMOKE, "train.device=cuda", "tracking=none", f"hydra.run.dir={tmp_path / 'run'}", timeout=120)
    assert result.returncode == 2
    assert "CUDA is not available" in one_error_line(result)
    assert not (tmp_path / "run").exists()


def _write_png(path: Path, size: int = 32) -> None:
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (size, size), (100, 50, 20)).save(path)


@pytest.mark.parametrize("case", ["missing", "corrupt", "dangling", "loop", "class-loop"])
def test_data_errors_exit_5_and_leave_nothing(tmp_path, case):
    """A missing folder, a corrupt image, and entries that cannot be read: a symbolic link to a
    file that is gone, one to itself, a class folder that is a link to itself. None is skipped
    silently: the run stops with the entry named."""
    root = tmp_path / "data"
    if case != "missing":
        for deg in (0, 90):
            _write_png(root / "specA" / f"0_{deg:04d}.png")
    bad = root / "specA" / "0_0180.png"
    if case == "corrupt":
        bad.write_bytes(b"\x89PNG\r\n\x1a\n not really")
    elif case == "dangling":
        bad.symlink_to(tmp_path / "gone.png")
    elif case == "loop":
        bad.symlink_to(bad)
    elif case == "class-loop":
        bad = root / "specB"
        bad.symlink_to(bad)
    run_dir = tmp_path / "run"
    result = train(*SMOKE, "data=folder", f"data.root={root}", "data.image_size=32", "tracking=none",
                   f"hydra.run.dir={run_dir}", timeout=120)
    assert result.returncode == 5, result.stderr[-2000:]
    line = one_error_line(result)
    assert ("does not exist" in line) if case == "missing" else (str(bad) in line), line
    if case in ("dangling", "loop", "class-loop"):
        assert "symbolic link" in line
    assert not run_dir.exists()


def test_real_cpu_out_of_memory_is_oom(tmp_path):
    """A real allocation failure under a 6 GB address-space limit: FAILED/oom, exit 3, the
    memory statistics gathered so far kept, no traceback."""
    run_dir = tmp_path / "run"
    result = train(*SMOKE, "model.render.samples_per_ray=50000", "memory.no_grad_segment_points=1000000000",
                   "tracking=none", f"hydra.run.dir={run_dir}", prefix=("prlimit", "--as=6442450944", "--"))
    assert result.returncode == 3, result.stderr[-2000:]
    assert "Traceback" not in result.stdout + result.stderr
    summary = json.loads((run_dir / "metrics.json").read_text())
    assert summary["status"] == "FAILED" and summary["reason"] == "oom"
    assert "can't allocate memory" in summary["message"]
    assert summary["memory"]["mem/d_step/peak_live_tensors_mb"] > 0


def _start(args, env=None) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "grafccsr.train", *args], cwd=PROJECT_ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _wait_for(proc: subprocess.Popen, text: str, timeout: float = 120.0) -> str:
    """Read the process's output until a line containing ``text``; returns what was read."""
    seen, deadline = [], time.time() + timeout
    while time.time() < deadline:
        line = proc.stdout.readline()
        if not line:
            break
        seen.append(line)
        if text in line:
            return "".join(seen)
    proc.kill()
    raise AssertionError(f"never saw {text!r}:\n" + "".join(seen)[-3000:])


@pytest.mark.parametrize("moment", ["setting up", "MLflow run"])
def test_sigterm_during_start_up_ends_cleanly(tmp_path, moment):
    """SIGTERM while the run sets up (before any MLflow run exists) or right after its MLflow
    run was created (before the first iteration): exit 130, and a run that was opened ends
    KILLED with its metrics.json; one that was not leaves nothing."""
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    run_dir = tmp_path / "run"
    proc = _start([*SMOKE, "train.max_iters=100000", f"tracking.uri={uri}", f"hydra.run.dir={run_dir}"])
    _wait_for(proc, moment)
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 130, out[-3000:]
    assert "Traceback" not in out
    runs = mlflow_runs(uri) if (tmp_path / "mlflow.db").exists() else []
    if moment == "setting up":
        assert runs == [] and not run_dir.exists()
    else:
        assert [r.info.status for r in runs] == ["KILLED"]
        summary = json.loads((run_dir / "metrics.json").read_text())
        assert summary["status"] == "KILLED" and summary["reason"] == "interrupted"


@pytest.mark.slow  # long end to end; `make test-slow`
def test_resume_reads_the_run_own_config(tmp_path):
    """``resume=FOLDER train.max_iters=N`` without the original overrides continues the same
    run (its stored config, its folder, its MLflow run); an override that changes the models'
    shapes is refused with exit 2."""
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    run_dir = tmp_path / "run"
    first = train(*SMOKE, "train.max_iters=2", f"tracking.uri={uri}", f"hydra.run.dir={run_dir}")
    assert first.returncode == 0, first.stderr[-2000:]
    resumed = train(f"resume={run_dir}", "train.max_iters=4", timeout=240)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    summary = json.loads((run_dir / "metrics.json").read_text())
    assert summary["iteration"] == 4 and summary["exp_name"] == "smoke"
    assert [r.info.status for r in mlflow_runs(uri)] == ["FINISHED"]  # the same run, continued
    assert "resuming iterations 2..4" in (run_dir / "train.log").read_text()
    refused = train(f"resume={run_dir}", "train.max_iters=6", "model.field.width=64", timeout=240)
    assert refused.returncode == 2
    assert "an override changes the model's shape" in one_error_line(refused)
    # the first command line again, with resume= (what a torchrun restart runs): its overrides
    # are already in the stored config and are skipped, the new max_iters applies
    again = train(*SMOKE, "train.max_iters=6", f"tracking.uri={uri}", f"hydra.run.dir={run_dir}",
                  f"resume={run_dir}", timeout=240)
    assert again.returncode == 0, again.stderr[-2000:]
    assert json.loads((run_dir / "metrics.json").read_text())["iteration"] == 6
    assert [r.info.status for r in mlflow_runs(uri)] == ["FINISHED"]


def test_stale_partial_checkpoint_is_removed_at_start(tmp_path):
    run_dir = tmp_path / "run"
    first = train(*SMOKE, "train.max_iters=2", "tracking=none", f"hydra.run.dir={run_dir}")
    assert first.returncode == 0
    (run_dir / "checkpoint.pt.tmp").write_bytes(b"half a checkpoint from a killed process")
    again = train(f"resume={run_dir}", "train.max_iters=3")
    assert again.returncode == 0, again.stderr[-2000:]
    assert not (run_dir / "checkpoint.pt.tmp").exists()


# --------------------------------------------------------------------------- the world around a run


def test_unreachable_tracking_server_is_one_line_exit_2(tmp_path):
    """A tracking URI where nothing listens: one line naming the URI and the cause, exit 2, no
    run folder, in seconds (it was 266 s and a traceback: MLflow's 7 retries with back-off)."""
    with socket.socket() as sock:  # a port that was free a moment ago: nothing listens there
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    run_dir = tmp_path / "run"
    start = time.monotonic()
    result = train(*SMOKE, f"tracking.uri=http://127.0.0.1:{port}", f"hydra.run.dir={run_dir}", timeout=120)
    seconds = time.monotonic() - start
    assert result.returncode == 2, result.stderr[-2000:]
    line = one_error_line(result)
    assert f"tracking.uri=http://127.0.0.1:{port}" in line and "Connection refused" in line, line
    assert not run_dir.exists()
    assert seconds < 30, seconds  # Python, torch and MLflow imports included; the check itself is immediate


def test_tracking_server_that_never_answers_is_one_line_exit_2(tmp_path):
    """A server that accepts the connection and never answers (hung): the start-up check waits
    ``tracking.request_timeout_s`` once, then one line, exit 2, nothing left."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen(16)  # the kernel completes connections; nobody ever reads or answers
        port = sock.getsockname()[1]
        run_dir = tmp_path / "run"
        start = time.monotonic()
        result = train(*SMOKE, f"tracking.uri=http://127.0.0.1:{port}", "tracking.request_timeout_s=3",
                       f"hydra.run.dir={run_dir}", timeout=120)
        seconds = time.monotonic() - start
    assert result.returncode == 2, result.stderr[-2000:]
    line = one_error_line(result)
    assert f"tracking.uri=http://127.0.0.1:{port}" in line and "no answer" in line, line
    assert not run_dir.exists()
    assert 3 <= seconds < 40, seconds


@contextlib.contextmanager
def read_only_folder(folder: Path):
    """``folder`` as a real read-only file system: a read-only bind mount (needs root)."""
    folder.mkdir(parents=True, exist_ok=True)
    if os.geteuid() != 0 or shutil.which("mount") is None:
        pytest.skip("a read-only bind mount needs root")
    if subprocess.run(["mount", "--bind", str(folder), str(folder)], capture_output=True).returncode != 0:
        pytest.skip("mount --bind is not permitted here")
    try:
        remount = subprocess.run(["mount", "-o", "remount,ro,bind", str(folder)], capture_output=True)
        if remount.returncode != 0:
            pytest.skip("remount,ro is not permitted here")
        yield folder
    finally:
        subprocess.run(["umount", str(folder)], capture_output=True)


def _without_write_permission():
    """A command prefix under which the permission bits hold: as root, drop the capabilities that
    override them (``setpriv``), so a folder without ``w`` really refuses files."""
    if os.geteuid() != 0:
        return ()
    if shutil.which("setpriv") is None:
        pytest.skip("setpriv (util-linux) is needed to give up root's permission override")
    return ("setpriv", "--bounding-set=-dac_override,-dac_read_search", "--")


@pytest.mark.parametrize("how", ["read-only", "permission"])
def test_unwritable_run_folder_is_one_line_exit_2(tmp_path, how):
    """A run folder on a read-only file system, or in a folder without write permission: one
    line naming the folder and the OS error, exit 2, before anything starts."""
    parent = tmp_path / "runs"
    with contextlib.ExitStack() as stack:
        if how == "read-only":
            stack.enter_context(read_only_folder(parent))
            prefix = ()
        else:
            parent.mkdir()
            parent.chmod(0o555)
            stack.callback(parent.chmod, 0o755)
            prefix = _without_write_permission()
        result = train(*SMOKE, "tracking=none", f"hydra.run.dir={parent / 'run'}", prefix=prefix, timeout=120)
    assert result.returncode == 2, result.stderr[-2000:]
    line = one_error_line(result)
    errno_text = "[Errno 30] Read-only file system" if how == "read-only" else "[Errno 13] Permission denied"
    assert f"cannot write the run folder {parent / 'run'}" in line and errno_text in line, line
    assert not (parent / "run").exists()


def test_file_size_limit_while_checkpointing_exit_6_keeps_the_last_checkpoint(tmp_path):
    """A checkpoint that hits a real file-size limit (``prlimit --fsize``, as ``ulimit -f``): one
    line naming the file and the OS error, exit 6, the previous checkpoint intact and loadable,
    no partial file, metrics.json FAILED (disk)."""
    from grafccsr.training.checkpoint import load_checkpoint

    run_dir = tmp_path / "run"
    first = train(*SMOKE, "train.max_iters=2", "tracking=none", f"hydra.run.dir={run_dir}")
    assert first.returncode == 0, first.stderr[-2000:]
    size = (run_dir / "checkpoint.pt").stat().st_size
    before = (run_dir / "checkpoint.pt").read_bytes()
    limited = train(f"resume={run_dir}", "train.max_iters=4", prefix=("prlimit", f"--fsize={size // 2}", "--"))
    assert limited.returncode == 6, limited.stdout[-2000:] + limited.stderr[-2000:]
    text = limited.stdout + limited.stderr
    assert "Traceback" not in text and "enforce fail" not in text, text[-3000:]
    assert f"could not write {run_dir / 'checkpoint.pt'}: [Errno 27] File too large" in limited.stdout
    assert (run_dir / "checkpoint.pt").read_bytes() == before
    assert load_checkpoint(run_dir)["iteration"] == 2
    assert not list(run_dir.rglob("*.tmp"))
    summary = json.loads((run_dir / "metrics.json").read_text())
    assert summary["status"] == "FAILED" and summary["reason"] == "disk" and summary["iteration"] == 4
    assert "File too large" in summary["message"]


def test_disk_full_while_writing_metrics_json_exit_6(tmp_path):
    """The disk fills while the run trains (a real tmpfs, filled by another writer); the run
    then ends (an injected NaN batch: a run that writes no checkpoint at its end) and
    metrics.json finds no space: one line naming metrics.json and ENOSPC, exit 6, no partial
    file."""
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    disk = tmp_path / "disk"
    disk.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(disk)], capture_output=True).returncode:
        pytest.skip("mount -t tmpfs is not permitted here")
    try:
        run_dir = disk / "run"
        env = dict(os.environ, GRAFCCSR_FAULT="nan@60")
        proc = _start([*SMOKE, "train.max_iters=1000", "train.ckpt_every=0", "train.log_every=0", "tracking=none",
                       f"hydra.run.dir={run_dir}"], env=env)
        _wait_for(proc, "run folder")
        with open(disk / "filler", "wb") as fh:  # another process fills the disk
            with contextlib.suppress(OSError):
                while True:
                    fh.write(b"\0" * 65536)
                    fh.flush()
        out, _ = proc.communicate(timeout=240)
        assert proc.returncode == 6, out[-3000:]
        assert "Traceback" not in out, out[-3000:]
        assert f"could not write {run_dir / 'metrics.json'}: [Errno 28] No space left on device" in out, out[-3000:]
        assert "the run had ended FAILED (nonfinite)" in out
        assert not (run_dir / "metrics.json").exists() and not list(run_dir.rglob("*.tmp"))
    finally:
        subprocess.run(["umount", str(disk)], capture_output=True)
