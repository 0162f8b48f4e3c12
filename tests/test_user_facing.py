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


CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
needs_chromium = pytest.mark.skipif(CHROMIUM is None,
                                    reason="needs chromium (apt-get install -y chromium; .ci/run installs it)")
SCREENSHOTS = os.environ.get("GRAFCCSR_SCREENSHOTS")
"""A folder (e.g. ``docs/img``): the browser tests also save what they check as PNGs there (the README's)."""
WINDOW = "1600,1000"
"""The browser window: a laptop's full-screen browser; a "first screen" is what fits in it."""


def _chromium(url: str, profile: Path, *action: str, window: str = WINDOW) -> subprocess.CompletedProcess:
    result = run(CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
                 f"--user-data-dir={profile}", f"--window-size={window}", "--virtual-time-budget=30000",
                 "--run-all-compositor-stages-before-draw",  # else charts may still be spinners in a screenshot
                 *action, url, timeout=180)
    assert result.returncode == 0, result.stderr[-2000:]
    return result


def _rendered_page(url: str, profile: Path) -> str:
    """The page's DOM after its scripts ran, in a fresh headless Chromium profile (so no view
    state a user saved in the browser)."""
    return _chromium(url, profile, "--dump-dom").stdout


def _screenshot(url: str, profile: Path, name: str, window: str = WINDOW) -> None:
    """With $GRAFCCSR_SCREENSHOTS, the page's first screen as ``<folder>/<name>``, without MLflow's
    assistant panel (the right 400 px)."""
    if not SCREENSHOTS:
        return
    from PIL import Image

    path = Path(SCREENSHOTS).absolute() / name
    path.parent.mkdir(parents=True, exist_ok=True)
    _chromium(url, profile, f"--screenshot={path}", window=window)
    with Image.open(path) as image:
        image.crop((0, 0, image.width - 400, image.height)).save(path, optimize=True)


def _text(dom: str) -> str:
    """The visible text of a DOM dump, whitespace collapsed."""
    import html
    import re

    dom = re.sub(r"<(script|style)[^>]*>.*?</\1>", " ", dom, flags=re.S)
    return re.sub(r"\s+", " ", html.unescape(re.sub(r"<[^>]+>", " ", dom)))


def _chart_groups(dom: str) -> list:
    """The run page's chart groups in order, as (name, number of charts): the headers read
    ``<name> (<n>)``."""
    import re

    return [(name, int(n)) for name, n in re.findall(r'white-space: pre;">([^<]+)</div><div[^>]*>\((\d+)\)</div>', dom)]


@pytest.fixture(scope="module")
def mlflow_ui(smoke_run):
    """``mlflow ui`` on the smoke run's store, as ``make ui`` serves the project's."""
    import urllib.request

    tmp, uri, _, _ = smoke_run
    port = free_port()
    server = subprocess.Popen([str(Path(sys.executable).with_name("mlflow")), "ui", "--backend-store-uri", uri,
                               "--host", "127.0.0.1", "--port", str(port)], cwd=tmp,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 120
        while True:
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2)
                break
            except OSError:
                assert time.time() < deadline and server.poll() is None, "mlflow ui did not start"
                time.sleep(0.5)
        yield f"http://127.0.0.1:{port}"
    finally:
        server.terminate()
        server.wait(timeout=30)


@needs_chromium
def test_the_printed_link_opens_mlflows_model_training_view(smoke_run, mlflow_ui, tmp_path):
    """MLflow 3's UI opens in its GenAI view unless told otherwise; the link printed after a run
    opens the run in the model-training view, checked in a real browser against ``mlflow ui``."""
    _, _, _, result = smoke_run
    link = next(line.split(": ", 1)[1] for line in result.stdout.splitlines() if line.startswith("MLflow run "))
    link = link.replace("http://127.0.0.1:5000", mlflow_ui)
    training_view = _rendered_page(link, tmp_path / "a")
    genai_view = _rendered_page(link.split("?")[0], tmp_path / "b")
    # the side bar: model training lists Runs and the model registry, GenAI its agents and judges
    assert ">Runs<" in training_view and "Model registry" in training_view and "Agent versions" not in training_view
    assert "Agent versions" in genai_view  # without the link's parameter: why the link carries it


@needs_chromium
def test_a_run_page_shows_fid_memory_and_samples_before_the_params(smoke_run, mlflow_ui, tmp_path):
    """What a researcher opens a run for, in the browser: the run's page (its description, above
    the metrics and all the params) says the FID, the training step's peak memory and the speed,
    and links the newest sample grid, which opens as a picture; the Model metrics tab opens on
    the eval/ charts, then mem/, with no constant and no per-class chart before them; the runs
    table's saved view has FID, memory and speed columns."""
    _, uri, run_dir, result = smoke_run
    summary = json.loads((run_dir / "metrics.json").read_text())
    run_id = summary["mlflow_run_id"]
    run_page = summary["mlflow_url"].replace("http://127.0.0.1:5000", mlflow_ui).split("?")[0]
    experiment_id = run_page.split("/experiments/")[1].split("/")[0]
    view = "?workflowType=machine_learning"

    overview = _rendered_page(run_page + view, tmp_path / "overview")
    text = _text(overview)
    head = (f"FINISHED at iteration 30/30 · fid_rf {summary['eval']['fid_rf']:.4g} (16 fakes at 32 px)",
            f"training-step peak {summary['peak_memory_mb']:.4g} MiB (live tensors)")
    for part in head:
        assert text.index("Description") < text.index(part) < text.index("Parameters ("), (part, text[:3000])
    samples = f"samples/{30:07d}.png"
    assert overview.index(f'href="#/experiments/{experiment_id}/runs/{run_id}/artifacts/{samples}"') \
        < overview.index("Parameters (")
    _screenshot(run_page + view, tmp_path / "s1", "mlflow-run-overview.png")

    grid = _rendered_page(f"{run_page}/artifacts/{samples}{view}", tmp_path / "grid")
    assert f'<img alt="{samples}" src="blob:' in grid  # the Artifacts tab shows the PNG itself
    _screenshot(f"{run_page}/artifacts/{samples}{view}", tmp_path / "s2", "mlflow-run-samples.png")

    charts = _rendered_page(f"{run_page}/model-metrics{view}", tmp_path / "charts")
    groups = [name for name, _ in _chart_groups(charts)]
    assert groups[:2] == ["eval", "mem"], groups
    assert dict(_chart_groups(charts))["eval"] >= 3  # FID, KID mean, KID std (and the held-out view scores)
    assert groups.index("perf") < groups.index("train") < groups.index("view_psnr") < groups.index("Model metrics")
    assert not {"d", "dist", "loss", "timing"} & set(groups), groups
    _screenshot(f"{run_page}/model-metrics{view}", tmp_path / "s3", "mlflow-run-charts.png", window="1600,1900")

    table_url = f"{mlflow_ui}/#/experiments/{experiment_id}/runs?viewStateShareKey=grafccsr-results&workflowType=machine_learning"
    table = _text(_rendered_page(table_url, tmp_path / "table"))
    assert "results: FID, memory, speed" in table
    for column in ("eval/fid_rf", "mem/train_peak_live_tensors_mb", "mem/process_peak_rss_mb", "perf/it_per_s"):
        assert column in table, column  # (the table draws the columns in its width only: the params are further)
    _screenshot(table_url, tmp_path / "s4", "mlflow-runs-table.png", window="1600,560")


def test_mlflow_run_uses_mlflows_own_features(smoke_run):
    from mlflow.tracking import MlflowClient

    tmp, uri, run_dir, _ = smoke_run
    client = MlflowClient(tracking_uri=uri)
    summary = json.loads((run_dir / "metrics.json").read_text())
    mlrun = client.get_run(summary["mlflow_run_id"])
    experiment = client.get_experiment(mlrun.info.experiment_id)
    assert experiment.tags["mlflow.experimentKind"] == "custom_model_development"
    view = json.loads(experiment.tags["mlflow.sharedViewState.grafccsr-results"])  # MLflow's saved-view envelope
    assert view["name"] == "results: FID, memory, speed" and "metrics.`eval/fid_rf`" in view["state"]
    tags = mlrun.data.tags
    assert tags["mlflow.source.git.commit"] and tags["mlflow.user"] and tags["mlflow.source.name"]
    assert "+exp=smoke" in tags["mlflow.note.content"] and tags["world_size"] == "1"
    assert mlrun.info.run_name.startswith("smoke train.max_iters=30 train.sample_every=10")
    assert any(k.startswith("system/") for k in mlrun.data.metrics), sorted(mlrun.data.metrics)
    images = [a.path for a in client.list_artifacts(mlrun.info.run_id, "images")]
    assert any("step+10" in p for p in images) and any("step+30" in p for p in images), images
    assert [a.path for a in client.list_artifacts(mlrun.info.run_id, "samples")] == ["samples/0000030.png"]
    inputs = mlrun.inputs.dataset_inputs
    assert len(inputs) == 1 and inputs[0].dataset.digest and inputs[0].tags[0].value == "training"
    # the run's log, uploaded after its last line
    uploaded = Path(client.download_artifacts(mlrun.info.run_id, "train.log", str(tmp / "download")))
    assert uploaded.read_text() == (run_dir / "train.log").read_text()
    assert uploaded.read_text().rstrip().endswith("FINISHED at iteration 30")


def test_each_experiment_gets_the_results_view_once(tmp_path):
    """A new experiment gets the saved runs-table view and a description linking it; one from
    before gets them on its next run, but a description its user wrote is kept, and a view its
    user deleted is not put back."""
    from mlflow.tracking import MlflowClient

    from grafccsr.tracking import ui
    from grafccsr.tracking.mlflow import get_or_create_experiment

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(tracking_uri=uri)
    view_tag = ui.SAVED_VIEW_TAG_PREFIX + ui.RESULTS_VIEW
    new = get_or_create_experiment(client, "new", uri)
    tags = client.get_experiment(new).tags
    state = json.loads(json.loads(tags[view_tag])["state"])
    assert state["selectedColumns"][:2] == ["metrics.`eval/fid_rf`", "metrics.`eval/fid`"]
    assert ui.runs_link(new) in tags["mlflow.note.content"]
    old = client.create_experiment("old", tags={"mlflow.note.content": "my notes"})
    assert get_or_create_experiment(client, "old", uri) == old
    tags = client.get_experiment(old).tags
    assert view_tag in tags and tags["mlflow.note.content"] == "my notes"
    client.delete_experiment_tag(old, view_tag)
    get_or_create_experiment(client, "old", uri)
    assert view_tag not in client.get_experiment(old).tags


def test_a_failed_run_uploads_its_log_and_says_why(tmp_path):
    """A run that fails (here a NaN loss from a corrupt batch) still uploads train.log, ending
    with the failure, and its description starts with the status and the reason."""
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    env = {**os.environ, "GRAFCCSR_FAULT": "nan@2"}
    result = run(sys.executable, "-m", "grafccsr.train", "+exp=smoke", "train.max_iters=4", "eval.at_end=false",
                 "train.sample_every=0", "tracking.system_metrics=false", f"tracking.uri={uri}",
                 f"hydra.run.dir={tmp_path / 'run'}", env=env)
    assert result.returncode == 4, result.stderr[-3000:]
    client = MlflowClient(tracking_uri=uri)
    (mlrun,) = client.search_runs([e.experiment_id for e in client.search_experiments()])
    assert mlrun.info.status == "FAILED"
    log = Path(client.download_artifacts(mlrun.info.run_id, "train.log", str(tmp_path))).read_text()
    assert "FAILED (nonfinite: " in log.rstrip().splitlines()[-1]
    assert mlrun.data.tags["mlflow.note.content"].startswith("**FAILED** (nonfinite: ")


@pytest.mark.slow  # long end to end; `make test-slow`
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
    """``pip install`` of the wheel (no checkout on the path): the smoke preset, --help and a
    two-trial smoke sweep (a shipped study, by name) run from another folder, with runs, data,
    the study database and the MLflow store in that folder. The fresh venv
    finds the dependencies in this venv's site-packages (a plain path entry: the editable
    install's own .pth files there are not processed, so the checkout stays out of sight)."""
    wheel_dir, env_dir, work = tmp_path / "wheel", tmp_path / "venv", tmp_path / "work"
    # built from the checkout's files as a clone has them: a build/ left by an earlier in-tree
    # build would put its stale packages into the wheel
    source = tmp_path / "source"
    listed = run("git", "-C", str(PROJECT_ROOT), "ls-files", "-z", "--cached", "--others", "--exclude-standard")
    for name in filter(None, listed.stdout.split("\0")):
        if (PROJECT_ROOT / name).is_file():
            (source / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(PROJECT_ROOT / name, source / name)
    built = run(sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(wheel_dir),
                str(source), timeout=300)
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
    where = run(str(py), "-c", "import grafccsr, grafccsr_analysis; print(grafccsr.__file__, grafccsr_analysis.__file__)",
                cwd=work, env=env)
    assert str(PROJECT_ROOT) not in where.stdout and str(env_dir) in where.stdout, where.stdout + where.stderr
    clash = run(str(py), "-c", "import analysis", cwd=work, env=env)  # no top-level package of a common name
    assert clash.returncode != 0 and "No module named 'analysis'" in clash.stderr, clash.stderr
    report = run(str(env_dir / "bin" / "grafccsr-report"), "--help", cwd=work, env=env)
    assert report.returncode == 0 and "--name" in report.stdout, report.stderr[-2000:]
    smoke = run(str(env_dir / "bin" / "grafccsr-train"), "+exp=smoke", "train.max_iters=2", "eval.at_end=false",
                cwd=work, env=env, timeout=300)
    assert smoke.returncode == 0, smoke.stderr[-3000:]
    assert list((work / "runs" / "smoke").glob("*/metrics.json")) and (work / "mlflow.db").is_file()
    assert any((work / "data").glob("synthetic-*"))
    # the study files ship too: a sweep by name, from the empty folder, into its sweeps/ and runs/
    studies = run(str(py), "-c", "from grafccsr.sweeping.spec import STUDIES_DIR; print(STUDIES_DIR)", cwd=work, env=env)
    assert studies.stdout.strip().startswith(str(env_dir)), studies.stdout + studies.stderr
    by_path = run(str(env_dir / "bin" / "grafccsr-sweep"), "sweeps/smoke.yaml", cwd=work, env=env)
    assert by_path.returncode == 2 and "by name: " in by_path.stderr and "smoke" in by_path.stderr, by_path.stderr
    sweep = run(str(env_dir / "bin" / "grafccsr-sweep"), "smoke", "--trials", "2", "train.max_iters=2", cwd=work,
                env=env, timeout=300)
    assert sweep.returncode == 0, sweep.stdout[-2000:] + sweep.stderr[-3000:]
    assert "study 'smoke': 2 COMPLETE" in sweep.stdout and (work / "sweeps" / "optuna.db").is_file()
    assert len(list((work / "runs" / "sweeps" / "smoke").glob("trial-*/metrics.json"))) == 2
    dashboard = run(str(env_dir / "bin" / "grafccsr-dashboard"), "--help", cwd=work, env=env)
    assert dashboard.returncode == 0 and "--storage" in dashboard.stdout, dashboard.stderr
