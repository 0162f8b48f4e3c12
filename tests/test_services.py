"""Local services (``python -m grafccsr.services``, ``make services``) and training against the
real ``mlflow server``: checkpoints uploaded, evaluation and resume from the server alone; a
planted checkpoint refused; authentication across machines; a server lost mid-run.

Real PostgreSQL and MLflow servers (the session fixture ``services`` in conftest.py, or the ones
``.ci/run`` started); skipped only where PostgreSQL's binaries are not installed.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

from grafccsr.services.local import Services, cmdline, find_pg_bin, pid_alive

SERVICES = [sys.executable, "-m", "grafccsr.services"]


def _cli(*args, env=None, timeout=300):
    return subprocess.run([*SERVICES, *args], capture_output=True, text=True, env=env, timeout=timeout)


def test_missing_postgres_says_how_to_install(tmp_path):
    env = dict(os.environ, GRAFCCSR_PG_BIN=str(tmp_path / "no-postgres-here"))
    out = _cli("start", "--dir", str(tmp_path / "s"), env=env)
    assert out.returncode == 3
    assert "apt-get install -y postgresql" in out.stderr and not (tmp_path / "s" / "postgres").exists()


def test_stop_cleans_up_stale_state(tmp_path):
    """Pid files of processes that are gone (a reboot, a kill -9): stop removes them, touches
    nothing else, and status says stopped."""
    dead = subprocess.Popen(["true"])
    dead.wait()
    svc = Services(tmp_path / "s")
    (svc.mlflow_dir).mkdir(parents=True)
    svc.mlflow_pid_file.write_text(f"{dead.pid}\n")
    svc.pgdata.mkdir(parents=True)
    (svc.pgdata / "postmaster.pid").write_text(f"{dead.pid}\n{svc.pgdata}\n")
    svc.state_file.write_text(json.dumps({"password": "x", "pg_port": 1, "mlflow_port": 2, "host": "127.0.0.1"}))
    out = _cli("stop", "--dir", str(svc.root))
    assert out.returncode == 0 and "nothing was running" in out.stdout
    assert not svc.mlflow_pid_file.exists()
    assert _cli("status", "--dir", str(svc.root)).returncode == 3


@pytest.mark.skipif(find_pg_bin() is None, reason="PostgreSQL binaries (initdb, pg_ctl) not installed: "
                                                  "apt-get install -y postgresql")
def test_cli_start_is_idempotent_and_stop_stops_what_it_started():
    """``make services`` twice: one PostgreSQL, one MLflow server, the URIs printed both times;
    ``make services-stop``: both processes are gone."""
    import tempfile

    top = Path(tempfile.mkdtemp(prefix="grafccsr-services-cli-"))
    top.chmod(0o755)  # as root, PostgreSQL runs as the postgres user (pytest's tmp_path is private)
    root = top / "s"
    try:
        first = _cli("start", "--dir", str(root), "--fast", "--mlflow-workers", "1")
        assert first.returncode == 0, first.stdout + first.stderr
        assert "started" in first.stdout and "--storage services" in first.stdout
        assert "tracking.uri=http://127.0.0.1:" in first.stdout
        status = json.loads(_cli("status", "--dir", str(root), "--json").stdout)
        assert status["running"] and status["postgres"]["running"] and status["mlflow"]["healthy"]
        second = _cli("start", "--dir", str(root), "--json")
        assert second.returncode == 0
        again = json.loads(second.stdout)
        assert again["postgres"]["pid"] == status["postgres"]["pid"] and again["mlflow"]["pid"] == status["mlflow"]["pid"]
        assert again["storage_url"] == status["storage_url"]
        state = json.loads((root / "state.json").read_text())
        assert state["password"] not in first.stdout + second.stdout and ":***@" in status["storage_url"]
        exported = _cli("env", "--dir", str(root)).stdout  # the secrets, for clients' environments only
        assert exported.startswith("export GRAFCCSR_STORAGE=")
        import optuna  # the exported storage URL works as it is

        url = exported.splitlines()[0].split("=", 1)[1].strip("'")
        optuna.create_study(storage=url, study_name="probe")
        stop = _cli("stop", "--dir", str(root))
        assert stop.returncode == 0 and "stopped MLflow server and PostgreSQL" in stop.stdout
        assert not pid_alive(status["postgres"]["pid"]) and not pid_alive(status["mlflow"]["pid"])
        assert _cli("status", "--dir", str(root)).returncode == 3
    finally:
        _cli("stop", "--dir", str(root), "--purge")
        shutil.rmtree(top, ignore_errors=True)


def test_training_against_the_server_then_eval_and_resume_from_it(tmp_path, services):
    """A smoke run logging to the real ``mlflow server`` uploads its checkpoints; with its run
    folder deleted, ``grafccsr.eval --run-id`` and ``grafccsr.train resume=mlflow:<id>`` get the
    checkpoint from the server, and the resumed run continues the same MLflow run."""
    from mlflow.tracking import MlflowClient

    uri = services.tracking_uri
    experiment = f"svc-{uuid.uuid4().hex[:8]}"
    run_dir = tmp_path / "run"
    common = [f"tracking.uri={uri}", "tracking.system_metrics=false"]
    train = subprocess.run([sys.executable, "-m", "grafccsr.train", "+exp=smoke", "train.device=cpu", "train.max_iters=2",
                            "train.ckpt_every=2", "train.sample_every=0", "eval.num_samples=8", "eval.kid_subset_size=4",
                            "tracking.log_checkpoints=true", f"tracking.experiment={experiment}",
                            f"hydra.run.dir={run_dir}", *common],
                           capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert train.returncode == 0, train.stdout[-3000:] + train.stderr[-3000:]
    run_id = json.loads((run_dir / "metrics.json").read_text())["mlflow_run_id"]
    client = MlflowClient(uri)
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED" and run.data.tags["checkpoint.latest"] == "checkpoints/00000002/checkpoint.pt"
    assert not run.info.artifact_uri.startswith(("file:", "/"))  # served by the server, not a shared disk
    shutil.rmtree(run_dir)

    ev = subprocess.run([sys.executable, "-m", "grafccsr.eval", "--run-id", run_id, "--what", "metrics",
                         "--out", str(tmp_path / "eval"), "eval.num_samples=8", "eval.kid_subset_size=4", *common],
                        capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert ev.returncode == 0, ev.stdout[-3000:] + ev.stderr[-3000:]
    evals = client.search_runs([run.info.experiment_id], filter_string=f"tags.evaluation_of = '{run_id}'")
    assert len(evals) == 1 and evals[0].data.tags["evaluated_iteration"] == "2"

    resumed = subprocess.run([sys.executable, "-m", "grafccsr.train", f"resume=mlflow:{run_id}", "train.max_iters=4",
                              *common], capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    summary = json.loads((tmp_path / "runs" / "resumed" / run_id / "metrics.json").read_text())
    assert summary["iteration"] == 4 and summary["mlflow_run_id"] == run_id and summary["status"] == "FINISHED"
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED" and run.data.tags["checkpoint.latest"] == "checkpoints/00000004/checkpoint.pt"
    assert len([r for r in client.search_runs([run.info.experiment_id])
                if "evaluation_of" not in r.data.tags]) == 1  # the resume continued the same run


# --------------------------------------------------------------------------- a checkpoint holds data, never code

PLANT = r'''
import sys, torch
from grafccsr.config import Config, to_dict

class Payload:
    """Unpickling this runs code: it writes the marker file."""
    def __reduce__(self):
        return (exec, (f"open({sys.argv[2]!r}, 'w').write('ran')",))

torch.save({"config": to_dict(Config()), "step": {}, "iteration": 99999999, "num_classes": 2,
            "mlflow_run_id": sys.argv[3], "payload": Payload()}, sys.argv[1])
'''


def test_planted_checkpoint_is_refused_and_runs_nothing(tmp_path, services):
    """Through the real MLflow server (no credentials, as the issue's intruder had): a checkpoint
    whose unpickling runs code is uploaded to a run and named by its ``checkpoint.latest`` tag,
    and another run's ``output_dir`` tag is pointed at a folder holding one. ``resume=mlflow:``
    and ``grafccsr.eval --run-id`` refuse both with one line, exit 2, and the code never runs
    (the same file loaded the unsafe way does run it: the plant is live)."""
    from mlflow.tracking import MlflowClient

    uri = services.tracking_uri
    client = MlflowClient(uri)
    experiment = client.create_experiment(f"plant-{uuid.uuid4().hex[:8]}")
    uploaded = client.create_run(experiment).info.run_id
    pointed = client.create_run(experiment).info.run_id
    marker = tmp_path / "code-ran"
    folder = tmp_path / "intruder"
    folder.mkdir()
    for run_id, path in ((uploaded, tmp_path / "checkpoint.pt"), (pointed, folder / "checkpoint.pt")):
        subprocess.run([sys.executable, "-c", PLANT, str(path), str(marker), run_id], check=True, timeout=120)
    client.log_artifact(uploaded, str(tmp_path / "checkpoint.pt"), "checkpoints/99999999")
    client.set_tag(uploaded, "checkpoint.latest", "checkpoints/99999999/checkpoint.pt")
    client.set_tag(pointed, "output_dir", str(folder))

    unsafe = "import sys, torch; torch.load(sys.argv[1], weights_only=False)"
    subprocess.run([sys.executable, "-c", unsafe, str(folder / "checkpoint.pt")], capture_output=True, timeout=120)
    assert marker.read_text() == "ran"  # loaded the old way, the file runs its code
    marker.unlink()

    common = [f"tracking.uri={uri}", "tracking.system_metrics=false"]
    attempts = {
        "resume": [sys.executable, "-m", "grafccsr.train", f"resume=mlflow:{uploaded}", *common],
        "eval, uploaded": [sys.executable, "-m", "grafccsr.eval", "--run-id", uploaded, "--what", "metrics", *common],
        "eval, output_dir": [sys.executable, "-m", "grafccsr.eval", "--run-id", pointed, "--what", "metrics", *common],
    }
    for what, cmd in attempts.items():
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=tmp_path)
        assert out.returncode == 2, (what, out.stdout[-2000:], out.stderr[-2000:])
        assert "Traceback" not in out.stdout + out.stderr, (what, out.stderr[-3000:])
        errors = [line for line in out.stderr.splitlines() if "error:" in line]
        assert len(errors) == 1 and "refused" in errors[0] and "(it needs exec)" in errors[0], (what, out.stderr)
        assert not marker.exists(), what
    assert not (tmp_path / "runs" / "resumed" / uploaded / "metrics.json").exists()


# --------------------------------------------------------------------------- services across machines


def test_non_loopback_host_without_auth_is_refused(tmp_path):
    """``--host 0.0.0.0`` without ``--auth``: one line, exit 2, nothing started or written."""
    out = _cli("start", "--dir", str(tmp_path / "s"), "--host", "0.0.0.0", "--fast", timeout=120)
    assert out.returncode == 2, out.stdout + out.stderr
    errors = [line for line in out.stderr.splitlines() if "error:" in line]
    assert len(errors) == 1 and "--auth" in errors[0] and "Traceback" not in out.stderr
    assert not (tmp_path / "s" / "state.json").exists() and not (tmp_path / "s" / "postgres").exists()


def _rest(uri: str, path: str, auth=None) -> int:
    """The HTTP status of a GET on the MLflow REST API (``auth``: user, password)."""
    import base64
    import urllib.error
    import urllib.request

    request = urllib.request.Request(f"{uri}/api/2.0/mlflow/{path}")
    if auth:
        request.add_header("Authorization", "Basic " + base64.b64encode(":".join(auth).encode()).decode())
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status
    except urllib.error.HTTPError as err:
        return err.code


@pytest.mark.slow
@pytest.mark.skipif(find_pg_bin() is None, reason="PostgreSQL binaries not installed: apt-get install -y postgresql")
def test_auth_across_machines(tmp_path):
    """``grafccsr-services start --host 0.0.0.0 --auth``: an anonymous client and a wrong password
    get 401; the credentials live only in the 0600 state file and ``env``'s output (not in
    ``status``, not on a command line); training without them stops at start with one line, exit
    2; with them in the environment it logs; a sweep with ``--storage services --tracking-uri
    services`` hands them to its trainer through the environment: the trainer's command line
    (its MLflow note) carries no secret."""
    import tempfile

    from mlflow.tracking import MlflowClient

    top = Path(tempfile.mkdtemp(prefix="grafccsr-auth-"))
    top.chmod(0o755)  # as root, PostgreSQL runs as the postgres user
    root = top / "s"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_TRACKING_", "GRAFCCSR_STORAGE"))}
    env["GRAFCCSR_SERVICES_DIR"] = str(root)
    try:
        started = _cli("start", "--host", "0.0.0.0", "--auth", "--fast", env=env)
        assert started.returncode == 0, started.stdout + started.stderr
        state = json.loads((root / "state.json").read_text())
        assert (root / "state.json").stat().st_mode & 0o777 == 0o600
        secrets = (state["password"], state["mlflow_password"], state["flask_secret"])
        status = _cli("status", "--json", env=env)
        shown = started.stdout + started.stderr + status.stdout
        assert not any(secret in shown for secret in secrets)
        assert not any(secret in cmdline(pid) for pid in _all_pids() for secret in secrets)
        exported = _cli("env", env=env)
        assert exported.returncode == 0 and f"MLFLOW_TRACKING_PASSWORD={state['mlflow_password']}" in exported.stdout
        uri = json.loads(status.stdout)["tracking_uri"]  # this machine's name, as other machines reach it
        assert _rest(uri, "experiments/search?max_results=1") == 401
        assert _rest(uri, "experiments/search?max_results=1", ("grafccsr", "wrong")) == 401
        assert _rest(uri, "experiments/search?max_results=1", ("grafccsr", state["mlflow_password"])) == 200

        train = [sys.executable, "-m", "grafccsr.train", "+exp=smoke", "train.sample_every=0", "eval.at_end=false",
                 f"tracking.uri={uri}", "tracking.experiment=auth"]
        anonymous = subprocess.run([*train, f"hydra.run.dir={tmp_path / 'anon'}"], capture_output=True, text=True,
                                   timeout=300, env=env, cwd=tmp_path)
        assert anonymous.returncode == 2 and "HTTP 401" in anonymous.stderr and "Traceback" not in anonymous.stderr
        assert not (tmp_path / "anon").exists()
        credentials = dict(env, MLFLOW_TRACKING_USERNAME="grafccsr", MLFLOW_TRACKING_PASSWORD=state["mlflow_password"])
        logged = subprocess.run([*train, f"hydra.run.dir={tmp_path / 'ok'}"], capture_output=True, text=True,
                                timeout=300, env=credentials, cwd=tmp_path)
        assert logged.returncode == 0, logged.stdout[-3000:] + logged.stderr[-3000:]
        summary = json.loads((tmp_path / "ok" / "metrics.json").read_text())
        assert summary["tracking"]["state"] == "ok" and summary["tracking"]["refused_calls"] == 0
        os.environ.update(MLFLOW_TRACKING_USERNAME="grafccsr", MLFLOW_TRACKING_PASSWORD=state["mlflow_password"])
        try:
            run = MlflowClient(uri).get_run(summary["mlflow_run_id"])
        finally:
            os.environ.pop("MLFLOW_TRACKING_USERNAME"), os.environ.pop("MLFLOW_TRACKING_PASSWORD")
        assert run.info.status == "FINISHED" and "train/loss_d" in run.data.metrics

        study = tmp_path / "auth.yaml"
        study.write_text(json.dumps({
            "study_name": "auth", "sampler": "random", "n_trials": 1, "heartbeat_interval_s": 5,
            "objectives": [{"metric": "it_per_s", "direction": "maximize"}],
            "base_overrides": ["+exp=smoke", "train.sample_every=0", "eval.at_end=false", "tracking.system_metrics=false"],
            "search_space": {"train.batch_size": {"type": "categorical", "choices": [2]}}}))
        sweep = subprocess.run([sys.executable, "-m", "grafccsr.sweep", str(study), "--storage", "services",
                                "--tracking-uri", "services", "--runs-root", str(tmp_path / "runs")],
                               capture_output=True, text=True, timeout=600, env=env, cwd=tmp_path)
        assert sweep.returncode == 0 and "COMPLETE" in sweep.stdout, sweep.stdout[-3000:] + sweep.stderr[-3000:]
        assert not any(secret in sweep.stdout + sweep.stderr for secret in secrets)
        trial = json.loads((tmp_path / "runs" / "sweeps" / "auth" / "trial-0" / "metrics.json").read_text())
        os.environ.update(MLFLOW_TRACKING_USERNAME="grafccsr", MLFLOW_TRACKING_PASSWORD=state["mlflow_password"])
        try:
            note = MlflowClient(uri).get_run(trial["mlflow_run_id"]).data.tags["mlflow.note.content"]
        finally:
            os.environ.pop("MLFLOW_TRACKING_USERNAME"), os.environ.pop("MLFLOW_TRACKING_PASSWORD")
        assert note.startswith("python -m grafccsr.train") and not any(secret in note for secret in secrets)
    finally:
        _cli("stop", "--dir", str(root), "--purge")
        shutil.rmtree(top, ignore_errors=True)


def _all_pids():
    return [int(p) for p in os.listdir("/proc") if p.isdigit()]


# --------------------------------------------------------------------------- a tracking server lost mid-run


class MlflowServer:
    """A real ``mlflow server`` of this test alone (SQLite store), to kill, stop and start again."""

    def __init__(self, folder: Path) -> None:
        from grafccsr.services.local import free_port

        self.folder, self.port = folder, free_port()
        self.uri = f"http://127.0.0.1:{self.port}"
        self.proc = None
        folder.mkdir(parents=True, exist_ok=True)

    def start(self, timeout_s: float = 240) -> "MlflowServer":
        import time
        import urllib.request

        cmd = [str(Path(sys.executable).with_name("mlflow")), "server", "--backend-store-uri",
               f"sqlite:///{self.folder / 'mlflow.db'}", "--artifacts-destination", str(self.folder / "artifacts"),
               "--serve-artifacts", "--host", "127.0.0.1", "--port", str(self.port), "--workers", "1"]
        env = dict(os.environ, MLFLOW_SERVER_ENABLE_JOB_EXECUTION="false")
        with open(self.folder / "server.log", "ab") as log:
            self.proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            try:
                with urllib.request.urlopen(f"{self.uri}/health", timeout=2):
                    return self
            except OSError:
                time.sleep(0.3)
        raise AssertionError((self.folder / "server.log").read_text()[-3000:])

    def signal(self, sig: int) -> None:
        os.killpg(self.proc.pid, sig)

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            for sig in (signal.SIGCONT, signal.SIGKILL):
                self.signal(sig)
            self.proc.wait(timeout=30)


def _trainer(uri: str, run_dir: Path, *extra: str) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "grafccsr.train", "+exp=smoke", "train.max_iters=100000", "train.sample_every=2",
           "train.ckpt_every=5", "train.log_every=5", "eval.at_end=false", "tracking.log_checkpoints=true",
           f"tracking.uri={uri}", "tracking.experiment=lost", "tracking.lost_retry_s=2", f"hydra.run.dir={run_dir}",
           *extra]
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _read_until(proc: subprocess.Popen, text: str, seen: list, timeout_s: float = 300) -> str:
    """Lines of ``proc`` into ``seen`` until one holds ``text``; returns that line."""
    import time

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line:
            break
        seen.append(line)
        if text in line:
            return line
    proc.kill()
    raise AssertionError(f"never saw {text!r}:\n" + "".join(seen)[-4000:])


def _checkpoint_iteration(line: str) -> int:
    return int(line.rsplit("(iteration ", 1)[1].split(")")[0])


@pytest.mark.slow
@pytest.mark.parametrize("how", ["killed", "hung"])
def test_tracking_server_lost_mid_run_training_goes_on(tmp_path, how):
    """The run's MLflow server is killed (SIGKILL) or hangs (SIGSTOP: connections accepted,
    never answered) while the run trains, uploading samples and checkpoints: one warning line,
    no retry chatter, training and checkpoints go on; stopped with SIGTERM it ends KILLED
    within seconds with metrics.json saying tracking was lost and from which iteration."""
    import time

    server = MlflowServer(tmp_path / "server").start()
    run_dir = tmp_path / "run"
    proc = _trainer(server.uri, run_dir, "tracking.request_timeout_s=2", "tracking.request_retries=1")
    seen: list = []
    try:
        _read_until(proc, "(iteration 5)", seen)
        server.signal(signal.SIGKILL if how == "killed" else signal.SIGSTOP)
        lost = _read_until(proc, " lost at iteration ", seen)
        after = _checkpoint_iteration(_read_until(proc, "checkpoint ", seen))
        after = _checkpoint_iteration(_read_until(proc, "checkpoint ", seen)) if after <= 5 else after
        proc.send_signal(signal.SIGTERM)
        start = time.monotonic()
        rest, _ = proc.communicate(timeout=120)
        stop_s = time.monotonic() - start
    finally:
        proc.kill()
        server.kill()
    out = "".join(seen) + rest
    assert proc.returncode == 130, out[-3000:]
    assert "Traceback" not in out and "Retrying" not in out, out[-3000:]
    warnings = [line for line in out.splitlines() if "WARNING" in line]
    assert len(warnings) == 1 and "MLflow server" in warnings[0] and " lost at iteration " in warnings[0], warnings
    assert stop_s < 30, stop_s  # the run's end waits one bounded attempt, not MLflow's minutes
    summary = json.loads((run_dir / "metrics.json").read_text())
    tracking = summary["tracking"]
    assert summary["status"] == "KILLED" and tracking["state"] == "lost" and tracking["back_at_iteration"] is None
    assert tracking["lost_at_iteration"] >= 5 and f"lost at iteration {tracking['lost_at_iteration']}" in lost
    assert summary["iteration"] >= after > tracking["lost_at_iteration"]  # checkpoints went on after the loss
    assert tracking["not_sent"].get("image", 0) > 0 and tracking["not_sent"].get("checkpoint", 0) > 0
    assert f"MLflow tracking lost at iteration {tracking['lost_at_iteration']}" in rest


@pytest.mark.slow
def test_tracking_server_back_mid_run_gets_the_rest(tmp_path):
    """The server is killed mid-run and started again: one line when lost, one when back; the
    metrics of the gap are sent late, checkpoints are uploaded again, and the run's final status
    reaches the server."""
    from mlflow.tracking import MlflowClient

    server = MlflowServer(tmp_path / "server").start()
    run_dir = tmp_path / "run"
    proc = _trainer(server.uri, run_dir)
    seen: list = []
    try:
        _read_until(proc, "(iteration 5)", seen)
        server.kill()
        lost_line = _read_until(proc, " lost at iteration ", seen)
        server.start()
        back_line = _read_until(proc, " back at iteration ", seen)
        back_at = int(back_line.split(" back at iteration ", 1)[1].split()[0])
        while _checkpoint_iteration(_read_until(proc, "checkpoint ", seen)) <= back_at:
            pass
        proc.send_signal(signal.SIGTERM)
        rest, _ = proc.communicate(timeout=120)
        summary = json.loads((run_dir / "metrics.json").read_text())
        run = MlflowClient(server.uri).get_run(summary["mlflow_run_id"])
        history = MlflowClient(server.uri).get_metric_history(run.info.run_id, "train/loss_d")
    finally:
        proc.kill()
        server.kill()
    out = "".join(seen) + rest
    assert proc.returncode == 130 and "Traceback" not in out and "Retrying" not in out, out[-3000:]
    warnings = [line for line in out.splitlines() if "WARNING" in line]
    assert len(warnings) == 2 and " lost at iteration " in warnings[0] and " back at iteration " in warnings[1], warnings
    tracking = summary["tracking"]
    lost_at = tracking["lost_at_iteration"]
    assert tracking["state"] == "recovered" and tracking["back_at_iteration"] == back_at > lost_at
    assert f"lost at iteration {lost_at}" in lost_line
    steps = {m.step for m in history}
    assert any(lost_at < step < back_at for step in steps), (lost_at, back_at, sorted(steps))  # sent late
    assert run.info.status == "KILLED"
    assert int(run.data.tags["checkpoint.latest"].split("/")[1]) > back_at


# --------------------------------------------------------------------------- a database lost during a sweep

WAITING_TRAINER = r'''
import json, os, sys, time
args = dict(a.split("=", 1) for a in sys.argv[1:] if "=" in a)
run_dir = args["hydra.run.dir"].strip("'")
os.makedirs(run_dir, exist_ok=True)
go = os.environ.get("TRAINER_GO")
while go and not os.path.exists(go):  # the test stops the database meanwhile
    time.sleep(0.05)
batch = int(args.get("train.batch_size", "2"))
with open(os.path.join(run_dir, "metrics.json"), "w") as fh:
    json.dump({"status": "FINISHED", "reason": None, "message": "", "iteration": 4, "mlflow_run_id": None,
               "peak_memory_mb": float(batch), "eval": {"fid": 10.0 / batch}}, fh)
'''


@pytest.mark.skipif(find_pg_bin() is None, reason="PostgreSQL binaries not installed: apt-get install -y postgresql")
def test_database_lost_during_a_sweep_exit_7_and_the_rerun_completes(tmp_path):
    """A PostgreSQL of this test alone (the session's is shared) is stopped (fast shutdown) while
    a trial runs; the storage URL comes from $GRAFCCSR_STORAGE, not the command line. The sweep
    ends with one line naming the storage (password hidden) and the trial it could not record,
    exit 7, no traceback; with the database back, the same command fails the orphaned trial,
    runs it again and completes the study."""
    import tempfile

    import optuna

    top = Path(tempfile.mkdtemp(prefix="grafccsr-pg-lost-"))
    top.chmod(0o755)  # as root, PostgreSQL runs as the postgres user
    services = Services(top / "s", fast=True)
    try:
        services.start(mlflow=False)
        storage = services.storage_url(local=True)
        trainer = tmp_path / "trainer.py"
        trainer.write_text(WAITING_TRAINER)
        study = tmp_path / "lost.yaml"
        study.write_text(json.dumps({
            "study_name": "lost", "sampler": "random", "n_trials": 2, "heartbeat_interval_s": 1, "grace_period_s": 3,
            "objectives": [{"metric": "peak_memory_mb", "direction": "minimize"},
                           {"metric": "fid", "direction": "minimize"}],
            "base_overrides": ["+exp=smoke"], "trainer_cmd": [sys.executable, str(trainer)],
            "search_space": {"train.batch_size": {"type": "categorical", "choices": [1, 2, 4]}}}))
        go = tmp_path / "go"
        env = dict(os.environ, GRAFCCSR_STORAGE=storage, TRAINER_GO=str(go))
        cmd = [sys.executable, "-m", "grafccsr.sweep", str(study), "--tracking-uri", "none",
               "--runs-root", str(tmp_path / "runs")]
        sweep = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
        head = []
        for line in sweep.stdout:
            head.append(line)
            if "] start" in line:
                break
        assert services.stop_postgres()
        go.touch()
        out, err = sweep.communicate(timeout=120)
        out = "".join(head) + out
        assert sweep.returncode == 7, out + err
        assert "Traceback" not in out + err and services.load_state()["password"] not in out + err
        errors = [line for line in err.splitlines() if line.strip()]
        assert len(errors) == 1 and errors[0].startswith("grafccsr.sweep: error: storage postgresql"), err
        assert ":***@" in errors[0] and "trial(s) 0 ran but could not be recorded" in errors[0], errors[0]

        services.start(mlflow=False)
        trials = optuna.load_study(study_name="lost", storage=storage).trials
        assert [t.state.name for t in trials] == ["RUNNING"]  # the study as the database last had it
        again = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
        assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
        assert "FAIL(worker_lost)" in again.stdout
        trials = optuna.load_study(study_name="lost", storage=storage).trials
        assert sorted(t.state.name for t in trials) == ["COMPLETE", "COMPLETE", "FAIL"]
    finally:
        services.stop(purge=True)
        shutil.rmtree(top, ignore_errors=True)
