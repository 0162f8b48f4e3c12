"""CCSR: consistency-controlled super-resolution of rendered patches.

Three parts (Super-NeRF's design, as graf_ccsr used it):

- CCLC codes: one learnable latent image per azimuth bin, sampled with the patch's
  high-resolution grid so a code pixel stays attached to the same image region;
- SR network: upsampled LR patch || code patch -> convs -> PixelShuffle(s), plus the
  upsampled LR patch as a residual;
- CEM: one back-projection step that pulls blur+downsample(SR) towards the LR patch.

:class:`CCSR` is ours (batched, at the patch's scale); :class:`GrafCCSR` is graf_ccsr's own
computation (``model.ccsr.variant=graf_ccsr``), kept for its maths and cost.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from grafccsr.config import CCSRConfig


def consistency_weight(cfg: CCSRConfig, iteration: int) -> float:
    """alpha(t) = consistency_weight * exp(-consistency_decay * t)."""
    return cfg.consistency_weight * math.exp(-cfg.consistency_decay * iteration)


def blur_kernel(cfg: CCSRConfig) -> torch.Tensor:
    """Normalised 2D CEM blur kernel (k, k): box or Gaussian with ``cem_sigma``, in float64 (each
    use casts it to the image's dtype, so a float64 module blurs with exact weights)."""
    k = cfg.cem_kernel
    if cfg.cem_blur == "box":
        return torch.full((k, k), 1.0 / (k * k), dtype=torch.float64)
    x = torch.arange(k, dtype=torch.float64) - (k - 1) / 2
    g = torch.exp(-0.5 * (x / cfg.cem_sigma) ** 2)
    kernel = g[:, None] * g[None, :]
    return kernel / kernel.sum()


def view_index(u: torch.Tensor, num_views: int) -> torch.Tensor:
    """Azimuth bin (B,) int64 of poses u (B,): floor(u * 360 * V / 360) mod V."""
    # the small epsilon keeps whole-degree bin edges (e.g. 60/360 * 6) from
    # rounding just below the integer in float32
    return torch.floor(u * num_views + 1e-4).long().remainder(num_views)


def _box_or_gaussian(cfg: CCSRConfig) -> torch.Tensor:
    kernel = blur_kernel(cfg)
    return kernel.expand(3, 1, *kernel.shape).clone()


def _blur(x: torch.Tensor, kernel: torch.Tensor, padding: str) -> torch.Tensor:
    pad = kernel.shape[-1] // 2
    if padding == "zeros":
        return F.conv2d(x, kernel.to(x.dtype), padding=pad, groups=3)
    return F.conv2d(F.pad(x, (pad,) * 4, mode="replicate"), kernel.to(x.dtype), groups=3)


class CCSR(nn.Module):
    """Super-resolves (B, 3, P, P) patches to (B, 3, sP, sP), s = ``cfg.scale``.

    The SR network works at the LR resolution: the 6-channel HR input (bilinearly
    upsampled LR || code patch) is folded to 6 s^2 channels at P x P (pixel
    unshuffle), passed through ``num_layers`` 3x3 convs of ``hidden_channels``
    (LeakyReLU 0.2), mapped to 3 s^2 channels and unfolded by PixelShuffle(s).
    """

    def __init__(self, cfg: CCSRConfig, code_resolution: int):
        super().__init__()
        self.cfg = cfg
        self.scale = cfg.scale
        self.num_views = cfg.num_views
        self.codes = nn.Parameter(torch.randn(cfg.num_views, 3, code_resolution, code_resolution) * cfg.code_init_std)
        s2 = cfg.scale * cfg.scale
        layers: list[nn.Module] = []
        in_channels = 6 * s2
        for _ in range(cfg.num_layers):
            layers += [nn.Conv2d(in_channels, cfg.hidden_channels, 3, padding=1), nn.LeakyReLU(0.2)]
            in_channels = cfg.hidden_channels
        layers += [nn.Conv2d(in_channels, 3 * s2, 3, padding=1), nn.PixelShuffle(cfg.scale)]
        self.sr_net = nn.Sequential(*layers)
        self.register_buffer("cem_kernel", _box_or_gaussian(cfg), persistent=False)

    def view_index(self, u: torch.Tensor) -> torch.Tensor:
        """Azimuth bin (B,) int64 of poses u (B,): floor(u * 360 * V / 360) mod V."""
        return view_index(u, self.num_views)

    def forward(self, lr: torch.Tensor, view_idx: torch.Tensor, hr_grid: torch.Tensor) -> torch.Tensor:
        """lr (B, 3, P, P) in [-1, 1]; view_idx (B,) int64; hr_grid (B, sP, sP, 2) the
        patch's region at sP density. Returns sr (B, 3, sP, sP)."""
        codes = self.codes[view_idx].to(lr.dtype)  # (B, 3, R, R), gathered per sample
        code_patch = F.grid_sample(codes, hr_grid.to(lr.dtype), mode="bilinear", padding_mode="border", align_corners=False)
        upsampled = F.interpolate(lr, scale_factor=self.scale, mode="bilinear", align_corners=False)
        features = F.pixel_unshuffle(torch.cat([upsampled, code_patch], dim=1), self.scale)
        sr = upsampled + self.sr_net(features)
        return self.enforce_consistency(sr, lr)

    def degrade(self, hr: torch.Tensor) -> torch.Tensor:
        """The CEM's image model: blur (B, 3, sP, sP), then area-downsample by s -> (B, 3, P, P)."""
        return F.avg_pool2d(_blur(hr, self.cem_kernel, self.cfg.cem_padding), self.scale)

    def enforce_consistency(self, sr: torch.Tensor, lr: torch.Tensor) -> torch.Tensor:
        """One back-projection step: sr + w * upsample(lr - degrade(sr))."""
        residual = lr - self.degrade(sr)
        return sr + self.cfg.cem_weight * F.interpolate(
            residual, scale_factor=self.scale, mode="bilinear", align_corners=False
        )


class GrafCCSR(nn.Module):
    """graf_ccsr's CCSR (``model.ccsr.variant=graf_ccsr``), regulariser only: its maths and cost.

    For each sample in turn (a Python loop over the batch, as the original ran it: batch-1
    convolutions), with W = ``work_size`` (``code_resolution``; 64 in graf_ccsr, the patch side),
    L = ``lr_size`` (0: the original's max(8, P // 4), 16 at its 64^2 patches) and
    s = ``cfg.scale`` (4):

    1. shrink the (3, P, P) render to L^2 and upsample that to W^2 (bilinear);
    2. concatenate the sample's whole (3, W, W) view code (not sampled with the patch grid);
    3. ``num_layers`` 3x3 convs of ``hidden_channels`` at W^2 (LeakyReLU 0.2), a 3x3 conv to
       3 s^2 channels, PixelShuffle(s) -> (3, sW, sW), LeakyReLU 0.2, clamp to [-1, 1];
    4. CEM at sW: blur (``cem_padding``; the original's 3x3 box with zero padding), bilinear
       resize to the low-resolution input's L^2, residual against that L^2 input, the residual
       resized bilinearly to sW^2 and added with ``cem_weight``;
    5. bilinear resize back to P^2.

    The output is (B, 3, P, P): what the consistency loss compares with the (detached) render.
    Interpolations use ``align_corners=False``. Parameters keep :class:`CCSR`'s names
    (``codes``, ``sr_net``).
    """

    def __init__(self, cfg: CCSRConfig, work_size: int):
        super().__init__()
        self.cfg = cfg
        self.scale = cfg.scale
        self.num_views = cfg.num_views
        self.work_size = work_size
        self.codes = nn.Parameter(torch.randn(cfg.num_views, 3, work_size, work_size) * cfg.code_init_std)
        layers: list[nn.Module] = []
        in_channels = 6
        for _ in range(cfg.num_layers):
            layers += [nn.Conv2d(in_channels, cfg.hidden_channels, 3, padding=1), nn.LeakyReLU(0.2)]
            in_channels = cfg.hidden_channels
        layers += [nn.Conv2d(in_channels, 3 * cfg.scale * cfg.scale, 3, padding=1), nn.PixelShuffle(cfg.scale)]
        self.sr_net = nn.Sequential(*layers)
        self.register_buffer("cem_kernel", _box_or_gaussian(cfg), persistent=False)

    def view_index(self, u: torch.Tensor) -> torch.Tensor:
        """Azimuth bin (B,) int64 of poses u (B,)."""
        return view_index(u, self.num_views)

    def lr_side(self, patch_side: int) -> int:
        """L: ``cfg.lr_size``, or the original's max(8, P // 4) when it is 0."""
        return self.cfg.lr_size or max(8, patch_side // 4)

    def forward(self, lr: torch.Tensor, view_idx: torch.Tensor, hr_grid: torch.Tensor | None = None) -> torch.Tensor:
        """lr (B, 3, P, P) in [-1, 1]; view_idx (B,) int64; ``hr_grid`` unused (the original's
        codes are whole images). Returns (B, 3, P, P)."""
        size = lr.shape[-2:]
        return torch.cat([self._one(lr[i:i + 1], view_idx[i:i + 1], size) for i in range(lr.shape[0])])

    def _one(self, lr: torch.Tensor, view_idx: torch.Tensor, size) -> torch.Tensor:
        work = self.work_size
        small = F.interpolate(lr, size=(self.lr_side(size[-1]),) * 2, mode="bilinear", align_corners=False)
        upsampled = F.interpolate(small, size=(work, work), mode="bilinear", align_corners=False)
        code = self.codes.index_select(0, view_idx).to(lr.dtype)
        sr = self.sr_net(torch.cat([upsampled, code], dim=1))  # (1, 3, s W, s W)
        sr = F.leaky_relu(sr, 0.2).clamp(-1.0, 1.0)
        sr = self.enforce_consistency(sr, small)
        return F.interpolate(sr, size=size, mode="bilinear", align_corners=False)

    def degrade(self, hr: torch.Tensor, size) -> torch.Tensor:
        """The CEM's image model here: blur, then bilinear resize to ``size`` (the LR input's)."""
        blurred = _blur(hr, self.cem_kernel, self.cfg.cem_padding)
        return F.interpolate(blurred, size=size, mode="bilinear", align_corners=False)

    def enforce_consistency(self, sr: torch.Tensor, lr: torch.Tensor) -> torch.Tensor:
        """One back-projection step against the low-resolution input ``lr`` (1, 3, L, L):
        sr + w * bilinear_resize(lr - degrade(sr), sr's size)."""
        residual = lr - self.degrade(sr, lr.shape[-2:])
        return sr + self.cfg.cem_weight * F.interpolate(
            residual, size=sr.shape[-2:], mode="bilinear", align_corners=False
        )
