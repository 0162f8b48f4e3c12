"""Image grids as PNG files (no torchvision import needed)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image


def to_uint8(images: torch.Tensor) -> torch.Tensor:
    """(N, 3, H, W) in [-1, 1] -> uint8 in [0, 255]."""
    return ((images.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)


def image_grid(images: torch.Tensor, nrow: int, padding: int = 2) -> np.ndarray:
    """Tile (N, 3, H, W) images in [-1, 1] into one (H', W', 3) uint8 array, ``nrow`` per row."""
    pixels = to_uint8(images.detach().cpu()).permute(0, 2, 3, 1).numpy()
    n, h, w, _ = pixels.shape
    rows = (n + nrow - 1) // nrow
    grid = np.zeros((rows * (h + padding) + padding, nrow * (w + padding) + padding, 3), dtype=np.uint8)
    for i in range(n):
        r, c = divmod(i, nrow)
        y, x = padding + r * (h + padding), padding + c * (w + padding)
        grid[y:y + h, x:x + w] = pixels[i]
    return grid


def save_image_grid(images: torch.Tensor, path: Path, nrow: int) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(image_grid(images, nrow)).save(path)
    return path
