"""Rendering a checkpoint for people: a 360-degree rotation, an elevation sweep and a
multi-view grid per class, as upscaled, labelled GIF/MP4/PNG files."""

from __future__ import annotations

import logging
import sys
from pathlib import Path
from typing import List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F

from grafccsr.evaluation.checkpoint import EvalModel
from grafccsr.imaging import (image_grid, labelled_grid, save_gif, save_mp4, save_png, to_uint8, upscale_nearest,
                              with_depth_bar)
from grafccsr.models import RenderSettings, render_views

log = logging.getLogger("grafccsr.eval")


def depth_to_uint8(depth: torch.Tensor, near: float, far: float, size: int) -> torch.Tensor:
    """Depth (N, 1, h, w) -> uint8 (N, 1, size, size): near bright, far dark, empty black.

    The renderer's depth is the expected ray distance with empty space counting 0, so a value
    below ``near`` means (mostly) nothing was hit: it is drawn black.
    """
    depth = depth.float()
    scaled = ((far - depth) / max(far - near, 1e-6)).clamp(0, 1)
    scaled = torch.where(depth >= near, 0.1 + 0.9 * scaled, torch.zeros_like(scaled))
    if scaled.shape[-1] != size:
        scaled = F.interpolate(scaled, size=(size, size), mode="nearest")
    return (scaled * 255).round().to(torch.uint8)


def render_poses(model: EvalModel, z: torch.Tensor, class_idx: torch.Tensor, u: torch.Tensor, v: torch.Tensor, *,
                 resolution: int, depth: bool, desc: str) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """N views as uint8 RGB (N, 3, R, R) and, with ``depth``, uint8 depth (N, 1, R, R)."""
    from tqdm import tqdm

    cfg, device = model.cfg, model.device
    settings = RenderSettings.from_config(cfg)
    n, step = z.shape[0], max(1, int(cfg.eval.batch_size))
    rgb = torch.empty(n, 3, resolution, resolution, dtype=torch.uint8)
    dep = torch.empty(n, 1, resolution, resolution, dtype=torch.uint8) if depth else None
    with tqdm(total=n, desc=desc, unit="img", file=sys.stderr, disable=None) as bar:
        for start in range(0, n, step):
            sl = slice(start, min(n, start + step))
            out = render_views(model.generator, settings, z[sl].to(device), class_idx[sl].to(device),
                               u[sl].to(device), v[sl].to(device), image_size=resolution, batch_size=step,
                               to_cpu=cfg.memory.eval_to_cpu, return_depth=depth)
            images, depths = out if depth else (out, None)
            rgb[sl] = to_uint8(images).cpu()
            if dep is not None:
                dep[sl] = depth_to_uint8(depths.cpu(), cfg.camera.near, cfg.camera.far, resolution)
            bar.update(sl.stop - sl.start)
    warn_if_empty(rgb, cfg, desc)
    return rgb, dep


def class_codes(model: EvalModel, seed: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """One latent code per class (seeded) and the class indices."""
    gen = torch.Generator(device="cpu").manual_seed(int(seed))
    return model.generator.sample_z(model.num_classes, "cpu", generator=gen), torch.arange(model.num_classes)


def elevation_range(model: EvalModel) -> Tuple[float, float]:
    """The ``v`` range the model was trained on (data elevations and random poses)."""
    cfg = model.cfg
    values = list(cfg.data.elevation_v) + list(cfg.model.pose.v_range)
    low, high = min(values), max(values)
    if high - low < 1e-6:
        low, high = max(0.0, low - 0.1), min(1.0, high + 0.1)
    return low, high


def _frames(images: torch.Tensor, frames: int, per_frame: int, scale: int):
    """(frames * per_frame, C, H, W) uint8 -> one tiled (upscaled) array per frame."""
    return [image_grid(upscale_nearest(images[f * per_frame:(f + 1) * per_frame], scale), min(per_frame, 8))
            for f in range(frames)]


def write_video(images: torch.Tensor, frames: int, per_frame: int, path: Path, fps: int, scale: int) -> List[Path]:
    """A GIF (and an MP4 when imageio-ffmpeg is installed) of ``frames`` tiles."""
    tiles = _frames(images, frames, per_frame, scale)
    files = [save_gif(tiles, path.with_suffix(".gif"), fps)]
    mp4 = save_mp4(tiles, path.with_suffix(".mp4"), fps)
    if mp4 is None:
        log.warning("no %s.mp4: imageio-ffmpeg is not installed (pip install imageio imageio-ffmpeg); "
                    "the GIF has the same frames", path.name)
    return files + ([mp4] if mp4 else [])


def warn_if_empty(rgb: torch.Tensor, cfg, what: str) -> bool:
    """Warn (one line) when every pixel of the uint8 renders ``rgb`` (N, 3, R, R) is the
    renderer's background (black, or white with ``model.render.white_background``) within
    ``data.foreground_tolerance``: the generator renders nothing there yet (an early checkpoint),
    not a broken file. True when empty."""
    background = 255 if cfg.model.render.white_background else 0
    tolerance = max(1, round(255 * cfg.data.foreground_tolerance))
    empty = bool(((rgb.int() - background).abs() <= tolerance).all())
    if empty:
        log.warning("the %s renders are empty: every pixel is the background (the generator renders no object "
                    "from these poses yet)", what)
    return empty


def rotation(model: EvalModel, out_dir: Path, *, frames: int, elevation_v: float, depth: bool, fps: int, scale: int,
             seed: int, resolution: int) -> List[Path]:
    """Every class turning through 360 degrees at ``elevation_v``."""
    z, cls = class_codes(model, seed)
    k = model.num_classes
    u = torch.arange(frames).float().div(frames).repeat_interleave(k)
    v = torch.full_like(u, elevation_v)
    rgb, dep = render_poses(model, z.repeat(frames, 1), cls.repeat(frames), u, v, resolution=resolution,
                            depth=depth, desc="rotation")
    files = write_video(rgb, frames, k, out_dir / "rotation", fps, scale)
    if dep is not None:
        files += write_video(dep, frames, k, out_dir / "rotation_depth", fps, scale)
    return files


def elevation_sweep(model: EvalModel, out_dir: Path, *, frames: int, azimuth_u: float, fps: int, scale: int,
                    seed: int, resolution: int) -> List[Path]:
    """Every class seen from the lowest to the highest trained elevation and back."""
    z, cls = class_codes(model, seed)
    low, high = elevation_range(model)
    half = max(1, frames // 2)
    up = torch.linspace(low, high, half + 1)
    down = torch.linspace(high, low, frames - half + 1)[1:-1]
    vs = torch.cat((up, down)) if frames > 2 else up[:frames]
    k = model.num_classes
    v = vs.repeat_interleave(k)
    u = torch.full_like(v, azimuth_u)
    rgb, _ = render_poses(model, z.repeat(vs.shape[0], 1), cls.repeat(vs.shape[0]), u, v, resolution=resolution,
                          depth=False, desc="elevation")
    return write_video(rgb, vs.shape[0], k, out_dir / "elevation", fps, scale)


def view_grid(model: EvalModel, out_dir: Path, *, views: int, elevation_v: float, depth: bool, scale: int, seed: int,
              resolution: int) -> List[Path]:
    """One row per class (named), ``views`` azimuths (labelled in degrees) at ``elevation_v``."""
    z, cls = class_codes(model, seed)
    k = model.num_classes
    u = torch.arange(views).float().div(views).repeat(k)
    v = torch.full_like(u, elevation_v)
    rgb, dep = render_poses(model, z.repeat_interleave(views, 0), cls.repeat_interleave(views), u, v,
                            resolution=resolution, depth=depth, desc="grid")
    azimuths = [f"{round(360 * i / views)}°" for i in range(views)]
    files = []
    for name, images in (("grid.png", rgb), ("depth_grid.png", dep)):
        if images is None:
            continue
        grid = labelled_grid(image_grid(upscale_nearest(images, scale), views), _labels(model.class_names), azimuths,
                             resolution * scale)
        if name == "depth_grid.png":
            grid = with_depth_bar(grid, model.cfg.camera.near, model.cfg.camera.far)
        files.append(save_png(grid, out_dir / name))
    return files


def _labels(names: Sequence[str]) -> List[str]:
    return [name if len(name) <= 18 else name[:15] + "..." for name in names]
