"""CCSR: consistency-controlled super-resolution of rendered patches.

Three parts (Super-NeRF's design, as graf_ccsr used it):

- CCLC codes: one learnable latent image per azimuth bin, sampled with the patch's
  high-resolution grid so a code pixel stays attached to the same image region;
- SR network: upsampled LR patch || code patch -> convs -> PixelShuffle(s), plus the
  upsampled LR patch as a residual;
- CEM: one back-projection step that pulls blur+downsample(SR) towards the LR patch.
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
    """Normalised 2D CEM blur kernel (k, k): box or Gaussian with ``cem_sigma``."""
    k = cfg.cem_kernel
    if cfg.cem_blur == "box":
        return torch.full((k, k), 1.0 / (k * k), dtype=torch.float32)
    x = torch.arange(k, dtype=torch.float64) - (k - 1) / 2
    g = torch.exp(-0.5 * (x / cfg.cem_sigma) ** 2)
    kernel = g[:, None] * g[None, :]
    return (kernel / kernel.sum()).float()


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
        kernel = blur_kernel(cfg)
        self.register_buffer("cem_kernel", kernel.expand(3, 1, *kernel.shape).clone(), persistent=False)

    def view_index(self, u: torch.Tensor) -> torch.Tensor:
        """Azimuth bin (B,) int64 of poses u (B,): floor(u * 360 * V / 360) mod V."""
        # the small epsilon keeps whole-degree bin edges (e.g. 60/360 * 6) from
        # rounding just below the integer in float32
        return torch.floor(u * self.num_views + 1e-4).long().remainder(self.num_views)

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
        pad = self.cem_kernel.shape[-1] // 2
        blurred = F.conv2d(F.pad(hr, (pad,) * 4, mode="replicate"), self.cem_kernel.to(hr.dtype), groups=3)
        return F.avg_pool2d(blurred, self.scale)

    def enforce_consistency(self, sr: torch.Tensor, lr: torch.Tensor) -> torch.Tensor:
        """One back-projection step: sr + w * upsample(lr - degrade(sr))."""
        residual = lr - self.degrade(sr)
        return sr + self.cfg.cem_weight * F.interpolate(
            residual, scale_factor=self.scale, mode="bilinear", align_corners=False
        )
