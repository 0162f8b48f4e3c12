"""Local services (``python -m grafccsr.services``, ``make services``) and training against the
real ``mlflow server``: checkpoints uploaded, evaluation and resume from the server alone.

Real PostgreSQL and MLflow servers (the session fixture ``services`` in conftest.py, or the ones
``.ci/run`` started); skipped only where PostgreSQL's binaries are not installed.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

from grafccsr.services.local import Services, find_pg_bin, pid_alive

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
        assert "started" in first.stdout and "--storage postgresql+psycopg2://grafccsr:" in first.stdout
        assert "tracking.uri=http://127.0.0.1:" in first.stdout
        status = json.loads(_cli("status", "--dir", str(root), "--json").stdout)
        assert status["running"] and status["postgres"]["running"] and status["mlflow"]["healthy"]
        second = _cli("start", "--dir", str(root), "--json")
        assert second.returncode == 0
        again = json.loads(second.stdout)
        assert again["postgres"]["pid"] == status["postgres"]["pid"] and again["mlflow"]["pid"] == status["mlflow"]["pid"]
        assert again["storage_url"] == status["storage_url"]
        import optuna  # the printed storage URL works as it is

        optuna.create_study(storage=status["storage_url"], study_name="probe")
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
