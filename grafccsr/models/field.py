"""Conditional radiance field: NeRF's MLP with GRAF's shape / appearance latent split."""

from __future__ import annotations

import torch
import torch.nn.functional as F
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

        The same function as concatenating the inputs (class docstring), computed
        without the per-point copies: every layer that reads the latent code splits
        its weight by input columns, so ``W [pe; z] = W_pe pe + W_z z`` with the
        ``W_z z`` term computed once per sample (each sample's code is broadcast over
        its own points only; graf_ccsr's ``.repeat`` interleaved codes across the
        batch); the skip layer accumulates its two matmuls in place instead of
        concatenating; the linear ``feature`` layer and the colour branch's first
        layer are composed into one weight (no activation lies between them); the
        density head shares that matmul. Parameters and gradients are unchanged.
        """
        b, n, _ = points.shape
        pe = self.xyz_encoding(points).reshape(b * n, -1)  # (BN, Dpe); needs no gradient
        pe_dim, zs_dim = self.xyz_encoding.out_dim, z_shape.shape[-1]
        h = None
        for i, layer in enumerate(self.trunk):
            weight, bias = layer.weight, layer.bias
            if h is None or (i - 1) in self.skips:  # input = [pe, z_shape] (+ h after a skip)
                per_sample = F.linear(z_shape, weight[:, pe_dim:pe_dim + zs_dim], bias)  # (B, W)
                out = _per_point(per_sample, n)  # like addmm's bias: the output starts as the broadcast term
                out.addmm_(pe.to(out.dtype), weight[:, :pe_dim].t().to(out.dtype))
                if h is not None:
                    out.addmm_(h, weight[:, pe_dim + zs_dim:].t().to(out.dtype))
            else:
                out = layer(h)
            h = torch.relu_(out)  # (BN, W); in place: Linear's backward does not need its output
        # colour branch: view_layer(concat(feature(h), PE(dir), z_app)), feature linear -> composed
        w_view = self.view_layer.weight
        width, dir_dim = self.cfg.width, self.dir_encoding.out_dim
        with torch.autocast(points.device.type, enabled=False):  # compose the weights in full precision
            composed = torch.mm(w_view[:, :width], self.feature.weight)  # (Vw, W)
            view_bias = torch.addmv(self.view_layer.bias, w_view[:, :width], self.feature.bias)
        heads = torch.cat([self.density_head.weight, composed], dim=0)  # (1 + Vw, W)
        out = torch.mm(h, heads.t().to(h.dtype))  # (BN, 1 + Vw)
        sigma_raw = (out[:, 0] + self.density_head.bias.to(out.dtype)).view(b, n)
        view = _per_point(F.linear(z_appearance, w_view[:, width + dir_dim:], view_bias).to(out.dtype), n)
        view.add_(out[:, 1:])
        dirs = self.dir_encoding(view_dirs).reshape(b * n, -1)
        view.addmm_(dirs.to(view.dtype), w_view[:, width:width + dir_dim].t().to(view.dtype))
        view = torch.relu_(view).view(b, n, -1)
        rgb = torch.sigmoid(self.rgb_head(view))
        return rgb, sigma_raw


def _per_point(per_sample: torch.Tensor, n: int) -> torch.Tensor:
    """(B, C) -> a new (B * n, C) tensor, row b * n + i = per_sample[b].

    Never a view (autograd would turn in-place accumulation into it into a
    CopySlices, a full copy in backward): ``reshape`` of the expanded tensor copies
    when B > 1 and n > 1, and is a view otherwise, which is then cloned."""
    b, c = per_sample.shape
    out = per_sample[:, None, :].expand(b, n, c).reshape(b * n, c)
    return out if (b > 1 and n > 1) else out.clone(memory_format=torch.contiguous_format)
