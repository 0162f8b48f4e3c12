"""Images as files: [-1, 1] tensors to uint8, grids, PNG and GIF (samples, evaluation, reports)."""

from __future__ import annotations

from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw


def to_uint8(images: torch.Tensor) -> torch.Tensor:
    """Images in [-1, 1] -> uint8 in [0, 255] (rounded, clamped)."""
    return ((images.float().clamp(-1, 1) + 1.0) * 127.5).round().to(torch.uint8)


def resize_uint8(images: torch.Tensor, size: int) -> torch.Tensor:
    """Resize uint8 (N, C, H, W) to size x size (bilinear, antialiased when shrinking)."""
    if tuple(images.shape[-2:]) == (size, size):
        return images
    out = F.interpolate(images.float(), size=(size, size), mode="bilinear", align_corners=False, antialias=True)
    return out.round().clamp(0, 255).to(torch.uint8)


def upscale_nearest(images: torch.Tensor, factor: int) -> torch.Tensor:
    """uint8 (N, C, H, W) enlarged ``factor`` x by pixel repetition (no smoothing)."""
    if factor <= 1:
        return images
    return images.repeat_interleave(factor, dim=-2).repeat_interleave(factor, dim=-1)


def image_grid(images: torch.Tensor, ncol: int, padding: int = 2) -> np.ndarray:
    """Tile uint8 (N, C, H, W) (or [-1, 1] floats) into one (H', W', C) uint8 array, ``ncol`` per row."""
    if images.dtype != torch.uint8:
        images = to_uint8(images)
    pixels = images.detach().cpu().permute(0, 2, 3, 1).numpy()
    n, h, w, c = pixels.shape
    ncol = max(1, min(ncol, n))
    rows = (n + ncol - 1) // ncol
    grid = np.zeros((rows * (h + padding) + padding, ncol * (w + padding) + padding, c), dtype=np.uint8)
    for i in range(n):
        r, col = divmod(i, ncol)
        y, x = padding + r * (h + padding), padding + col * (w + padding)
        grid[y:y + h, x:x + w] = pixels[i]
    return grid


def labelled_grid(grid: np.ndarray, row_labels: Sequence[str], col_labels: Sequence[str], cell: int,
                  padding: int = 2) -> np.ndarray:
    """``grid`` (from :func:`image_grid`, cells of ``cell`` pixels) with a label column on the
    left and a label row on top, in white on black (PIL's built-in font)."""
    image = _pil(grid if grid.shape[-1] == 3 else np.repeat(grid, 3, axis=-1))
    left = 8 + 7 * max((len(s) for s in row_labels), default=0)
    top = 16
    canvas = Image.new("RGB", (image.width + left, image.height + top))
    canvas.paste(image, (left, top))
    draw = ImageDraw.Draw(canvas)
    step = cell + padding
    for r, text in enumerate(row_labels):
        draw.text((4, top + padding + r * step + cell // 2 - 5), text, fill=(255, 255, 255))
    for c, text in enumerate(col_labels):
        draw.text((left + padding + c * step, 2), text, fill=(255, 255, 255))
    return np.asarray(canvas)


def with_depth_bar(grid: np.ndarray, near: float, far: float, height: int = 14) -> np.ndarray:
    """``grid`` (H, W, C) of depth maps drawn as in :func:`grafccsr.evaluation.media.depth_to_uint8`
    (depth ``near`` bright, ``far`` dark, nothing hit black) with a grey-scale bar under it that
    says so: its left end is ``far``, its right end ``near``, with a black "no hit" swatch first."""
    image = _pil(grid if grid.shape[-1] == 3 else np.repeat(grid, 3, axis=-1))
    width = image.width
    canvas = Image.new("RGB", (width, image.height + height + 14))
    canvas.paste(image, (0, 0))
    draw = ImageDraw.Draw(canvas)
    top, swatch = image.height + 2, 12
    draw.rectangle((2, top, 2 + swatch, top + height), fill=(0, 0, 0), outline=(128, 128, 128))
    left, right = 6 + swatch, width - 3
    for x in range(left, right + 1):
        level = int(round(255 * (0.1 + 0.9 * (x - left) / max(1, right - left))))
        draw.line((x, top, x, top + height), fill=(level, level, level))
    draw.text((2, top + height + 2), "no hit", fill=(255, 255, 255))
    draw.text((left + 40, top + height + 2), f"far {far:g}", fill=(255, 255, 255))
    label = f"near {near:g}"
    draw.text((right - 7 * len(label), top + height + 2), label, fill=(255, 255, 255))
    return np.asarray(canvas)


def _pil(array: np.ndarray) -> Image.Image:
    return Image.fromarray(array[..., 0] if array.shape[-1] == 1 else array)


def save_png(array: np.ndarray, path: Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    _pil(array).save(path)
    return path


def save_gif(frames: Sequence[np.ndarray], path: Path, fps: int) -> Path:
    """Looping animated GIF from (H, W, C) uint8 arrays."""
    images = [_pil(frame) for frame in frames]
    images[0].save(path, save_all=True, append_images=images[1:], duration=max(1, round(1000 / fps)), loop=0)
    return Path(path)


def save_mp4(frames: Sequence[np.ndarray], path: Path, fps: int) -> Optional[Path]:
    """An MP4 of the frames when ``imageio`` with its ffmpeg plugin is installed, else None."""
    try:
        import imageio.v2 as imageio  # optional: pip install imageio imageio-ffmpeg
        import imageio_ffmpeg  # noqa: F401
    except ImportError:
        return None
    # H.264 wants even sides
    frames = [f[: f.shape[0] // 2 * 2, : f.shape[1] // 2 * 2] for f in frames]
    imageio.mimwrite(path, [f if f.shape[-1] == 3 else np.repeat(f, 3, -1) for f in frames], fps=fps,
                     macro_block_size=1)
    return Path(path)
