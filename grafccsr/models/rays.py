"""Patch sampling: which image points a generator patch (and its real counterpart) covers.

A patch is a P x P grid of normalised image points (B, P, P, 2) in [-1, 1]
(x right, y down; ``F.grid_sample`` with ``align_corners=False``). The same grid
casts the generator's rays (:func:`grafccsr.camera.rays_from_grid`) and samples
the real image (:func:`sample_patches`), so real and fake patches show the same
region at the same resolution.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from grafccsr.camera import full_grid
from grafccsr.config import PatchConfig


class PatchSampler:
    """GRAF's multi-scale patch sampler (or graf_ccsr's whole-image thumbnail).

    ``multiscale``: per sample a scale s ~ U[s_min(it), max_scale] (the fraction of
    the image side the patch spans) and a shift keeping the patch inside the image.
    ``full``: scale 1, no shift, the P x P pixel-centre grid of the whole image.

    ``cfg.align_corners`` (GRAF's and graf_ccsr's convention): the patch's points are
    ``linspace(-1, 1, P)`` (scaled and shifted) read with ``align_corners=True`` on an image
    of ``image_size`` pixels, i.e. the outer points on the outermost pixel centres of the
    region. The grids returned stay in this module's ``align_corners=False`` convention (the
    camera's and :func:`sample_patches`'s): such a point g becomes g * (W - 1) / W, the same
    image point, so rays and real patches need nothing else.
    """

    def __init__(self, cfg: PatchConfig, image_size: int | None = None):
        side = math.isqrt(cfg.rays_per_patch)
        if side * side != cfg.rays_per_patch:
            raise ValueError(
                f"model.patch.rays_per_patch={cfg.rays_per_patch} is not a perfect square "
                f"(nearest: {side * side} or {(side + 1) ** 2})"
            )
        if cfg.sampling not in ("multiscale", "full"):
            raise ValueError(f"model.patch.sampling={cfg.sampling!r} must be 'multiscale' or 'full'")
        if cfg.align_corners and not image_size:
            raise ValueError(
                "model.patch.align_corners=true needs the image size: build PatchSampler(cfg.model.patch, "
                "image_size=cfg.data.image_size)"
            )
        self.cfg = cfg
        self.side = side
        # align_corners=True point g of a W-pixel image is the align_corners=False point g * (W-1)/W
        self._corner_factor = (image_size - 1) / image_size if cfg.align_corners else None

    def min_scale_at(self, iteration: int) -> float:
        """s_min(it) = min(min_scale_cap, max(min_scale, max_scale * exp(-scale_anneal * (it // anneal_every)))):
        GRAF's schedule, whose cap keeps patches of several scales from the first iteration."""
        c = self.cfg
        steps = iteration // c.anneal_every
        return min(c.min_scale_cap, max(c.min_scale, c.max_scale * math.exp(-c.scale_anneal * steps)))

    def sample(
        self,
        batch: int,
        iteration: int,
        device: torch.device | str,
        generator: torch.Generator | None = None,
        dtype: torch.dtype = torch.float32,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Draw patch grids (B, P, P, 2) and their scales (B,).

        ``generator`` must live on ``device``.
        """
        base = self._base_grid(device, dtype)
        if self.cfg.sampling == "full":
            grid, scale = base.expand(batch, -1, -1, -1).clone(), torch.ones(batch, device=device, dtype=dtype)
        else:
            s_min, s_max = self.min_scale_at(iteration), self.cfg.max_scale
            draws = torch.rand(batch, 3, generator=generator, device=device, dtype=dtype)
            scale = s_min + (s_max - s_min) * draws[:, 0]
            # the patch spans [shift - scale, shift + scale] per axis, so |shift| <= 1 - scale keeps it inside
            shift = (1.0 - scale)[:, None] * (2.0 * draws[:, 1:] - 1.0)
            grid = base * scale[:, None, None, None] + shift[:, None, None, :]
        if self._corner_factor is not None:
            grid = grid * self._corner_factor
        return grid, scale

    def _base_grid(self, device, dtype) -> torch.Tensor:
        """The whole-image P x P grid (1, P, P, 2): pixel-centre cells, or with ``align_corners``
        ``linspace(-1, 1, P)`` (still in align_corners=True units; see the class docstring)."""
        if self._corner_factor is None:
            return full_grid(self.side, 1, device=device, dtype=dtype)
        coords = torch.linspace(-1.0, 1.0, self.side, device=device, dtype=dtype)
        yy, xx = torch.meshgrid(coords, coords, indexing="ij")
        return torch.stack((xx, yy), dim=-1)[None]


def upsample_grid(grid: torch.Tensor, factor: int) -> torch.Tensor:
    """The grid covering the same region at ``factor`` x the density.

    grid: (B, P, P, 2) regular axis-aligned grid of cell centres (P >= 2), as made by
    :class:`PatchSampler`. Returns (B, factor*P, factor*P, 2): each point becomes a
    factor x factor block of sub-cell centres, so the new grid is again a grid of
    cell centres over the same region (``upsample_grid(full_grid(P), f) == full_grid(f*P)``).
    """
    b, rows, cols, _ = grid.shape
    spacing_x = grid[:, 0, 1, 0] - grid[:, 0, 0, 0]
    spacing_y = grid[:, 1, 0, 1] - grid[:, 0, 0, 1]
    offsets = (torch.arange(factor, device=grid.device, dtype=grid.dtype) + 0.5) / factor - 0.5
    # new point (i, k_i, j, k_j) = old point (i, j) + sub-cell offset (k_j along x, k_i along y)
    x = grid[:, :, None, :, None, 0] + spacing_x[:, None, None, None, None] * offsets[None, None, None, None, :]
    y = grid[:, :, None, :, None, 1] + spacing_y[:, None, None, None, None] * offsets[None, None, :, None, None]
    x, y = torch.broadcast_tensors(x, y)
    return torch.stack((x, y), dim=-1).reshape(b, rows * factor, cols * factor, 2)


def sample_patches(images: torch.Tensor, grid: torch.Tensor, antialias: bool = False) -> torch.Tensor:
    """Bilinearly sample images (B, 3, H, W) at grid (B, P, P, 2) -> patches (B, 3, P, P).

    With ``antialias`` the images are prefiltered like a mip-map: a pyramid of
    2x area downsamplings is sampled at every level, and each sample blends the two
    levels around log2(its grid spacing in pixels). A patch whose points lie k
    pixels apart therefore sees k x k pixel averages instead of aliased point
    samples (a coarse patch would otherwise show the D detail the generator cannot
    render at that ray density). Spacing <= 1 pixel uses the full-resolution image.
    """
    if not antialias:
        return F.grid_sample(images, grid, mode="bilinear", padding_mode="border", align_corners=False)
    height, width = images.shape[-2:]
    side = grid.shape[1]
    # the coarsest level needed: a whole-image patch has spacing W / P pixels
    num_levels = 1 + max(0, (max(height, width) // side).bit_length() - 1)
    spacing_px = torch.maximum(
        (grid[:, 0, 1, 0] - grid[:, 0, 0, 0]).abs() * (0.5 * width),
        (grid[:, 1, 0, 1] - grid[:, 0, 0, 1]).abs() * (0.5 * height),
    )
    level = torch.log2(spacing_px.clamp(min=1.0)).clamp(max=num_levels - 1)
    patches = 0.0
    level_images = images
    for k in range(num_levels):
        if k > 0:
            h, w = level_images.shape[-2:]
            level_images = F.interpolate(level_images, size=(max(1, h // 2), max(1, w // 2)), mode="area")
        weight = (1.0 - (level - k).abs()).clamp(min=0.0)  # (B,): linear blend between adjacent levels
        sampled = F.grid_sample(level_images, grid, mode="bilinear", padding_mode="border", align_corners=False)
        patches = patches + weight[:, None, None, None] * sampled
    return patches
