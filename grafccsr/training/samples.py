"""The sample grid written during training: one row per class, the same latent code
turning through ``train.num_sample_views`` azimuths at the first elevation."""

from __future__ import annotations

from pathlib import Path

import torch

from grafccsr.config import Config
from grafccsr.imaging import image_grid, labelled_grid, save_png
from grafccsr.models import RenderSettings, render_views

SAMPLE_SEED = 1234
"""Seed of the sample grid's latent code: the same object in every grid of every run."""


def sample_latents(cfg: Config) -> torch.Tensor:
    return torch.randn(1, cfg.model.z_dim, generator=torch.Generator().manual_seed(SAMPLE_SEED))


def sample_grid(generator: torch.nn.Module, cfg: Config, num_classes: int, z: torch.Tensor,
                device: torch.device) -> torch.Tensor:
    """Images (classes * views, 3, S, S) in [-1, 1]: row k is class k seen from ``views``
    azimuths (one latent code ``z`` (1, z_dim), so rows show 3D consistency)."""
    views = cfg.train.num_sample_views
    u = (torch.arange(views, dtype=torch.float32) / views).repeat(num_classes)
    v = torch.full_like(u, cfg.data.elevation_v[0])
    class_idx = torch.arange(num_classes).repeat_interleave(views)
    z_all = z[:1].expand(num_classes * views, -1)
    was_training = generator.training
    generator.eval()
    try:
        return render_views(
            generator, RenderSettings.from_config(cfg), z_all.to(device), class_idx.to(device), u.to(device),
            v.to(device), image_size=cfg.data.image_size, batch_size=cfg.eval.batch_size,
            to_cpu=cfg.memory.eval_to_cpu,
        )
    finally:
        generator.train(was_training)


def save_sample_grid(images: torch.Tensor, path: Path, cfg: Config, class_names) -> Path:
    """The grid as a PNG with class names on the rows and azimuths on the columns."""
    views = cfg.train.num_sample_views
    grid = image_grid(images, ncol=views)
    azimuths = [f"{round(360 * k / views)}°" for k in range(views)]
    return save_png(labelled_grid(grid, list(class_names), azimuths, cell=images.shape[-1]), path)
