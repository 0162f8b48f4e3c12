"""Evaluate a training checkpoint: FID/KID, a 360-degree rotation, an elevation
sweep and a multi-view grid per class.

    python -m grafccsr.eval ckpt=runs/smoke/2026-01-01_00-00-00/checkpoint.pt
    python -m grafccsr.eval run_id=<MLflow run id> tracking.uri=sqlite:///mlflow.db
    python -m grafccsr.eval --help

The model and data config come from the checkpoint; command-line overrides of
``eval.*``, ``memory.*``, ``tracking.*``, ``train.device`` and ``data.root`` apply on
top (Hydra's ``key=value`` syntax). Everything is written to one output folder
(default ``<checkpoint folder>/eval-<timestamp>/``) and, when the checkpoint
belongs to an MLflow run, logged to that run: metrics ``eval/fid``,
``eval/kid_mean``, ``eval/kid_std`` at step = the checkpoint's iteration, tag
``fid_extractor``, and the files as artifacts under ``eval/<folder name>/``.
"""

from __future__ import annotations

import json
import math
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

USAGE = """\
usage: python -m grafccsr.eval (ckpt=PATH | run_id=MLFLOW_RUN_ID) [OPTION=VALUE ...] [OVERRIDE ...]

Evaluate a grafccsr training checkpoint (its EMA generator, else the raw one).

what to evaluate:
  ckpt=PATH            checkpoint file, or a run folder holding checkpoint.pt
  run_id=ID            MLflow run id of a training run; its checkpoint is found through
                       the run's `output_dir` tag (or param). Uses tracking.uri (default
                       sqlite:///<project>/mlflow.db)
  best=BOOL            take best.pt instead of checkpoint.pt from a run folder/run id [false]

options:
  what=LIST            comma list of metrics,rotation,elevation,grid [all of them]
  frames=N             frames of the 360-degree rotation GIF [60]
  elevation_v=V        elevation of the rotation and the grid, v in [0, 1]; 0.5 = equator [0.5]
  elevation_frames=N   frames of the elevation sweep GIF (up and back down) [30]
  azimuth_u=U          azimuth of the elevation sweep, u = degrees / 360 [0.0]
  views=N              azimuths per class in the multi-view grid [8]
  depth=BOOL           also write depth maps (grid PNG and rotation GIF) [false]
  fps=N                frame rate of the GIFs [20]
  seed=N               seed of the latent codes and of the FID/KID poses [0]
  out=DIR              output folder [<checkpoint folder>/eval-<timestamp>]
                       (hydra.run.dir=DIR is accepted as the same thing)

overrides (Hydra key=value, applied over the checkpoint's stored config):
  eval.*               e.g. eval.num_samples=1000 eval.extractor=inception-v3-compat
                       eval.weights_path=/path/weights-inception-2015-12-05-6726825d.pth
  memory.*             e.g. memory.render_chunk=4096 memory.eval_to_cpu=true
  tracking.*           e.g. tracking.uri=sqlite:///mlflow.db tracking.backend=none (no logging)
  train.device=DEV     auto | cpu | cuda | cuda:N
  data.root=DIR        where the dataset lives on this machine

Outputs: metrics.json, rotation.gif, elevation.gif, grid.png (+ depth_grid.png,
rotation_depth.gif with depth=true), all logged to the checkpoint's MLflow run.
"""

ALLOWED_OVERRIDE_PREFIXES = ("eval.", "memory.", "tracking.")
ALLOWED_OVERRIDE_KEYS = ("train.device", "data.root")
WHAT_CHOICES = ("metrics", "rotation", "elevation", "grid")


class UsageError(ValueError):
    """A command-line argument is malformed or not allowed."""


@dataclass
class EvalArgs:
    ckpt: Optional[str] = None
    run_id: Optional[str] = None
    best: bool = False
    what: Tuple[str, ...] = WHAT_CHOICES
    frames: int = 60
    elevation_v: float = 0.5
    elevation_frames: int = 30
    azimuth_u: float = 0.0
    views: int = 8
    depth: bool = False
    fps: int = 20
    seed: int = 0
    out: Optional[str] = None
    overrides: List[str] = field(default_factory=list)


def _parse_bool(key: str, value: str) -> bool:
    lowered = value.strip().lower()
    if lowered in ("true", "1", "yes", "on"):
        return True
    if lowered in ("false", "0", "no", "off"):
        return False
    raise UsageError(f"{key}={value!r} must be true or false")


def _parse_number(key: str, value: str, kind: type, low: float, high: float = math.inf):
    try:
        number = kind(value)
    except ValueError:
        raise UsageError(f"{key}={value!r} must be {'an integer' if kind is int else 'a number'}") from None
    if not low <= number <= high:
        bounds = f">= {low}" if high == math.inf else f"in [{low}, {high}]"
        raise UsageError(f"{key}={value!r} must be {bounds}")
    return number


def parse_args(argv: Sequence[str]) -> EvalArgs:
    """Split ``key=value`` arguments into this CLI's options and config overrides."""
    args = EvalArgs()
    for raw in argv:
        if "=" not in raw:
            raise UsageError(f"argument {raw!r} is not key=value (see --help)")
        key, value = raw.split("=", 1)
        key = key.strip()
        if key == "ckpt":
            args.ckpt = value
        elif key == "run_id":
            args.run_id = value
        elif key == "best":
            args.best = _parse_bool(key, value)
        elif key == "what":
            items = tuple(dict.fromkeys(w.strip() for w in value.split(",") if w.strip()))
            bad = [w for w in items if w not in WHAT_CHOICES]
            if bad or not items:
                raise UsageError(f"what={value!r}: choose a comma list of {', '.join(WHAT_CHOICES)}")
            args.what = items
        elif key in ("frames", "elevation_frames", "views", "fps"):
            setattr(args, key, _parse_number(key, value, int, 1))
        elif key == "seed":
            args.seed = _parse_number(key, value, int, 0)
        elif key in ("elevation_v", "azimuth_u"):
            setattr(args, key, _parse_number(key, value, float, 0.0, 1.0))
        elif key == "depth":
            args.depth = _parse_bool(key, value)
        elif key in ("out", "hydra.run.dir"):
            args.out = value
        elif key.startswith(ALLOWED_OVERRIDE_PREFIXES) or key in ALLOWED_OVERRIDE_KEYS:
            args.overrides.append(f"{key}={value}")
        else:
            raise UsageError(
                f"{key!r} cannot be set here: the model and data config come from the checkpoint. "
                f"Allowed overrides: {', '.join(p + '*' for p in ALLOWED_OVERRIDE_PREFIXES)}, "
                f"{', '.join(ALLOWED_OVERRIDE_KEYS)} (see --help)"
            )
    if bool(args.ckpt) == bool(args.run_id):
        raise UsageError("give exactly one of ckpt=PATH or run_id=MLFLOW_RUN_ID (see --help)")
    return args


def _override_value(overrides: Sequence[str], key: str) -> Optional[str]:
    value = None
    for item in overrides:
        k, v = item.split("=", 1)
        if k == key:
            value = v
    return value


# --------------------------------------------------------------------------- checkpoint and config


def find_run_checkpoint(run_id: str, uri: str, best: bool = False) -> Path:
    """The checkpoint of an MLflow training run, from its ``output_dir`` tag or param."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    try:
        run = client.get_run(run_id)
    except Exception as err:
        raise UsageError(f"run_id={run_id}: no such run in {uri} ({err})") from None
    output_dir = run.data.tags.get("output_dir") or run.data.params.get("output_dir")
    if not output_dir:
        raise UsageError(f"run {run_id} has no output_dir tag or param: pass ckpt=PATH instead")
    path = Path(output_dir) / ("best.pt" if best else "checkpoint.pt")
    if not path.is_file():
        raise UsageError(f"run {run_id}: no checkpoint at {path}")
    return path


def resolve_checkpoint_path(ckpt: str, best: bool = False) -> Path:
    path = Path(ckpt).expanduser()
    if path.is_dir():
        path = path / ("best.pt" if best else "checkpoint.pt")
    if not path.is_file():
        raise UsageError(f"ckpt={ckpt!r}: no checkpoint at {path}")
    return path


def config_from_checkpoint(stored: Dict[str, Any], overrides: Sequence[str]):
    """The checkpoint's stored config with ``overrides`` on top, validated."""
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    from grafccsr.config import Config, to_config

    try:
        base = OmegaConf.merge(OmegaConf.structured(Config), stored)
        merged = OmegaConf.merge(base, OmegaConf.from_dotlist(list(overrides))) if overrides else base
    except OmegaConfBaseException as err:
        raise UsageError(f"invalid override: {err}") from None
    return to_config(merged)


def resolve_device(name: str):
    import torch

    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


# --------------------------------------------------------------------------- image files


def tile(images, ncol: int, padding: int = 2):
    """uint8 (N, C, H, W) -> (H', W', C) numpy array, ``ncol`` images per row."""
    import numpy as np

    pixels = images.permute(0, 2, 3, 1).numpy()
    n, h, w, c = pixels.shape
    ncol = max(1, min(ncol, n))
    rows = (n + ncol - 1) // ncol
    grid = np.zeros((rows * (h + padding) + padding, ncol * (w + padding) + padding, c), dtype=np.uint8)
    for i in range(n):
        r, col = divmod(i, ncol)
        y, x = padding + r * (h + padding), padding + col * (w + padding)
        grid[y:y + h, x:x + w] = pixels[i]
    return grid


def _pil(array):
    from PIL import Image

    return Image.fromarray(array[..., 0] if array.shape[-1] == 1 else array)


def save_png(array, path: Path) -> Path:
    _pil(array).save(path)
    return path


def save_gif(frames: Sequence, path: Path, fps: int) -> Path:
    """Animated GIF (looping) from (H, W, C) uint8 arrays."""
    images = [_pil(frame) for frame in frames]
    images[0].save(path, save_all=True, append_images=images[1:], duration=max(1, round(1000 / fps)), loop=0)
    return path


def depth_to_uint8(depth, near: float, far: float, size: int):
    """Depth (N, 1, h, w) -> uint8 (N, 1, size, size): near bright, far dark, empty black.

    The renderer's depth is the expected ray distance with empty space counting 0,
    so a value below ``near`` means (mostly) nothing was hit: it is drawn black.
    """
    import torch
    import torch.nn.functional as F

    depth = depth.float()
    scaled = ((far - depth) / max(far - near, 1e-6)).clamp(0, 1)
    scaled = torch.where(depth >= near, 0.1 + 0.9 * scaled, torch.zeros_like(scaled))
    if scaled.shape[-1] != size:
        scaled = F.interpolate(scaled, size=(size, size), mode="nearest")
    return (scaled * 255).round().to(torch.uint8)


# --------------------------------------------------------------------------- rendering


def render_poses(generator, cfg, device, z, class_idx, u, v, *, resolution: int, depth: bool, desc: str):
    """Render N views (uint8 RGB (N, 3, R, R) and optional uint8 depth) with a progress bar."""
    import torch
    from tqdm import tqdm

    from grafccsr.metrics.fidelity import to_uint8
    from grafccsr.models.views import render_views

    n = z.shape[0]
    step = max(1, int(cfg.eval.batch_size))
    rgb = torch.empty(n, 3, resolution, resolution, dtype=torch.uint8)
    dep = torch.empty(n, 1, resolution, resolution, dtype=torch.uint8) if depth else None
    cam = cfg.data.camera
    with tqdm(total=n, desc=desc, unit="img", file=sys.stderr) as bar:
        for start in range(0, n, step):
            sl = slice(start, min(n, start + step))
            out = render_views(
                generator, z[sl].to(device), class_idx[sl].to(device), u[sl].to(device), v[sl].to(device),
                radius=cam.radius, image_size=resolution, ccsr_mode=cfg.model.ccsr.mode,
                ccsr_scale=cfg.model.ccsr.scale, batch_size=step, render_chunk=cfg.memory.render_chunk,
                no_grad_segment_points=cfg.memory.no_grad_segment_points,
                to_cpu=cfg.memory.eval_to_cpu, return_depth=depth,
            )
            images, depths = out if depth else (out, None)
            rgb[sl] = to_uint8(images).cpu()
            if depth:
                dep[sl] = depth_to_uint8(depths.cpu(), cam.near, cam.far, resolution)
            bar.update(sl.stop - sl.start)
    return rgb, dep


def _class_codes(generator, num_classes: int, seed: int):
    import torch

    gen = torch.Generator(device="cpu").manual_seed(int(seed))
    return generator.sample_z(num_classes, "cpu", generator=gen), torch.arange(num_classes)


def _sweep_frames(rgb, frames: int, per_frame: int):
    """(frames * per_frame, C, H, W) -> one tiled array per frame."""
    ncol = min(per_frame, 8)
    return [tile(rgb[f * per_frame:(f + 1) * per_frame], ncol) for f in range(frames)]


def elevation_range(cfg) -> Tuple[float, float]:
    values = list(cfg.data.elevation_v) + list(cfg.model.pose.v_range)
    low, high = min(values), max(values)
    if high - low < 1e-6:
        low, high = max(0.0, low - 0.1), min(1.0, high + 0.1)
    return low, high


# --------------------------------------------------------------------------- main


def run(args: EvalArgs) -> Dict[str, Any]:
    """Evaluate per ``args``; returns {"output_dir", "files", "metrics"}."""
    from grafccsr.tracking.mlflow import resolve_uri

    cli_uri = _override_value(args.overrides, "tracking.uri")
    if args.run_id:
        uri = resolve_uri(cli_uri)
        ckpt_path = find_run_checkpoint(args.run_id, uri, args.best)
    else:
        ckpt_path = resolve_checkpoint_path(args.ckpt, args.best)
        uri = None
    print(f"checkpoint: {ckpt_path}", file=sys.stderr)

    import torch

    from grafccsr.metrics import EXTRACTOR_TAG
    from grafccsr.metrics.fidelity import eval_resolution, inception_weights_path
    from grafccsr.models import build_models
    try:
        ckpt = torch.load(ckpt_path, map_location="cpu", weights_only=False)
    except Exception as err:
        raise UsageError(f"could not read checkpoint {ckpt_path}: {err}") from None
    if not isinstance(ckpt, dict) or "config" not in ckpt or "step" not in ckpt:
        raise UsageError(f"{ckpt_path} is not a grafccsr training checkpoint (no config/step)")
    cfg = config_from_checkpoint(ckpt["config"], args.overrides)
    if "metrics" in args.what and cfg.eval.extractor == "inception-v3-compat":
        inception_weights_path(cfg.eval.weights_path)  # fail before any rendering

    run_id = args.run_id or ckpt.get("mlflow_run_id")
    if uri is None:
        uri = cli_uri or ckpt.get("tracking_uri") or resolve_uri(cfg.tracking.uri)
    log_to_mlflow = bool(run_id) and cfg.tracking.backend == "mlflow"
    iteration = int(ckpt.get("iteration", 0))

    out_dir = Path(args.out).expanduser() if args.out else \
        ckpt_path.parent / f"eval-{time.strftime('%Y-%m-%d_%H-%M-%S')}"
    out_dir.mkdir(parents=True, exist_ok=True)

    device = resolve_device(cfg.train.device)
    num_classes = int(ckpt.get("num_classes") or 0)
    if num_classes <= 0:
        raise UsageError(f"{ckpt_path} does not record num_classes")
    generator, _ = build_models(cfg, num_classes)
    state = ckpt["step"].get("generator_ema") or ckpt["step"]["generator"]
    source = "generator_ema" if ckpt["step"].get("generator_ema") else "generator"
    generator.load_state_dict(state)
    generator.to(device).eval().requires_grad_(False)
    print(f"model: {source} at iteration {iteration}, {num_classes} classes, device {device}", file=sys.stderr)

    resolution = eval_resolution(cfg)
    files: List[Path] = []
    metrics: Optional[Dict[str, Any]] = None
    z_cls, cls = _class_codes(generator, num_classes, args.seed)

    if "metrics" in args.what:
        from grafccsr.data import build_dataset
        from grafccsr.metrics import evaluate_generator

        dataset = build_dataset(cfg.data)
        if dataset.num_classes != num_classes:
            raise UsageError(f"the dataset has {dataset.num_classes} classes, the checkpoint {num_classes}")
        t0 = time.perf_counter()
        metrics = evaluate_generator(generator, dataset, cfg, device, seed=args.seed, progress=True)
        summary = {
            **metrics,
            "seconds": round(time.perf_counter() - t0, 3),
            "iteration": iteration,
            "checkpoint": str(ckpt_path.resolve()),
            "model": source,
            "mlflow_run_id": run_id,
            "seed": args.seed,
            "kid_subsets_requested": cfg.eval.kid_subsets,
            "weights_path": cfg.eval.weights_path,
            "note": "random-features: seeded random CNN features, NOT comparable with published (Inception) FIDs"
            if metrics["extractor"] == "random-features" else "torch-fidelity inception-v3-compat features",
        }
        path = out_dir / "metrics.json"
        path.write_text(json.dumps(summary, indent=2, sort_keys=True))
        files.append(path)
        print(f"FID {metrics['fid']:.4f}  KID {metrics['kid_mean']:.5f} +- {metrics['kid_std']:.5f}  "
              f"({metrics['extractor']}, {metrics['num_samples']} fakes at {resolution}px)")

    if "rotation" in args.what:
        frames = args.frames
        u = torch.arange(frames).float().div(frames).repeat_interleave(num_classes)
        v = torch.full_like(u, args.elevation_v)
        rgb, dep = render_poses(generator, cfg, device, z_cls.repeat(frames, 1), cls.repeat(frames), u, v,
                                resolution=resolution, depth=args.depth, desc="rotation")
        files.append(save_gif(_sweep_frames(rgb, frames, num_classes), out_dir / "rotation.gif", args.fps))
        if dep is not None:
            files.append(save_gif(_sweep_frames(dep, frames, num_classes), out_dir / "rotation_depth.gif", args.fps))

    if "elevation" in args.what:
        low, high = elevation_range(cfg)
        half = max(1, args.elevation_frames // 2)
        up = torch.linspace(low, high, half + 1)
        down = torch.linspace(high, low, args.elevation_frames - half + 1)[1:-1]
        vs = torch.cat((up, down)) if args.elevation_frames > 2 else up[: args.elevation_frames]
        frames = vs.shape[0]
        v = vs.repeat_interleave(num_classes)
        u = torch.full_like(v, args.azimuth_u)
        rgb, _ = render_poses(generator, cfg, device, z_cls.repeat(frames, 1), cls.repeat(frames), u, v,
                              resolution=resolution, depth=False, desc="elevation")
        files.append(save_gif(_sweep_frames(rgb, frames, num_classes), out_dir / "elevation.gif", args.fps))

    if "grid" in args.what:
        views = args.views
        u = torch.arange(views).float().div(views).repeat(num_classes)
        v = torch.full_like(u, args.elevation_v)
        rgb, dep = render_poses(generator, cfg, device, z_cls.repeat_interleave(views, 0),
                                cls.repeat_interleave(views), u, v,
                                resolution=resolution, depth=args.depth, desc="grid")
        files.append(save_png(tile(rgb, views), out_dir / "grid.png"))
        if dep is not None:
            files.append(save_png(tile(dep, views), out_dir / "depth_grid.png"))

    if log_to_mlflow:
        _log_to_mlflow(uri, run_id, out_dir, files, metrics, iteration, EXTRACTOR_TAG)
    else:
        reason = "tracking.backend=none" if run_id else "the checkpoint has no MLflow run"
        print(f"not logged to MLflow ({reason})", file=sys.stderr)

    for path in files:
        print(path)
    return {"output_dir": out_dir, "files": files, "metrics": metrics}


def _log_to_mlflow(uri: str, run_id: str, out_dir: Path, files: Sequence[Path], metrics, iteration: int,
                   tag: str) -> None:
    from mlflow.entities import Metric
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    try:
        if metrics is not None:
            now = int(time.time() * 1000)
            values = [Metric(f"eval/{k}", float(metrics[k]), now, iteration)
                      for k in ("fid", "kid_mean", "kid_std") if math.isfinite(float(metrics[k]))]
            client.log_batch(run_id, metrics=values, synchronous=True)
            client.set_tag(run_id, tag, metrics["extractor"])
        for path in files:
            client.log_artifact(run_id, str(path), f"eval/{out_dir.name}")
    except Exception as err:  # the results are on disk; a store problem must not lose them
        print(f"warning: could not log to MLflow run {run_id} at {uri}: {err}", file=sys.stderr)
        return
    print(f"logged to MLflow run {run_id} ({uri}), artifacts under eval/{out_dir.name}/", file=sys.stderr)


def main(argv: Optional[Sequence[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or any(a in ("-h", "--help", "help") for a in argv):
        print(USAGE)
        return 0 if argv else 2
    from grafccsr.config import ConfigError  # ExtractorWeightsError is a ConfigError
    from grafccsr.data.errors import DatasetError

    try:
        args = parse_args(argv)
        run(args)
    except (UsageError, ConfigError, DatasetError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
