"""The evaluation CLI: argument handling, and a smoke checkpoint evaluated end to end."""

from __future__ import annotations

import json
import math
import subprocess
import sys

import pytest

from grafccsr.cli.eval import build_parser, main, options
from grafccsr.config import ConfigError, load_config
from grafccsr.evaluation.checkpoint import check_eval_overrides
from grafccsr.paths import PROJECT_ROOT


def run_module(module: str, *args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", module, *args], cwd=PROJECT_ROOT, capture_output=True,
                          text=True, timeout=timeout)


# ----------------------------------------------------------------------------- arguments


def test_help_works_and_is_quick():
    result = run_module("grafccsr.eval", "--help", timeout=60)
    assert result.returncode == 0
    for word in ("--ckpt", "--run-id", "--frames", "--elevation-v", "--depth", "--scale", "eval.*", "tracking.*"):
        assert word in result.stdout


def test_flags_and_overrides_in_any_order():
    from grafccsr.cli.common import parse

    args = parse(build_parser(), ["--ckpt", "/x/checkpoint.pt", "eval.num_samples=16", "--frames", "12",
                                  "--elevation-v", "0.3", "--depth", "--what", "grid,metrics", "memory.render_chunk=64",
                                  "--out", "/tmp/out"])
    opts = options(args)
    assert args.ckpt == "/x/checkpoint.pt" and args.run_id is None and args.out == "/tmp/out"
    assert (opts.frames, opts.elevation_v, opts.depth, opts.what) == (12, 0.3, True, ("grid", "metrics"))
    assert args.overrides == ["eval.num_samples=16", "memory.render_chunk=64"]


@pytest.mark.parametrize("argv, match", [
    (["--ckpt", "a", "--what", "video"], "--what"),
    (["--ckpt", "a", "--elevation-v", "2"], "--elevation-v"),
    (["--ckpt", "a", "--frames", "0"], "--frames"),
    (["--ckpt", "a", "--scale", "0"], "--scale"),
])
def test_bad_options_name_the_flag(argv, match):
    from grafccsr.cli.common import parse

    with pytest.raises(ConfigError, match=match):
        options(parse(build_parser(), argv))


def test_only_evaluation_settings_change_over_a_checkpoint():
    check_eval_overrides(["eval.num_samples=5", "memory.render_chunk=8", "train.device=cpu", "data.root=/x"])
    with pytest.raises(ConfigError, match="model.z_dim cannot be set here"):
        check_eval_overrides(["model.z_dim=4"])


@pytest.mark.parametrize("argv, message", [
    (["--ckpt", "/nonexistent/checkpoint.pt"], "no checkpoint at /nonexistent/checkpoint.pt"),
    (["--ckpt", "/nonexistent", "model.z_dim=3"], "model.z_dim cannot be set here"),
])
def test_bad_input_is_one_line_and_exit_2(argv, message):
    result = run_module("grafccsr.eval", *argv, timeout=120)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], result.stderr


def test_overrides_apply_over_the_stored_config():
    from dataclasses import asdict

    from grafccsr.config import apply_overrides

    stored = asdict(load_config(["+exp=smoke"]))
    cfg = apply_overrides(stored, ["eval.num_samples=12", "eval.kid_subset_size=6", "tracking.backend=none"])
    assert (cfg.eval.num_samples, cfg.eval.kid_subset_size, cfg.tracking.backend) == (12, 6, "none")
    assert cfg.model.z_dim == 16  # the checkpoint's model config is kept
    with pytest.raises(ConfigError, match="eval.num_samples"):
        apply_overrides(stored, ["eval.num_samples=many"])
    with pytest.raises(ConfigError, match="eval.no_such_key is not a config key"):
        apply_overrides(stored, ["eval.no_such_key=1"])


# ----------------------------------------------------------------------------- end to end


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("evalcli")
    uri = f"sqlite:///{tmp}/mlflow.db"
    result = run_module("grafccsr.train", "+exp=smoke", f"tracking.uri={uri}", f"hydra.run.dir={tmp}/run",
                        f"eval.cache_dir={tmp}/cache")
    assert result.returncode == 0, result.stderr[-3000:]
    ckpt = tmp / "run" / "checkpoint.pt"
    assert ckpt.is_file(), f"training wrote no {ckpt}"
    return tmp, uri, ckpt


def test_eval_cli_on_a_smoke_checkpoint(smoke_run, capsys):
    """In-process ``main`` (the ``python -m`` entry is covered by the --help test) to save
    the interpreter start and imports."""
    import torch

    tmp, uri, ckpt = smoke_run
    out = tmp / "eval"
    code = main(["--ckpt", str(ckpt), "eval.num_samples=16", "eval.kid_subset_size=8", f"eval.cache_dir={tmp}/cache",
                 "--frames", "4", "--elevation-frames", "3", "--views", "4", "--depth", "--scale", "2", "--out", str(out)])
    result = capsys.readouterr()
    assert code == 0, result.err[-3000:]

    from PIL import Image

    for name, frames in (("rotation.gif", 4), ("elevation.gif", 3), ("rotation_depth.gif", 4)):
        with Image.open(out / name) as gif:
            assert gif.format == "GIF" and gif.n_frames == frames, name
    num_classes = torch.load(ckpt, map_location="cpu", weights_only=True)["num_classes"]
    size = load_config(["+exp=smoke"]).data.image_size
    with Image.open(out / "grid.png") as grid:  # 4 azimuths x classes of 2x upscaled images, 2px padding
        width, height = 4 * (2 * size + 2) + 2, num_classes * (2 * size + 2) + 2
        assert grid.size[0] > width and grid.size[1] > height  # + the class and azimuth labels
        assert grid.size[0] - width < 200 and grid.size[1] - height <= 16
    assert (out / "depth_grid.png").is_file()

    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["extractor"] == "random-features"
    assert metrics["num_samples"] == 16
    assert all(math.isfinite(metrics[k]) for k in ("fid_rf", "kid_rf_mean", "kid_rf_std"))
    assert "fid" not in metrics  # a random-feature FID is never called plain fid
    for path in ("metrics.json", "views.png", "rotation.gif", "elevation.gif", "grid.png"):
        assert str(out / path) in result.out  # printed paths

    # the pose-matched scores on the views the training held out (the smoke set's 0 degree azimuth)
    held = metrics["view_holdout"]
    assert held["views"] == 8 and held["azimuths_deg"] == {p: [0] for p in ("0", "0.5", "1", "1.5")}
    assert held["codes"] == 4 and held["foreground"] == {"background": [0.0, 0.0, 0.0], "tolerance": 0.05}
    for key in ("view_psnr", "view_psnr_best", "view_ssim", "view_iou", "view_psnr/class0_column"):
        assert math.isfinite(metrics[key]), key
    assert metrics["view_psnr_best"] >= metrics["view_psnr"] and 0 <= metrics["view_iou"] <= 1
    assert f"view_psnr {metrics['view_psnr']:.2f} dB" in result.out
    with Image.open(out / "views.png") as views:  # per class: reals, best code, another code
        assert views.size[1] == num_classes * (3 * (2 * size + 2) + 2 + 16 + 4)
    training = json.loads((ckpt.parent / "metrics.json").read_text())["eval"]
    assert training["view_psnr"] == pytest.approx(metrics["view_psnr"], abs=1e-4)  # the same views, codes, model

    # logged as a child run of the training run; the training run's own record is untouched
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    run_id = metrics["mlflow_run_id"]
    assert run_id
    before = {k: [(m.step, m.value) for m in client.get_metric_history(run_id, k)] for k in ("eval/fid_rf",)}
    for key in ("eval/view_psnr", "eval/view_ssim", "eval/view_iou"):  # the training run's own evaluation
        assert [m.value for m in client.get_metric_history(run_id, key)] == [pytest.approx(training[key[5:]])]
    children = client.search_runs([client.get_run(run_id).info.experiment_id],
                                  filter_string=f"tags.mlflow.parentRunId = '{run_id}'")
    assert len(children) == 1
    child = children[0]
    assert child.data.metrics["eval/fid_rf"] == pytest.approx(metrics["fid_rf"])
    assert client.get_metric_history(child.info.run_id, "eval/fid_rf")[0].step == metrics["iteration"]
    assert child.data.tags["fid_extractor"] == "random-features"
    assert child.data.metrics["eval/view_psnr"] == pytest.approx(metrics["view_psnr"])
    # per class as the training run logs it: a chart group per score after eval/, mem/, perf/, train/
    assert child.data.metrics["view_iou/class1_block"] == pytest.approx(metrics["view_iou/class1_block"])
    logged = {a.path for a in client.list_artifacts(child.info.run_id)}
    assert {"metrics.json", "views.png", "rotation.gif", "elevation.gif", "grid.png"} <= logged
    assert {k: [(m.step, m.value) for m in client.get_metric_history(run_id, k)] for k in before} == before


def test_run_id_finds_the_checkpoint_and_checks_its_owner(smoke_run, tmp_path):
    import shutil

    import torch

    from grafccsr.evaluation import find_run_checkpoint
    from grafccsr.training.checkpoint import CheckpointError

    tmp, uri, ckpt = smoke_run
    run_id = torch_load(ckpt)["mlflow_run_id"]
    assert find_run_checkpoint(run_id, uri)[0] == ckpt
    if ckpt.with_name("best.pt").is_file():
        assert find_run_checkpoint(run_id, uri, best=True)[0] == ckpt.with_name("best.pt")
    with pytest.raises(ConfigError, match="no such run"):
        find_run_checkpoint("0" * 32, uri)
    # another run's checkpoint now sits where the run's output_dir tag points
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    folder = tmp_path / "moved"
    shutil.copytree(ckpt.parent, folder)
    state = torch_load(folder / "checkpoint.pt")
    state["mlflow_run_id"] = "f" * 32
    torch.save(state, folder / "checkpoint.pt")
    client.set_tag(run_id, "output_dir", str(folder))
    try:
        with pytest.raises(CheckpointError, match=f"belongs to MLflow run {'f' * 32}, not {run_id}"):
            find_run_checkpoint(run_id, uri)
    finally:
        client.set_tag(run_id, "output_dir", str(ckpt.parent))


def torch_load(path):
    import torch

    return torch.load(path, map_location="cpu", weights_only=True)


def test_empty_renders_missing_mp4_and_depth_bar_are_said(caplog, tmp_path, monkeypatch):
    """What the evaluation media tell a user: an all-background render is called empty (an early
    checkpoint, not a broken file), a missing imageio-ffmpeg is named instead of silently writing
    no MP4, and depth grids carry a bar that says which shade is near, far or no hit."""
    import builtins

    import numpy as np
    import torch

    from grafccsr.evaluation import media
    from grafccsr.imaging import with_depth_bar

    cfg = load_config(["+exp=smoke", "tracking=none"])
    with caplog.at_level("WARNING", logger="grafccsr.eval"):
        assert media.warn_if_empty(torch.zeros(2, 3, 8, 8, dtype=torch.uint8), cfg, "grid")
        assert not media.warn_if_empty(torch.full((2, 3, 8, 8), 90, dtype=torch.uint8), cfg, "grid")
    assert [r.getMessage() for r in caplog.records].count(
        "the grid renders are empty: every pixel is the background (the generator renders no object from these "
        "poses yet)") == 1
    real_import = builtins.__import__

    def no_ffmpeg(name, *args, **kwargs):
        if name.startswith("imageio"):
            raise ImportError(name)
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_ffmpeg)
    caplog.clear()
    with caplog.at_level("WARNING", logger="grafccsr.eval"):
        files = media.write_video(torch.zeros(4, 3, 8, 8, dtype=torch.uint8), 2, 2, tmp_path / "rotation", 10, 1)
    assert [f.name for f in files] == ["rotation.gif"]
    assert "no rotation.mp4: imageio-ffmpeg is not installed" in caplog.text
    grid = np.zeros((40, 200, 3), dtype=np.uint8)
    bar = with_depth_bar(grid, 1.5, 4.5)
    assert bar.shape[0] > grid.shape[0] and bar.shape[1] == 200
    strip = bar[grid.shape[0] + 5, 30:190, 0].astype(int)
    assert strip[0] < 60 and strip[-1] > 240 and (np.diff(strip) >= 0).all()  # far dark -> near bright
