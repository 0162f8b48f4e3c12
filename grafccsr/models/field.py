"""Conditional radiance field: NeRF's MLP with GRAF's shape / appearance latent split."""

from __future__ import annotations

import torch
from torch import nn

from grafccsr.config import FieldConfig


class PositionalEncoding(nn.Module):
    """NeRF's frequency encoding: x -> [x, sin(2^k x), cos(2^k x) for k < F].

    (..., 3) -> (..., out_dim) with out_dim = 3 * include_input + 3 * 2 * F
    (10 frequencies -> 63, 4 -> 27).
    """

    def __init__(self, num_frequencies: int, include_input: bool = True, in_dim: int = 3):
        super().__init__()
        self.include_input = include_input
        self.out_dim = in_dim * (int(include_input) + 2 * num_frequencies)
        # a buffer, so the frequencies follow the module's device and dtype
        self.register_buffer("frequencies", 2.0 ** torch.arange(num_frequencies, dtype=torch.float32), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        scaled = x[..., None, :] * self.frequencies.to(x.dtype)[:, None]  # (..., F, 3)
        # (..., F*2*3): per frequency its sin then its cos
        encoded = torch.stack((torch.sin(scaled), torch.cos(scaled)), dim=-2).flatten(-3)
        return torch.cat([x, encoded], dim=-1) if self.include_input else encoded


class RadianceField(nn.Module):
    """GRAF's generator MLP, every size from :class:`FieldConfig`.

    Trunk: ``depth`` ReLU layers of ``width`` on PE(xyz) || z_shape, the trunk input
    concatenated again after each layer in ``skips``; density head on the trunk;
    colour branch: feature layer || PE(view dir) || z_appearance -> ``view_width``
    -> rgb (sigmoid).
    """

    def __init__(self, cfg: FieldConfig):
        super().__init__()
        self.cfg = cfg
        self.xyz_encoding = PositionalEncoding(cfg.xyz_frequencies)
        self.dir_encoding = PositionalEncoding(cfg.dir_frequencies)
        trunk_in = self.xyz_encoding.out_dim + cfg.z_shape_dim
        self.skips = set(cfg.skips)
        layers = []
        for i in range(cfg.depth):
            in_dim = trunk_in if i == 0 else cfg.width + (trunk_in if (i - 1) in self.skips else 0)
            layers.append(nn.Linear(in_dim, cfg.width))
        self.trunk = nn.ModuleList(layers)
        self.density_head = nn.Linear(cfg.width, 1)
        self.feature = nn.Linear(cfg.width, cfg.width)
        view_in = cfg.width + self.dir_encoding.out_dim + cfg.z_appearance_dim
        self.view_layer = nn.Linear(view_in, cfg.view_width)
        self.rgb_head = nn.Linear(cfg.view_width, 3)
        self.activation = nn.ReLU()

    def forward(
        self, points: torch.Tensor, view_dirs: torch.Tensor, z_shape: torch.Tensor, z_appearance: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """points, view_dirs (unit): (B, N, 3); z_shape (B, Zs); z_appearance (B, Za).

        Returns rgb (B, N, 3) in [0, 1] and raw density sigma (B, N) (before ReLU/noise).
        """
        b, n, _ = points.shape
        # each sample's code is broadcast over its own points only (graf_ccsr's
        # `.repeat` interleaved codes across the batch)
        z_shape_per_point = z_shape[:, None, :].expand(b, n, z_shape.shape[-1])
        z_app_per_point = z_appearance[:, None, :].expand(b, n, z_appearance.shape[-1])
        trunk_input = torch.cat([self.xyz_encoding(points), z_shape_per_point], dim=-1)
        h = trunk_input
        for i, layer in enumerate(self.trunk):
            h = self.activation(layer(h))
            if i in self.skips:
                h = torch.cat([trunk_input, h], dim=-1)
        sigma_raw = self.density_head(h).squeeze(-1)
        view_input = torch.cat([self.feature(h), self.dir_encoding(view_dirs), z_app_per_point], dim=-1)
        rgb = torch.sigmoid(self.rgb_head(self.activation(self.view_layer(view_input))))
        return rgb, sigma_raw
