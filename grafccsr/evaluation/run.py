"""Evaluate a checkpoint: FID/KID, pose-matched metrics on held-out views, media, and an MLflow
child run of its training run.

Results never overwrite the training run's record: they go to a child run named after the
checkpoint's iteration (``eval/<metric>`` at that step, the media as its artifacts).
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

from grafccsr.evaluation import media
from grafccsr.evaluation.checkpoint import EvalModel
from grafccsr.data import build_dataset
from grafccsr.metrics import evaluate_generator, keyed
from grafccsr.metrics.fidelity import eval_resolution, inception_weights_path
from grafccsr.metrics.views import evaluate_views, save_views_grid
from grafccsr.training.checkpoint import CheckpointError

log = logging.getLogger("grafccsr.eval")

WHAT_CHOICES = ("metrics", "rotation", "elevation", "grid")


@dataclass
class EvalOptions:
    what: Tuple[str, ...] = WHAT_CHOICES
    """Which outputs to produce."""
    frames: int = 60
    """Frames of the 360-degree rotation."""
    elevation_v: float = 0.5
    """Elevation of the rotation and the grid (v in [0, 1]; 0.5 = equator)."""
    elevation_frames: int = 30
    """Frames of the elevation sweep (up and back down)."""
    azimuth_u: float = 0.0
    """Azimuth of the elevation sweep (u = degrees / 360)."""
    views: int = 8
    """Azimuths per class in the multi-view grid."""
    depth: bool = False
    """Also write depth maps (grid and rotation)."""
    fps: int = 20
    scale: int = 4
    """Nearest-neighbour upscaling of GIF/MP4/grid pixels (renders are small)."""
    seed: int = 0
    """Seed of the latent codes and of the FID/KID poses."""


def compute_metrics(model: EvalModel, seed: int, views_png: Optional[Path] = None) -> Dict[str, Any]:
    """FID/KID of the model against its dataset (keys carry the extractor, :func:`keyed`) and, with
    held-out views (``data.holdout``), the pose-matched ``view_*`` metrics on them (their grid
    written to ``views_png`` when given)."""
    cfg = model.cfg
    dataset = build_dataset(cfg.data, cfg.camera)
    if dataset.num_classes != model.num_classes:
        raise CheckpointError(f"the dataset has {dataset.num_classes} classes, the checkpoint {model.num_classes}")
    start = time.perf_counter()
    result = evaluate_generator(model.generator, dataset, cfg, model.device, seed=seed, progress=True)
    views = evaluate_views(model.generator, dataset, cfg, model.device, seed=seed, progress=True)
    extra: Dict[str, Any] = {}
    if views is not None:
        extra = {**views.metrics, "view_holdout": views.record}
        if views_png is not None:
            extra["views_png"] = str(save_views_grid(views, views_png))
    return {**keyed(result), **extra, "seconds": round(time.perf_counter() - start, 3), "iteration": model.iteration,
            "checkpoint": str(model.path.resolve()), "model": model.source, "seed": seed,
            "mlflow_run_id": model.run_id, "kid_subsets_requested": cfg.eval.kid_subsets,
            "note": "random-features: seeded random CNN features, NOT comparable with published (Inception) FIDs"
            if result["extractor"] == "random-features" else "torch-fidelity inception-v3-compat features"}


def evaluate(model: EvalModel, out_dir: Path, opts: EvalOptions) -> Tuple[List[Path], Optional[Dict[str, Any]]]:
    """Write the chosen outputs into ``out_dir``; returns the files and the metrics (if computed)."""
    cfg = model.cfg
    if "metrics" in opts.what and cfg.eval.extractor == "inception-v3-compat":
        inception_weights_path(cfg.eval.weights_path)  # fail before any rendering
    out_dir.mkdir(parents=True, exist_ok=True)
    resolution = eval_resolution(cfg)
    files: List[Path] = []
    metrics = None
    if "metrics" in opts.what:
        metrics = compute_metrics(model, opts.seed, views_png=out_dir / "views.png")
        path = out_dir / "metrics.json"
        path.write_text(json.dumps(metrics, indent=2, sort_keys=True))
        files.append(path)
        if "views_png" in metrics:
            files.append(Path(metrics["views_png"]))
    common = dict(scale=opts.scale, seed=opts.seed, resolution=resolution)
    if "rotation" in opts.what:
        files += media.rotation(model, out_dir, frames=opts.frames, elevation_v=opts.elevation_v, depth=opts.depth,
                                fps=opts.fps, **common)
    if "elevation" in opts.what:
        files += media.elevation_sweep(model, out_dir, frames=opts.elevation_frames, azimuth_u=opts.azimuth_u,
                                       fps=opts.fps, **common)
    if "grid" in opts.what:
        files += media.view_grid(model, out_dir, views=opts.views, elevation_v=opts.elevation_v, depth=opts.depth,
                                 **common)
    return files, metrics
