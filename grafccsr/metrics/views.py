"""Pose-matched metrics: the generator rendered at each held-out view's pose, against that view.

FID/KID compare two distributions of images; they cannot see a generator that renders the right
specimen from the wrong angle. For data whose classes are single objects (``data.single_object``)
with views held out of training (``data.holdout``), this module renders the (EMA) generator as a
whole image at the pose of every held-out view, for the view's class, with ``eval.view_codes``
seeded latent codes (the same codes for every view), and scores each render against the real
view:

* PSNR in dB on [0, 1] RGB (``10 log10(1 / MSE)``, MSE floored at 1e-10);
* SSIM by torchmetrics (Wang et al. 2004: an 11 x 11 Gaussian window of sigma 1.5, K1 0.01,
  K2 0.03, data range 1), averaged over the RGB channels and the pixels whose window lies inside
  the image (the reference definition; :func:`ssim`);
* silhouette IoU: rendered opacity ``acc`` > ``eval.view_opacity_threshold`` against the real
  view's foreground, the pixels where some channel differs from ``data.background`` by more than
  ``data.foreground_tolerance`` (both in [0, 1]); an empty union counts as IoU 1.

Per class, each score is averaged over the class's held-out views and the codes
(``view_psnr/<class>``), and over the views for the class's best code, the code with the highest
mean PSNR there (``view_psnr_best/<class>``; its SSIM and IoU are the same code's). The overall
values (``view_psnr``, ``view_psnr_best``, ...) are the means over classes. Renders are at the
data's image size (the real views' own); CCSR ``discriminator`` models render at image size /
scale and super-resolve, as their samples do, with the opacity upsampled (nearest).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from grafccsr.camera import full_grid
from grafccsr.config import Config
from grafccsr.imaging import image_grid, labelled_grid, save_png, to_uint8, upscale_nearest
from grafccsr.metrics.keys import VIEW_METRICS, view_key
from grafccsr.models.render import RenderSettings

CODE_SEED_OFFSET = 2
"""The codes are drawn with seed + this (FID/KID's fakes use seed and seed + 1)."""
PSNR_MSE_FLOOR = 1e-10
"""A pixel-exact render scores 100 dB, not infinity."""
SSIM_WINDOW = 11
"""Side of SSIM's Gaussian window (sigma 1.5): torchmetrics' default, and Wang et al.'s."""


def views_enabled(cfg: Config) -> bool:
    """Whether a run with ``cfg`` computes the pose-matched metrics (single objects, views held out)."""
    return bool(cfg.data.single_object and cfg.data.holdout.enabled)


# --------------------------------------------------------------------------- per-image scores


def foreground(reals: torch.Tensor, background: Sequence[float], tolerance: float) -> torch.Tensor:
    """Bool (N, H, W): pixels of uint8 images (N, 3, H, W) where some channel differs from the
    ``background`` RGB (in [0, 1]) by more than ``tolerance``."""
    bg = torch.tensor(list(background), dtype=torch.float32, device=reals.device).view(1, 3, 1, 1)
    return ((reals.float() / 255.0 - bg).abs() > tolerance).any(dim=1)


def psnr(fakes: torch.Tensor, reals: torch.Tensor) -> torch.Tensor:
    """PSNR (N,) in dB of images in [0, 1] (N, 3, H, W) against references in [0, 1]."""
    mse = (fakes.float() - reals.float()).pow(2).flatten(1).mean(dim=1)
    return 10.0 * torch.log10(1.0 / mse.clamp(min=PSNR_MSE_FLOOR))


def ssim(fakes: torch.Tensor, reals: torch.Tensor) -> torch.Tensor:
    """SSIM (N,) of images in [0, 1] (N, 3, H, W) against references in [0, 1] (torchmetrics' map).

    Averaged over the pixels whose 11 x 11 window lies inside the image, as Wang et al.'s reference
    code and scikit-image do: torchmetrics 1.9 averages its map over the whole image, borders
    included, where it pads the images by reflection (which pulls a black-background image's score
    towards 1)."""
    from torchmetrics.functional.image import structural_similarity_index_measure

    _, full = structural_similarity_index_measure(fakes.float(), reals.float(), data_range=1.0, reduction="none",
                                                  return_full_image=True)
    border = SSIM_WINDOW // 2
    return full[..., border:-border, border:-border].flatten(1).mean(dim=1)


def iou(predicted: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """IoU (N,) of boolean masks (N, H, W); 1 where both are empty."""
    inter = (predicted & target).flatten(1).sum(dim=1).float()
    union = (predicted | target).flatten(1).sum(dim=1).float()
    return torch.where(union > 0, inter / union.clamp(min=1), torch.ones_like(union))


# --------------------------------------------------------------------------- rendering


@torch.no_grad()
def render_with_opacity(generator: torch.nn.Module, settings: RenderSettings, z: torch.Tensor,
                        class_idx: torch.Tensor, u: torch.Tensor, v: torch.Tensor, image_size: int):
    """Whole images of one batch: rgb (B, 3, S, S) in [-1, 1] and opacity (B, 1, S, S), as
    :func:`grafccsr.models.render_views` renders them (which returns no opacity)."""
    use_sr = generator.ccsr_mode == "discriminator"
    size = image_size // generator.ccsr.scale if use_sr else image_size
    batch, device = z.shape[0], z.device
    out = generator.render(z, class_idx, u, v, full_grid(size, batch, device=device), settings)
    rgb, acc = out["rgb"], out["acc"].float()
    if use_sr:
        rgb = generator.super_resolve(rgb, u, full_grid(image_size, batch, device=device))
        acc = F.interpolate(acc, size=(image_size, image_size), mode="nearest")
    return rgb.float().clamp(-1, 1), acc


# --------------------------------------------------------------------------- evaluation


@dataclass
class ViewEvaluation:
    """The pose-matched evaluation of one generator."""

    metrics: Dict[str, float]
    """``view_psnr``, ``view_psnr_best``, ... and per class ``view_psnr/<class>``, ... (:func:`view_key`)."""
    record: Dict[str, Any]
    """What was evaluated: the held-out views (``data.holdout``), codes, foreground rule, best codes."""
    classes: List[str] = field(default_factory=list)
    """The classes with held-out views; the lists below have one entry per class."""
    labels: List[List[str]] = field(default_factory=list)
    """Per class: the grid's column labels (the views' file-name stems, ``<elevPrefix>_<deg:04d>``)."""
    reals: List[torch.Tensor] = field(default_factory=list)
    """Per class: uint8 (n, 3, S, S) real held-out views of the grid."""
    renders: List[torch.Tensor] = field(default_factory=list)
    """Per class: uint8 (codes, n, 3, S, S) renders at those views."""
    best: List[int] = field(default_factory=list)
    """Per class: the index of the best code."""


def _grid_positions(count: int, columns: int) -> List[int]:
    """Up to ``columns`` positions evenly spaced over ``count`` views."""
    if count <= columns:
        return list(range(count))
    return sorted({round(i * (count - 1) / (columns - 1)) for i in range(columns)}) if columns > 1 else [0]


def _score_batches(generator, dataset, cfg: Config, device: torch.device, z: torch.Tensor, index: torch.Tensor,
                   keep: torch.Tensor, progress: bool):
    """Scores (codes, views) of each metric, and the uint8 renders (codes, kept views, 3, S, S) of
    the views in ``keep`` (in their order)."""
    codes, n = z.shape[0], index.shape[0]
    settings, size = RenderSettings.from_config(cfg), int(cfg.data.image_size)
    labels, poses = dataset.labels[index], dataset.poses[index]
    scores = {name: torch.empty(codes, n) for name in VIEW_METRICS}
    slot = torch.cumsum(keep.long(), 0) - 1  # a kept view's place in ``kept``
    kept = torch.zeros(codes, int(keep.sum()), 3, size, size, dtype=torch.uint8)
    pairs = [(j, s) for j in range(codes) for s in range(n)]  # code-major: one code's views together
    step = max(1, int(cfg.eval.batch_size))
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=len(pairs), desc="eval views", unit="img", leave=False, disable=None)
    for start in range(0, len(pairs), step):
        code_of = torch.tensor([j for j, _ in pairs[start:start + step]])
        view_of = torch.tensor([s for _, s in pairs[start:start + step]])
        rgb, acc = render_with_opacity(generator, settings, z[code_of].to(device), labels[view_of, 0].to(device),
                                       poses[view_of, 0].to(device), poses[view_of, 1].to(device), size)
        on = torch.device("cpu") if cfg.memory.eval_to_cpu else rgb.device
        fake01, acc = (rgb.to(on) + 1.0) / 2.0, acc.to(on)
        reals = dataset.images[index[view_of]].to(on)
        real01 = reals.float() / 255.0
        scores["view_psnr"][code_of, view_of] = psnr(fake01, real01).cpu()
        scores["view_ssim"][code_of, view_of] = ssim(fake01, real01).cpu()
        predicted = acc[:, 0] > cfg.eval.view_opacity_threshold
        real_fg = foreground(reals, cfg.data.background, cfg.data.foreground_tolerance)
        scores["view_iou"][code_of, view_of] = iou(predicted, real_fg).cpu()
        shown = keep[view_of]
        if shown.any():
            kept[code_of[shown], slot[view_of[shown]]] = to_uint8(rgb[shown.to(rgb.device)]).cpu()
        del rgb, acc, fake01, real01, reals
        if bar is not None:
            bar.update(int(code_of.shape[0]))
    if bar is not None:
        bar.close()
    return scores, kept


@torch.no_grad()
def evaluate_views(generator: torch.nn.Module, dataset, cfg: Config, device: torch.device | str, *, seed: int = 0,
                   progress: bool = False) -> Optional[ViewEvaluation]:
    """The pose-matched metrics of ``generator`` (pass the EMA generator) on ``dataset``'s held-out
    views, or None when ``cfg`` has none (:func:`views_enabled`) or the dataset holds none out.
    The global RNG state is left untouched (the codes come from a private seeded generator)."""
    if not views_enabled(cfg) or not bool(dataset.held_out.any()):
        return None
    device = torch.device(device)
    index = dataset.holdout_indices
    classes = dataset.labels[index, 0]
    gen = torch.Generator(device="cpu").manual_seed(int(seed) + CODE_SEED_OFFSET)
    z = generator.sample_z(int(cfg.eval.view_codes), "cpu", generator=gen)
    columns = []
    keep = torch.zeros(index.shape[0], dtype=torch.bool)
    for k in range(dataset.num_classes):
        positions = (classes == k).nonzero().flatten()
        chosen = positions[_grid_positions(positions.shape[0], cfg.eval.view_grid_columns)].tolist()
        keep[chosen] = True
        columns.append(chosen)
    was_training = generator.training
    generator.eval()
    try:
        scores, kept = _score_batches(generator, dataset, cfg, device, z, index, keep, progress)
    finally:
        generator.train(was_training)
    return _summarise(scores, kept, dataset, cfg, index, columns)


def _summarise(scores: Dict[str, torch.Tensor], kept: torch.Tensor, dataset, cfg: Config, index: torch.Tensor,
               columns: List[List[int]]) -> ViewEvaluation:
    """Per-class and overall means (over codes, and for each class's best code by PSNR) and the
    grid's images. ``kept`` holds the renders of the ``columns`` positions, in position order."""
    classes = dataset.labels[index, 0]
    prefixes = [str(p) for p in cfg.data.elevation_prefixes]
    slot = {p: i for i, p in enumerate(sorted(p for cols in columns for p in cols))}
    metrics: Dict[str, float] = {}
    per_class: Dict[str, List[float]] = {}
    result = ViewEvaluation(metrics, {})
    for k, name in enumerate(dataset.class_names):
        of_class = classes == k
        if not of_class.any():
            continue
        best = int(scores["view_psnr"][:, of_class].mean(dim=1).argmax())
        for metric, values in scores.items():
            on_class = values[:, of_class]
            for key, value in ((metric, on_class.mean()), (metric + "_best", on_class[best].mean())):
                metrics[view_key(key, name)] = float(value)
                per_class.setdefault(key, []).append(float(value))
        cols = columns[k]
        result.classes.append(name)
        result.labels.append([f"{prefixes[int(dataset.labels[index[p], 1])]}_{int(dataset.labels[index[p], 2]):04d}"
                              for p in cols])
        result.reals.append(dataset.images[index[cols]])
        result.renders.append(kept[:, [slot[p] for p in cols]])
        result.best.append(best)
    overall = {key: float(np.mean(values)) for key, values in per_class.items()}
    result.metrics = {**overall, **metrics}
    result.record = {
        **dataset.holdout_record, "codes": int(cfg.eval.view_codes), "code_seed_offset": CODE_SEED_OFFSET,
        "image_size": int(cfg.data.image_size), "opacity_threshold": float(cfg.eval.view_opacity_threshold),
        "foreground": {"background": [float(c) for c in cfg.data.background],
                       "tolerance": float(cfg.data.foreground_tolerance)},
        "best_code": dict(zip(result.classes, result.best)),
    }
    return result


# --------------------------------------------------------------------------- the grid


def views_grid(result: ViewEvaluation, scale: int = 2) -> np.ndarray:
    """One block per class: its held-out real views in a row, below them the renders at the same
    poses with the class's best code and with another (random) code; labelled, uint8 (H, W, 3)."""
    blocks = []
    for name, reals, renders, best, labels in zip(result.classes, result.reals, result.renders, result.best,
                                                  result.labels):
        other = 1 if best == 0 else 0
        rows, row_labels = [reals, renders[best]], [f"{_short(name)} real", f"best z{best}"]
        if other < renders.shape[0]:
            rows.append(renders[other])
            row_labels.append(f"z{other}")
        grid = image_grid(upscale_nearest(torch.cat(rows), scale), reals.shape[0])
        blocks.append(labelled_grid(grid, row_labels, labels, reals.shape[-1] * scale))
    width = max(b.shape[1] for b in blocks)
    return np.concatenate([np.pad(b, ((0, 4), (0, width - b.shape[1]), (0, 0))) for b in blocks], axis=0)


def save_views_grid(result: ViewEvaluation, path: Path, scale: int = 2) -> Path:
    """:func:`views_grid` as a PNG."""
    return save_png(views_grid(result, scale), path)


def _short(name: str) -> str:
    return name if len(name) <= 14 else name[:11] + "..."
