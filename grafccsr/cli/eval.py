"""``python -m grafccsr.eval (--ckpt PATH | --run-id ID) [flags] [key=value ...]``.

Evaluate a training checkpoint (its EMA generator, else the raw one): FID/KID, the pose-matched
PSNR/SSIM/silhouette IoU on the views its training held out (``data.holdout``), a 360-degree
rotation, an elevation sweep and a labelled multi-view grid per class, written to one folder
(default ``<checkpoint folder>/eval-<timestamp>/``) and logged as an MLflow child run of the
checkpoint's training run. The model and data config come from the checkpoint;
``key=value`` overrides of ``eval.*``, ``memory.*``, ``tracking.*``, ``train.device`` and
``data.root`` apply on top.
"""

from __future__ import annotations

import math
import sys
import time
from pathlib import Path
from typing import Dict, List, Optional

from grafccsr.cli.common import add_overrides, guarded, parse, parser
from grafccsr.config import ConfigError

PROG = "grafccsr.eval"
EPILOG = """examples:
  python -m grafccsr.eval --ckpt runs/default/2026-01-01_00-00-00
  python -m grafccsr.eval --run-id 0123abcd --best eval.num_samples=1000
  python -m grafccsr.eval --ckpt runs/x/checkpoint.pt --what metrics eval.extractor=inception-v3-compat \\
      eval.weights_path=/path/weights-inception-2015-12-05-6726825d.pth
outputs: metrics.json, views.png (held-out views beside renders at their poses, with data.holdout),
rotation.gif (.mp4 with imageio-ffmpeg), elevation.gif, grid.png
(+ depth_grid.png, rotation_depth.gif with --depth)"""


def build_parser():
    from grafccsr.evaluation.run import WHAT_CHOICES, EvalOptions

    d = EvalOptions()
    p = parser(f"python -m {PROG}", __doc__.split("\n\n", 1)[1], EPILOG)
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--ckpt", help="checkpoint file, or a run folder holding checkpoint.pt")
    src.add_argument("--run-id", help="MLflow run id of a training run (its checkpoint via the output_dir tag)")
    p.add_argument("--best", action="store_true", help="best.pt instead of checkpoint.pt from a folder or run")
    p.add_argument("--what", default=",".join(d.what), help=f"comma list of {', '.join(WHAT_CHOICES)} [all]")
    p.add_argument("--frames", type=int, default=d.frames, help="frames of the rotation [%(default)s]")
    p.add_argument("--elevation-v", type=float, default=d.elevation_v, help="elevation v of rotation and grid [%(default)s]")
    p.add_argument("--elevation-frames", type=int, default=d.elevation_frames, help="frames of the elevation sweep")
    p.add_argument("--azimuth-u", type=float, default=d.azimuth_u, help="azimuth u of the elevation sweep")
    p.add_argument("--views", type=int, default=d.views, help="azimuths per class in the grid [%(default)s]")
    p.add_argument("--depth", action="store_true", help="also write depth maps")
    p.add_argument("--fps", type=int, default=d.fps, help="frame rate of the videos [%(default)s]")
    p.add_argument("--scale", type=int, default=d.scale, help="nearest-neighbour upscaling of the media [%(default)s]")
    p.add_argument("--seed", type=int, default=d.seed, help="seed of the latent codes and FID/KID poses")
    p.add_argument("--out", default=None, help="output folder [<checkpoint folder>/eval-<timestamp>]")
    add_overrides(p, "eval.*, memory.*, tracking.*, train.device=..., data.root=... over the checkpoint's config")
    return p


def options(args) -> "EvalOptions":  # noqa: F821
    from grafccsr.evaluation.run import WHAT_CHOICES, EvalOptions

    what = tuple(dict.fromkeys(w.strip() for w in args.what.split(",") if w.strip()))
    if not what or any(w not in WHAT_CHOICES for w in what):
        raise ConfigError(f"--what {args.what!r}: choose a comma list of {', '.join(WHAT_CHOICES)}")
    for flag, value, low, high in (("--frames", args.frames, 1, None), ("--elevation-frames", args.elevation_frames, 1, None),
                                   ("--views", args.views, 1, None), ("--fps", args.fps, 1, None),
                                   ("--scale", args.scale, 1, 16), ("--elevation-v", args.elevation_v, 0.0, 1.0),
                                   ("--azimuth-u", args.azimuth_u, 0.0, 1.0), ("--seed", args.seed, 0, None)):
        if value < low or (high is not None and value > high):
            raise ConfigError(f"{flag} {value} must be >= {low}" + (f" and <= {high}" if high is not None else ""))
    return EvalOptions(what=what, frames=args.frames, elevation_v=args.elevation_v,
                       elevation_frames=args.elevation_frames, azimuth_u=args.azimuth_u, views=args.views,
                       depth=args.depth, fps=args.fps, scale=args.scale, seed=args.seed)


def _override(overrides: List[str], key: str) -> Optional[str]:
    values = [o.split("=", 1)[1] for o in overrides if o.startswith(key + "=")]
    return values[-1] if values else None


def logged_values(metrics: Optional[dict]) -> Dict[str, float]:
    """The evaluation's metrics under the keys a training run logs them with: ``eval/fid...``,
    ``eval/kid...`` (finite ones), ``eval/view_psnr`` and ``view_psnr/<class>``."""
    from grafccsr.metrics.keys import logged_view_key

    if metrics is None:
        return {}
    values = {f"eval/{k}": float(v) for k, v in metrics.items()
              if k.startswith(("fid", "kid")) and isinstance(v, (int, float)) and math.isfinite(float(v))}
    values.update({logged_view_key(k): v for k, v in metrics.items() if k.startswith("view_") and isinstance(v, float)})
    return values


@guarded(PROG)
def main(argv: Optional[List[str]] = None) -> int:
    from grafccsr.evaluation import evaluate, find_run_checkpoint, load_eval_model
    from grafccsr.evaluation.checkpoint import check_eval_overrides, checkpoint_in
    from grafccsr.metrics import EXTRACTOR_TAG
    from grafccsr.tracking.store import resolve_uri

    args = parse(build_parser(), sys.argv[1:] if argv is None else argv)
    opts = options(args)
    check_eval_overrides(args.overrides)
    uri_override = _override(args.overrides, "tracking.uri")
    if args.run_id:
        path, state = find_run_checkpoint(args.run_id, resolve_uri(uri_override), args.best)
    else:
        path, state = checkpoint_in(args.ckpt, args.best), None
    print(f"checkpoint: {path}", file=sys.stderr)
    model = load_eval_model(path, args.overrides, state)
    print(f"model: {model.source} at iteration {model.iteration}, {model.num_classes} classes, device {model.device}",
          file=sys.stderr)
    out_dir = Path(args.out).expanduser() if args.out else path.parent / f"eval-{time.strftime('%Y-%m-%d_%H-%M-%S')}"
    files, metrics = evaluate(model, out_dir, opts)
    if metrics is not None:
        from grafccsr.metrics import metric_key

        ext = metrics["extractor"]
        print(f"{metric_key('fid', ext)} {metrics[metric_key('fid', ext)]:.4f}  "
              f"{metric_key('kid_mean', ext)} {metrics[metric_key('kid_mean', ext)]:.5f} "
              f"+- {metrics[metric_key('kid_std', ext)]:.5f}  ({ext}, {metrics['num_samples']} fakes)")
        if "view_psnr" in metrics:
            held = metrics["view_holdout"]
            print(f"held-out views: view_psnr {metrics['view_psnr']:.2f} dB (best code {metrics['view_psnr_best']:.2f})"
                  f"  view_ssim {metrics['view_ssim']:.3f}  view_iou {metrics['view_iou']:.3f}  "
                  f"({held['views']} views x {held['codes']} codes)")
    for file in files:
        print(file)
    if model.run_id and model.cfg.tracking.backend == "mlflow":
        uri = uri_override or model.tracking_uri or resolve_uri(model.cfg.tracking.uri)
        name = f"eval it{model.iteration} {out_dir.name}"
        from grafccsr.tracking.mlflow import log_evaluation  # imports mlflow

        child, url = log_evaluation(uri, model.run_id, name, model.iteration, logged_values(metrics),
                                    metrics["extractor"] if metrics is not None else None, files, EXTRACTOR_TAG)
        print(f"logged as MLflow run {child} (child of {model.run_id}): {url}", file=sys.stderr)
    else:
        reason = "tracking.backend=none" if model.run_id else "the checkpoint has no MLflow run"
        print(f"not logged to MLflow ({reason})", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
