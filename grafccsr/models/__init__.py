"""Generator (radiance field, renderer, CCSR) and patch discriminator.

Nothing here knows about training, tracking or data loading; camera math lives in
:mod:`grafccsr.camera`.
"""

from __future__ import annotations

from torch import nn

from grafccsr.config import Config
from grafccsr.models.discriminator import PatchDiscriminator
from grafccsr.models.generator import Generator
from grafccsr.models.render import RenderSettings
from grafccsr.models.views import render_views

__all__ = ["Generator", "PatchDiscriminator", "RenderSettings", "build_models", "discriminator_input_size",
           "parameter_summary", "render_views"]


def discriminator_input_size(cfg: Config) -> int:
    """Side of the patches D sees: the patch side, or scale * side when CCSR feeds D."""
    side = cfg.model.patch.side
    return side * cfg.model.ccsr.scale if cfg.model.ccsr.mode == "discriminator" else side


def build_models(cfg: Config, num_classes: int) -> tuple[Generator, PatchDiscriminator]:
    """The generator and discriminator for a validated config (on the CPU, float32)."""
    generator = Generator(cfg.model, num_classes, cfg.data.image_size)
    discriminator = PatchDiscriminator(cfg.model.discriminator, discriminator_input_size(cfg), num_classes)
    return generator, discriminator


def parameter_summary(module: nn.Module) -> list[tuple[str, int]]:
    """Parameter count of each direct parameter and direct child of ``module``
    (children without parameters are left out)."""
    rows = [(name, p.numel()) for name, p in module.named_parameters(recurse=False)]
    for name, child in module.named_children():
        count = sum(p.numel() for p in child.parameters())
        if count:
            rows.append((name, count))
    return rows
