"""What a user meets, met as a user does: the commands' help and validation, the run's log,
MLflow's own features (model-training experiments, images with steps, system metrics,
standard tags, the dataset input, UI links), Hydra multiruns, and the installed package."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
import venv
from pathlib import Path

import pytest

from grafccsr.paths import PROJECT_ROOT
from grafccsr.services.local import free_port


def run(*args: str, cwd=PROJECT_ROOT, timeout: int = 240, env=None) -> subprocess.CompletedProcess:
    return subprocess.run([*args], cwd=cwd, capture_output=True, text=True, timeout=timeout, env=env)


def test_cfg_job_is_validated_too():
    result = run(sys.executable, "-m", "grafccsr.train", "--cfg", "job", "model.patch.rays_per_patch=2048",
                 "train.amp.policy=fp8", timeout=120)
    assert result.returncode == 2
    assert result.stdout == "" and len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert "rays_per_patch" in result.stderr or "train.amp.policy" in result.stderr


def test_help_lists_groups_and_documented_keys():
    result = run(sys.executable, "-m", "grafccsr.train", "--help", timeout=120)
    assert result.returncode == 0
    out = result.stdout
    assert "memory: default, guide, lean, none" in out and "model: graf, small" in out
    assert "train.r1_gamma: float = 10.0" in out and "GRAF's units" in out
    assert "model.patch.antialias: bool = False" in out
    assert "defaults:" not in out  # not the composed YAML


def test_every_tool_the_readme_names_answers_help():
    """``--help`` of every ``python -m`` tool in the READMEs exits 0, and every console script
    the README lists is declared in pyproject.toml and imports."""
    import re

    readmes = (PROJECT_ROOT / "README.md").read_text() + (PROJECT_ROOT / "sweeps" / "README.md").read_text()
    modules = sorted(set(re.findall(r"python -m ((?:grafccsr|analysis)[a-z_.]*)", readmes)))
    assert "grafccsr.train" in modules and len(modules) >= 8, modules
    procs = {m: subprocess.Popen([sys.executable, "-m", m, "--help"], cwd=PROJECT_ROOT, stdout=subprocess.PIPE,
                                 stderr=subprocess.PIPE, text=True) for m in modules}
    for module, proc in procs.items():
        out, err = proc.communicate(timeout=240)
        assert proc.returncode == 0 and len(out) > 100 and "Traceback" not in err, (module, err[-2000:])
    section = (PROJECT_ROOT / "pyproject.toml").read_text().split("[project.scripts]")[1].split("\n[")[0]
    scripts = dict(re.findall(r'^(grafccsr-[a-z]+) = "([\w.]+:\w+)"', section, re.M))
    listed = set(re.findall(r"`(grafccsr-[a-z]+)`", readmes))
    assert listed and listed <= set(scripts), sorted(listed - set(scripts))
    code = "import importlib\n" + "".join(
        f"assert callable(getattr(importlib.import_module({t.split(':')[0]!r}), {t.split(':')[1]!r}))\n"
        for t in scripts.values())
    imported = run(sys.executable, "-c", code)
    assert imported.returncode == 0, imported.stderr[-2000:]


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("user")
    uri = f"sqlite:///{tmp / 'mlflow.db'}"
    run_dir = tmp / "run"
    result = run(sys.executable, "-m", "grafccsr.train", "+exp=smoke", "train.max_iters=30", "train.sample_every=10",
                 "tracking.system_metrics_interval_s=1", f"tracking.uri={uri}", f"hydra.run.dir={run_dir}")
    assert result.returncode == 0, result.stderr[-3000:]
    return tmp, uri, run_dir, result


def test_train_log_has_the_run(smoke_run):
    _, _, run_dir, result = smoke_run
    log = (run_dir / "train.log").read_text()
    for text in ("setting up smoke on cpu", "data: 64 images", "run folder", "MLflow run", "it 1/30  d ",
                 "it/s", "it 30/30", "checkpoint", "FINISHED at iteration 30"):
        assert text in log, text
    assert "?workflowType=machine_learning" in result.stdout  # the UI link, printed at the end


def _rendered_page(url: str, profile: Path) -> str:
    """The page's DOM after its scripts ran, in a fresh headless Chromium profile."""
    result = run(CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", f"--user-data-dir={profile}",
                 "--virtual-time-budget=15000", "--dump-dom", url, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    return result.stdout


CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.mark.skipif(CHROMIUM is None, reason="needs chromium (apt-get install -y chromium; .ci/run installs it)")
def test_the_printed_link_opens_mlflows_model_training_view(smoke_run, tmp_path):
    """MLflow 3's UI opens in its GenAI view unless told otherwise; the link printed after a run
    opens the run in the model-training view, checked in a real browser against ``mlflow ui``."""
    _, uri, _, result = smoke_run
    link = next(line.split(": ", 1)[1] for line in result.stdout.splitlines() if line.startswith("MLflow run "))
    port = free_port()
    server = subprocess.Popen([str(Path(sys.executable).with_name("mlflow")), "ui", "--backend-store-uri", uri,
                               "--host", "127.0.0.1", "--port", str(port)], cwd=tmp_path,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        import urllib.request

        deadline = time.time() + 90
        while True:
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2)
                break
            except OSError:
                assert time.time() < deadline and server.poll() is None, "mlflow ui did not start"
                time.sleep(0.5)
        link = link.replace("http://127.0.0.1:5000", f"http://127.0.0.1:{port}")
        training_view = _rendered_page(link, tmp_path / "a")
        genai_view = _rendered_page(link.split("?")[0], tmp_path / "b")
    finally:
        server.terminate()
        server.wait(timeout=30)
    # the side bar: model training lists Runs and the model registry, GenAI its agents and judges
    assert ">Runs<" in training_view and "Model registry" in training_view and "Agent versions" not in training_view
    assert "Agent versions" in genai_view  # without the link's parameter: why the link carries it


def test_mlflow_run_uses_mlflows_own_features(smoke_run):
    from mlflow.tracking import MlflowClient

    _, uri, run_dir, _ = smoke_run
    client = MlflowClient(tracking_uri=uri)
    summary = json.loads((run_dir / "metrics.json").read_text())
    mlrun = client.get_run(summary["mlflow_run_id"])
    experiment = client.get_experiment(mlrun.info.experiment_id)
    assert experiment.tags["mlflow.experimentKind"] == "custom_model_development"
    tags = mlrun.data.tags
    assert tags["mlflow.source.git.commit"] and tags["mlflow.user"] and tags["mlflow.source.name"]
    assert "+exp=smoke" in tags["mlflow.note.content"]
    assert mlrun.info.run_name.startswith("smoke train.max_iters=30 train.sample_every=10")
    assert any(k.startswith("system/") for k in mlrun.data.metrics), sorted(mlrun.data.metrics)
    images = [a.path for a in client.list_artifacts(mlrun.info.run_id, "images")]
    assert any("step+10" in p for p in images) and any("step+30" in p for p in images), images
    inputs = mlrun.inputs.dataset_inputs
    assert len(inputs) == 1 and inputs[0].dataset.digest and inputs[0].tags[0].value == "training"


def test_multirun_is_one_parent_with_children(tmp_path):
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    result = run(sys.executable, "-m", "grafccsr.train", "-m", "+exp=smoke", "train.max_iters=2",
                 "train.batch_size=1,2", "eval.at_end=false", "train.sample_every=0", f"tracking.uri={uri}",
                 f"hydra.sweep.dir={tmp_path / 'multi'}", "tracking.system_metrics=false", timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    client = MlflowClient(tracking_uri=uri)
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()])
    parents = [r for r in runs if r.data.tags.get("kind") == "multirun"]
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId")]
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"
    assert len(children) == 2 and {c.data.tags["mlflow.parentRunId"] for c in children} == {parents[0].info.run_id}
    assert len({c.info.run_name for c in children}) == 2


def test_installed_wheel_runs_outside_the_checkout(tmp_path):
    """``pip install`` of the wheel (no checkout on the path): the smoke preset and --help run
    from another folder, with runs, data and the MLflow store in that folder. The fresh venv
    finds the dependencies in this venv's site-packages (a plain path entry: the editable
    install's own .pth files there are not processed, so the checkout stays out of sight)."""
    wheel_dir, env_dir, work = tmp_path / "wheel", tmp_path / "venv", tmp_path / "work"
    built = run(sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(wheel_dir),
                str(PROJECT_ROOT), timeout=300)
    assert built.returncode == 0, built.stderr[-3000:]
    venv.create(env_dir, with_pip=False)
    py = env_dir / "bin" / "python"
    import sysconfig

    ours = sysconfig.get_paths()["purelib"]
    theirs = run(str(py), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])").stdout.strip()
    Path(theirs, "dependencies.pth").write_text(ours + "\n")
    (wheel,) = wheel_dir.glob("grafccsr-*.whl")
    installed = run(sys.executable, "-m", "pip", "--python", str(py), "install", "--no-deps", "-q", str(wheel),
                    timeout=300)
    assert installed.returncode == 0, installed.stderr[-3000:]
    work.mkdir()
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    help_out = run(str(env_dir / "bin" / "grafccsr-train"), "--help", cwd=work, env=env)
    assert help_out.returncode == 0 and "train.batch_size" in help_out.stdout, help_out.stderr[-2000:]
    where = run(str(py), "-c", "import grafccsr, analysis; print(grafccsr.__file__, analysis.__file__)", cwd=work, env=env)
    assert str(PROJECT_ROOT) not in where.stdout and str(env_dir) in where.stdout, where.stdout
    smoke = run(str(env_dir / "bin" / "grafccsr-train"), "+exp=smoke", "train.max_iters=2", "eval.at_end=false",
                cwd=work, env=env, timeout=300)
    assert smoke.returncode == 0, smoke.stderr[-3000:]
    assert list((work / "runs" / "smoke").glob("*/metrics.json")) and (work / "mlflow.db").is_file()
    assert any((work / "data").glob("synthetic-*"))
