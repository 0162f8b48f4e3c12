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

    Trunk: ``depth`` ReLU layers of ``width`` on PE(xyz) || z_shape, PE(xyz) || z_skip
    concatenated again after each layer in ``skips`` (z_skip = z_shape, or with
    ``cfg.skip_latent == "raw"`` graf_ccsr's latent code before class conditioning: the field's
    shape input is then (B, 2 Zs) = [conditioned, raw]); density head on the trunk;
    colour branch: feature layer || PE(view dir) || z_appearance -> ``view_width``
    -> rgb (sigmoid). ``z_appearance_dim`` may be 0 (graf_ccsr: all of z in the trunk).
    ``cfg.execution`` picks how it is computed (``fused`` or the original's per-point
    ``concat``); the function and the parameters are the same.
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
        """points, view_dirs (unit): (B, N, 3); z_shape (B, Zs) (or (B, 2 Zs), see the class
        docstring); z_appearance (B, Za).

        Returns rgb (B, N, 3) in [0, 1] and raw density sigma (B, N) (before ReLU/noise).
        Each sample's code is broadcast over its own points only (graf_ccsr's ``.repeat``
        interleaved codes across the batch).
        """
        b, n, _ = points.shape
        rgb, sigma_raw = self._rows(points.reshape(b * n, 3), view_dirs.reshape(b * n, 3), z_shape, z_appearance,
                                    lambda per_sample: _per_point(per_sample, n))
        return rgb.view(b, n, 3), sigma_raw.view(b, n)

    def forward_gathered(
        self, points: torch.Tensor, view_dirs: torch.Tensor, z_shape: torch.Tensor, z_appearance: torch.Tensor,
        owner: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Points of several samples mixed: points, view_dirs (M, 3); owner (M,) int64, the
        sample (row of z_shape (B, Zs) and z_appearance (B, Za)) each point belongs to.
        Returns rgb (M, 3) and raw sigma (M,). What a renderer that drops finished rays calls:
        the per-sample terms are still computed once per sample, then gathered."""
        return self._rows(points, view_dirs, z_shape, z_appearance,
                          lambda per_sample: per_sample.index_select(0, owner))

    def density(self, points: torch.Tensor, z_shape: torch.Tensor) -> torch.Tensor:
        """Raw density sigma (B, N) at points (B, N, 3) for z_shape (B, Zs): the trunk and the
        density head of :meth:`forward` without the colour branch (what the occupancy grid's
        update needs; the density never depends on the view direction)."""
        b, n, _ = points.shape
        h = self._fused_trunk(points.reshape(b * n, 3), z_shape, lambda per_sample: _per_point(per_sample, n))
        return self.density_head(h).view(b, n)

    def density_gathered(self, points: torch.Tensor, z_shape: torch.Tensor, owner: torch.Tensor) -> torch.Tensor:
        """Raw density (M,) at points (M, 3) of several samples mixed (``owner`` as in
        :meth:`forward_gathered`): :meth:`density` for a renderer's gathered points."""
        h = self._fused_trunk(points, z_shape, lambda per_sample: per_sample.index_select(0, owner))
        return self.density_head(h).squeeze(-1)

    def _rows(self, points, view_dirs, z_shape, z_appearance, expand):
        """(M, 3) points -> rgb (M, 3), sigma (M,); ``expand`` turns a per-sample (B, C) tensor
        into a NEW (M, C) tensor of each point's row (it may be written in place)."""
        if self.cfg.execution == "concat":
            return self._concat(points, view_dirs, expand(z_shape), expand(z_appearance))
        return self._fused(points, view_dirs, z_shape, z_appearance, expand)

    @property
    def shape_input_dim(self) -> int:
        """Columns of the field's shape input: Zs, or 2 Zs with ``skip_latent=raw``."""
        return self.cfg.z_shape_dim * (2 if self.cfg.skip_latent == "raw" else 1)

    def _latents(self, z_shape: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(first layer's code, the skip's code) of the field's shape input."""
        if self.cfg.skip_latent == "raw":
            return z_shape.chunk(2, dim=-1)
        return z_shape, z_shape

    def _concat(self, points, view_dirs, z_shape_rows, z_appearance_rows):
        """The plain way, as graf_ccsr computed it: every input concatenated per point, the
        trunk input concatenated again after each skip, a linear feature layer, then
        feature || PE(dir) || z_appearance into the colour branch."""
        pe = self.xyz_encoding(points)
        z_first, z_skip = self._latents(z_shape_rows.to(points.dtype))
        x_in = torch.cat([pe, z_first], dim=-1)
        skip_in = x_in if self.cfg.skip_latent == "conditioned" else torch.cat([pe, z_skip], dim=-1)
        h = x_in
        for i, layer in enumerate(self.trunk):
            h = torch.relu(layer(h))
            if i in self.skips:
                h = torch.cat([skip_in.to(h.dtype), h], dim=-1)
        sigma_raw = self.density_head(h).squeeze(-1)
        feature = self.feature(h)
        view_in = torch.cat([feature, self.dir_encoding(view_dirs).to(feature.dtype),
                             z_appearance_rows.to(feature.dtype)], dim=-1)
        view = torch.relu(self.view_layer(view_in))
        return torch.sigmoid(self.rgb_head(view)), sigma_raw

    def _fused(self, points, view_dirs, z_shape, z_appearance, expand):
        """The same function as :meth:`_concat`, computed without the per-point copies: every
        layer that reads the latent code splits its weight by input columns, so
        ``W [pe; z] = W_pe pe + W_z z`` with the ``W_z z`` term computed once per sample; the
        skip layer accumulates its two matmuls in place instead of concatenating; the linear
        ``feature`` layer and the colour branch's first layer are composed into one weight (no
        activation lies between them); the density head shares that matmul. Parameters and
        gradients are unchanged."""
        h = self._fused_trunk(points, z_shape, expand)
        # colour branch: view_layer(concat(feature(h), PE(dir), z_app)), feature linear -> composed
        w_view = self.view_layer.weight
        width, dir_dim = self.cfg.width, self.dir_encoding.out_dim
        with torch.autocast(points.device.type, enabled=False):  # compose the weights in full precision
            composed = torch.mm(w_view[:, :width], self.feature.weight)  # (Vw, W)
            view_bias = torch.addmv(self.view_layer.bias, w_view[:, :width], self.feature.bias)
        heads = torch.cat([self.density_head.weight, composed], dim=0)  # (1 + Vw, W)
        out = torch.mm(h, heads.t().to(h.dtype))  # (M, 1 + Vw)
        sigma_raw = out[:, 0] + self.density_head.bias.to(out.dtype)
        if z_appearance.shape[-1] > 0:
            per_sample = F.linear(z_appearance, w_view[:, width + dir_dim:], view_bias)
        else:  # no appearance code (graf_ccsr): the branch's bias alone
            per_sample = view_bias.expand(z_appearance.shape[0], -1).contiguous()  # a real (B, Vw) tensor
        view = expand(per_sample.to(out.dtype))
        view.add_(out[:, 1:])
        dirs = self.dir_encoding(view_dirs)
        view.addmm_(dirs.to(view.dtype), w_view[:, width:width + dir_dim].t().to(view.dtype))
        view = torch.relu_(view)
        rgb = torch.sigmoid(self.rgb_head(view))
        return rgb, sigma_raw

    def _fused_trunk(self, points, z_shape, expand):
        """The trunk's last activation (M, W) at points (M, 3), computed as :meth:`_fused` does."""
        pe = self.xyz_encoding(points)  # (M, Dpe); needs no gradient
        z_first, z_skip = self._latents(z_shape)
        pe_dim, zs_dim = self.xyz_encoding.out_dim, z_first.shape[-1]
        h = None
        for i, layer in enumerate(self.trunk):
            weight, bias = layer.weight, layer.bias
            if h is None or (i - 1) in self.skips:  # input = [pe, z] (+ h after a skip)
                z = z_first if h is None else z_skip
                per_sample = F.linear(z, weight[:, pe_dim:pe_dim + zs_dim], bias)  # (B, W)
                out = expand(per_sample)  # like addmm's bias: the output starts as the broadcast term
                out.addmm_(pe.to(out.dtype), weight[:, :pe_dim].t().to(out.dtype))
                if h is not None:
                    out.addmm_(h, weight[:, pe_dim + zs_dim:].t().to(out.dtype))
            else:
                out = layer(h)
            h = torch.relu_(out)  # (M, W); in place: Linear's backward does not need its output
        return h


def _per_point(per_sample: torch.Tensor, n: int) -> torch.Tensor:
    """(B, C) -> a new (B * n, C) tensor, row b * n + i = per_sample[b].

    Never a view (autograd would turn in-place accumulation into it into a
    CopySlices, a full copy in backward): ``reshape`` of the expanded tensor copies
    when B > 1 and n > 1, and is a view otherwise, which is then cloned."""
    b, c = per_sample.shape
    out = per_sample[:, None, :].expand(b, n, c).reshape(b * n, c)
    return out if (b > 1 and n > 1) else out.clone(memory_format=torch.contiguous_format)
