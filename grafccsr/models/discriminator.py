"""GRAF's DCGAN-style patch discriminator, with optional class input and aux classifier."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.parametrizations import spectral_norm

from grafccsr.config import DiscriminatorConfig

_MIN_SIZE, _MAX_SIZE = 16, 256


_GRAF_CCSR_SIZES = (16, 32, 64, 128)


def graf_ccsr_layout(size: int, max_channels: int) -> list[tuple[int, bool, str]]:
    """graf_ccsr's D body by patch side: (out channels, spectral norm, norm after the conv) per
    4x4 stride-2 conv, with M = ``max_channels`` (512 in the original). 16^2 is not in the
    original: the 32^2 branch without its first level (what a consistently scaled-down recipe
    runs)."""
    m = max_channels
    layouts = {
        128: [(m // 16, True, "none"), (m // 8, True, "instance"), (m // 4, True, "instance"),
              (m // 2, False, "batch"), (m, False, "batch")],
        64: [(m // 8, True, "none"), (m // 4, True, "instance"), (m // 2, False, "batch"), (m, False, "batch")],
        32: [(m // 4, False, "batch"), (m // 2, False, "batch"), (m, False, "batch")],
        16: [(m // 2, False, "batch"), (m, False, "batch")],
    }
    if size not in layouts:
        raise ValueError(f"model.discriminator.variant=graf_ccsr has no discriminator for {size}px patches "
                         f"(the original's: 32, 64, 128; ours adds 16)")
    return layouts[size]


class PatchDiscriminator(nn.Module):
    """Patches (B, 3, S, S) -> real/fake logits (B,) (+ aux class logits (B, K)).

    S must be a power of two in [16, 256]. 4x4 stride-2 convs halve S down to 4
    (channels base * 2^k, capped at ``max_channels``), each followed by the norm
    layer (not after the first) and LeakyReLU 0.2; a final 4x4 conv gives one
    logit. Spectral norm wraps every conv when ``cfg.spectral_norm``.
    With ``class_conditioning`` and more than one class, the class one-hot enters as
    constant extra input channels. With ``aux_classifier``, a second 4x4 head gives
    ``sum(n_each_task)`` logits (one task over the classes if ``n_each_task`` is empty).

    ``cfg.variant == "graf_ccsr"`` builds the original's D instead, which depends on the patch
    side (:func:`graf_ccsr_layout`; ``norm``, ``spectral_norm`` and ``base_channels`` unused): no
    conv biases anywhere, the one-hot class channels whenever ``class_conditioning`` (even with
    one class; the 128^2 D has none), LeakyReLU 0.2, a 4x4 stride-1 output conv, and a label head
    on the last features (1x1 conv to M/2, BatchNorm, LeakyReLU, global average pool, 1x1 conv
    to the classes or sum(n_each_task)) computed on every call; its logits are returned only
    with ``aux_classifier``.
    """

    def __init__(self, cfg: DiscriminatorConfig, input_size: int, num_classes: int):
        super().__init__()
        if not (_MIN_SIZE <= input_size <= _MAX_SIZE and input_size & (input_size - 1) == 0):
            raise ValueError(
                f"discriminator input size {input_size} is not supported: it must be a power of two "
                f"in [{_MIN_SIZE}, {_MAX_SIZE}]"
            )
        self.cfg = cfg
        self.input_size = input_size
        self.num_classes = num_classes
        original = cfg.variant == "graf_ccsr"
        self._bias = not original
        if original and input_size == 128 and cfg.class_conditioning:
            raise ValueError("model.discriminator.variant=graf_ccsr at 128px has no class channels (the original "
                             "crashes with them): set model.discriminator.class_conditioning=false")
        one_hot = cfg.class_conditioning and (num_classes > 1 or original)
        self.class_channels = num_classes if one_hot else 0
        self._n_each_task = list(cfg.n_each_task) or [num_classes]
        self.label_head_unused = original and not cfg.aux_classifier
        n_aux = sum(self._n_each_task)

        blocks: list[nn.Module] = []
        in_channels = 3 + self.class_channels
        if original:
            for out_channels, sn, norm in graf_ccsr_layout(input_size, cfg.max_channels):
                conv = nn.Conv2d(in_channels, out_channels, 4, 2, 1, bias=False)
                blocks.append(spectral_norm(conv) if sn else conv)
                if norm != "none":
                    blocks.append(nn.InstanceNorm2d(out_channels) if norm == "instance" else nn.BatchNorm2d(out_channels))
                blocks.append(nn.LeakyReLU(0.2))
                in_channels = out_channels
        else:
            size, level = input_size, 0
            while size > 4:
                out_channels = min(cfg.base_channels * 2**level, cfg.max_channels)
                blocks.append(self._conv(in_channels, out_channels, 4, 2, 1))
                if level > 0:
                    blocks.append(self._norm(out_channels))
                blocks.append(nn.LeakyReLU(0.2))
                in_channels, size, level = out_channels, size // 2, level + 1
        self.body = nn.Sequential(*blocks)
        self.aux_head: nn.Module | None = None
        if original:
            self.head = nn.Conv2d(in_channels, 1, 4, 1, 0, bias=False)
            hidden = in_channels // 2
            self.aux_head = nn.Sequential(
                nn.Conv2d(in_channels, hidden, 1, bias=False), nn.BatchNorm2d(hidden), nn.LeakyReLU(0.2),
                nn.AdaptiveAvgPool2d(1), nn.Conv2d(hidden, n_aux, 1, bias=False),
            )
        else:
            self.head = self._conv(in_channels, 1, 4, 1, 0)
            if cfg.aux_classifier:
                self.aux_head = self._conv(in_channels, n_aux, 4, 1, 0)

    @property
    def n_each_task(self) -> list[int]:
        """Logit slice size of each auxiliary task."""
        return list(self._n_each_task)

    def _conv(self, in_channels: int, out_channels: int, kernel: int, stride: int, padding: int) -> nn.Module:
        conv = nn.Conv2d(in_channels, out_channels, kernel, stride, padding, bias=self._bias)
        return spectral_norm(conv) if self.cfg.spectral_norm else conv

    def _norm(self, channels: int) -> nn.Module:
        if self.cfg.norm == "instance":
            return nn.InstanceNorm2d(channels, affine=True)
        if self.cfg.norm == "batch":
            return nn.BatchNorm2d(channels)
        if self.cfg.norm == "none":
            return nn.Identity()
        raise ValueError(f"model.discriminator.norm={self.cfg.norm!r} must be instance, batch or none")

    def forward(self, x: torch.Tensor, class_idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """x (B, 3, S, S), class_idx (B,) int64 -> logits (B,), aux logits (B, K) or None."""
        if self.class_channels:
            one_hot = F.one_hot(class_idx, self.num_classes).to(x.dtype)
            x = torch.cat([x, one_hot[:, :, None, None].expand(-1, -1, *x.shape[-2:])], dim=1)
        features = self.body(x)
        logits = self.head(features).flatten(1).squeeze(1)
        aux_logits = self.aux_head(features).flatten(1) if self.aux_head is not None else None
        if self.label_head_unused:  # graf_ccsr computed its label head on every call and used none of it
            aux_logits = None
        return logits, aux_logits
