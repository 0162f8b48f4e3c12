"""The evaluation CLI: argument handling, and a smoke checkpoint evaluated end to end."""

from __future__ import annotations

import importlib.util
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

from grafccsr.config import PROJECT_ROOT, load_config
from grafccsr.eval import UsageError, config_from_checkpoint, main, parse_args

HAVE_TRAIN = importlib.util.find_spec("grafccsr.train") is not None


def run_module(module: str, *args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", module, *args], cwd=PROJECT_ROOT, capture_output=True,
                          text=True, timeout=timeout)


# ----------------------------------------------------------------------------- arguments


def test_help_works_and_is_quick():
    result = run_module("grafccsr.eval", "--help", timeout=60)
    assert result.returncode == 0
    for word in ("ckpt=", "run_id=", "frames=", "elevation_v=", "depth=", "eval.", "tracking."):
        assert word in result.stdout


def test_parse_args_splits_options_and_overrides():
    args = parse_args(["ckpt=/x/checkpoint.pt", "frames=12", "elevation_v=0.3", "depth=true", "what=grid,metrics",
                       "eval.num_samples=16", "tracking.uri=sqlite:////tmp/m.db", "memory.render_chunk=64",
                       "hydra.run.dir=/tmp/out"])
    assert args.ckpt == "/x/checkpoint.pt" and args.run_id is None
    assert (args.frames, args.elevation_v, args.depth, args.out) == (12, 0.3, True, "/tmp/out")
    assert args.what == ("grid", "metrics")
    assert args.overrides == ["eval.num_samples=16", "tracking.uri=sqlite:////tmp/m.db", "memory.render_chunk=64"]


@pytest.mark.parametrize("argv, match", [
    (["frames=10"], "exactly one of ckpt"),
    (["ckpt=a", "run_id=b"], "exactly one of ckpt"),
    (["ckpt=a", "model.z_dim=4"], "cannot be set here"),
    (["ckpt=a", "what=video"], "what="),
    (["ckpt=a", "elevation_v=2"], "elevation_v"),
    (["ckpt=a", "frames=0"], "frames"),
    (["ckpt=a", "depth=maybe"], "depth"),
    (["ckpt"], "key=value"),
])
def test_bad_arguments_are_usage_errors(argv, match):
    with pytest.raises(UsageError, match=match):
        parse_args(argv)


def test_bad_argument_exit_code_and_message(capsys):
    assert main(["ckpt=/nonexistent/checkpoint.pt"]) == 2
    assert "no checkpoint" in capsys.readouterr().err


def test_overrides_apply_over_the_stored_config():
    from dataclasses import asdict

    stored = asdict(load_config(["+exp=smoke"]))
    cfg = config_from_checkpoint(stored, ["eval.num_samples=12", "eval.kid_subset_size=6", "tracking.backend=none"])
    assert (cfg.eval.num_samples, cfg.eval.kid_subset_size, cfg.tracking.backend) == (12, 6, "none")
    assert cfg.model.z_dim == 16  # the checkpoint's model config is kept
    with pytest.raises(UsageError):
        config_from_checkpoint(stored, ["eval.num_samples=many"])
    with pytest.raises(UsageError):
        config_from_checkpoint(stored, ["eval.no_such_key=1"])


# ----------------------------------------------------------------------------- end to end


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory):
    if not HAVE_TRAIN:
        pytest.skip("grafccsr.train does not exist yet: no way to build a smoke checkpoint")
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
    code = main([f"ckpt={ckpt}", "eval.num_samples=16", "eval.kid_subset_size=8", f"eval.cache_dir={tmp}/cache",
                 "frames=4", "elevation_frames=3", "views=4", "depth=true", f"out={out}"])
    result = capsys.readouterr()
    assert code == 0, result.err[-3000:]

    from PIL import Image

    for name, frames in (("rotation.gif", 4), ("elevation.gif", 3), ("rotation_depth.gif", 4)):
        with Image.open(out / name) as gif:
            assert gif.format == "GIF" and gif.n_frames == frames, name
    num_classes = torch.load(ckpt, map_location="cpu", weights_only=False)["num_classes"]
    size = load_config(["+exp=smoke"]).data.image_size
    with Image.open(out / "grid.png") as grid:  # 4 azimuths x classes, 2px padding
        assert grid.size == (4 * (size + 2) + 2, num_classes * (size + 2) + 2)
    assert (out / "depth_grid.png").is_file()

    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["extractor"] == "random-features"
    assert metrics["num_samples"] == 16
    assert all(math.isfinite(metrics[k]) for k in ("fid", "kid_mean", "kid_std"))
    for path in ("metrics.json", "rotation.gif", "elevation.gif", "grid.png"):
        assert str(out / path) in result.out  # printed paths

    # logged to the training run: metrics at the checkpoint's iteration, tag, artifacts
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    run_id = metrics["mlflow_run_id"]
    assert run_id
    history = client.get_metric_history(run_id, "eval/fid")
    assert any(m.step == metrics["iteration"] and m.value == pytest.approx(metrics["fid"]) for m in history)
    assert client.get_run(run_id).data.tags["fid_extractor"] == "random-features"
    logged = {Path(a.path).name for a in client.list_artifacts(run_id, f"eval/{out.name}")}
    assert {"metrics.json", "rotation.gif", "elevation.gif", "grid.png"} <= logged


def test_run_id_finds_the_checkpoint(smoke_run):
    from grafccsr.eval import find_run_checkpoint

    tmp, uri, ckpt = smoke_run
    run_id = torch_load(ckpt)["mlflow_run_id"]
    assert find_run_checkpoint(run_id, uri) == ckpt
    if ckpt.with_name("best.pt").is_file():
        assert find_run_checkpoint(run_id, uri, best=True) == ckpt.with_name("best.pt")
    with pytest.raises(UsageError, match="no such run"):
        find_run_checkpoint("0" * 32, uri)


def torch_load(path):
    import torch

    return torch.load(path, map_location="cpu", weights_only=False)
