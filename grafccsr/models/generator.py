"""The generator: class-conditioned radiance field rendered into patches, plus optional CCSR."""

from __future__ import annotations

import torch
from torch import nn

from grafccsr.camera import pose_matrix, rays_from_grid
from grafccsr.config import ModelConfig
from grafccsr.models.ccsr import CCSR, GrafCCSR
from grafccsr.models.field import RadianceField
from grafccsr.models.render import RenderSettings, render_rays

_CLASS_EMBEDDING_STD = 0.1
"""With ``class_conditioning=add``, class embeddings start as a small offset of z (~N(0, 1)),
so early training behaves like unconditional GRAF and classes separate as the embedding
learns. (``scale`` keeps nn.Embedding's N(0, 1): the LayerNorm after it removes the scale.)"""


class Generator(nn.Module):
    """z (B, z_dim) + class (B,) + pose + patch grid -> rendered patch (and its SR).

    Sub-modules: ``field`` (:class:`RadianceField`), ``class_embedding``
    (``nn.Embedding(num_classes, z_dim)`` or None), ``class_norm`` (the LayerNorm of
    ``class_conditioning=scale``, else None) and ``ccsr`` (:class:`CCSR` or, with
    ``model.ccsr.variant=graf_ccsr``, :class:`GrafCCSR`; None when ``model.ccsr.mode == "off"``).
    """

    def __init__(self, model: ModelConfig, num_classes: int, image_size: int):
        super().__init__()
        self.model_cfg = model
        self.z_dim = model.z_dim
        self.field = RadianceField(model.field)
        self.class_embedding: nn.Embedding | None = None
        self.class_norm: nn.LayerNorm | None = None
        conditioning = model.field.class_conditioning
        if conditioning not in ("add", "scale", "none"):
            raise ValueError(f"model.field.class_conditioning={conditioning!r} must be add, scale or none")
        if conditioning != "none":
            self.class_embedding = nn.Embedding(num_classes, model.z_dim)
        if conditioning == "add":
            nn.init.normal_(self.class_embedding.weight, std=_CLASS_EMBEDDING_STD)
        elif conditioning == "scale":
            self.class_norm = nn.LayerNorm(model.z_dim)
        self.ccsr: CCSR | GrafCCSR | None = None
        if model.ccsr.mode != "off":
            ccsr_class = GrafCCSR if model.ccsr.variant == "graf_ccsr" else CCSR
            self.ccsr = ccsr_class(model.ccsr, model.ccsr.code_resolution or image_size)

    def sample_z(
        self, batch: int, device: torch.device | str, generator: torch.Generator | None = None
    ) -> torch.Tensor:
        """Standard-normal latent codes (B, z_dim) (float32; ``generator`` on ``device``)."""
        return torch.randn(batch, self.z_dim, generator=generator, device=device, dtype=torch.float32)

    def condition(self, z: torch.Tensor, class_idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """z (B, z_dim) modulated by the class embedding (per sample: ``add`` z + e, ``scale``
        z * LayerNorm(e)) -> z_shape (B, Zs), z_appearance (B, Za) (Za may be 0)."""
        if self.class_embedding is not None:
            embedding = self.class_embedding(class_idx)
            if self.class_norm is not None:
                z = z * self.class_norm(embedding).to(z.dtype)
            else:
                z = z + embedding.to(z.dtype)
        return z.split([self.model_cfg.field.z_shape_dim, self.model_cfg.field.z_appearance_dim], dim=-1)

    @property
    def ccsr_mode(self) -> str:
        return self.model_cfg.ccsr.mode

    def render(
        self,
        z: torch.Tensor,
        class_idx: torch.Tensor,
        u: torch.Tensor,
        v: torch.Tensor,
        grid: torch.Tensor,
        settings: RenderSettings,
        *,
        iteration: int | None = None,
        rng: torch.Generator | None = None,
    ) -> dict[str, torch.Tensor]:
        """Render patches at poses (u, v) (B,) through grid (B, P, P, 2).

        ``iteration`` is training (jittered samples, density noise at that iteration);
        None is evaluation, deterministic and noise-free. ``rng`` draws the jitter and noise.
        Returns rgb (B, 3, P, P) in [-1, 1], depth and acc (B, 1, P, P).
        """
        b, rows, cols, _ = grid.shape
        c2w = pose_matrix(u, v, settings.radius)
        origins, directions = rays_from_grid(c2w, grid, settings.fov_deg)
        z_shape, z_appearance = self.condition(z, class_idx)
        out = render_rays(self.field, origins, directions, z_shape, z_appearance, settings,
                          iteration=iteration, generator=rng)
        return {
            "rgb": out["rgb"].transpose(1, 2).reshape(b, 3, rows, cols),
            "depth": out["depth"].reshape(b, 1, rows, cols),
            "acc": out["acc"].reshape(b, 1, rows, cols),
        }

    def super_resolve(
        self, rgb: torch.Tensor, u: torch.Tensor, hr_grid: torch.Tensor, *, no_grad: bool = False
    ) -> torch.Tensor:
        """CCSR of rendered patches: rgb (B, 3, P, P), azimuth fractions u (B,), hr_grid
        (B, sP, sP, 2) (:func:`upsample_grid` of the render grid) -> sr (B, 3, sP, sP); with
        ``model.ccsr.variant=graf_ccsr`` sr is (B, 3, P, P), already resized back to the patch
        (the original's output; ``hr_grid`` is not used), which the consistency loss takes as is.

        WARNING — ``no_grad=True`` is memory-guide item 9 exactly as written: CCSR runs
        under ``torch.no_grad()`` and its output is then marked ``requires_grad_(True)``.
        That output is a NEW LEAF: no gradient reaches the CCSR codes, the SR network or
        the radiance field through this path, so the CCSR NEVER LEARNS and the
        consistency loss trains nothing. It exists to measure what the item costs.
        """
        if self.ccsr is None:
            raise RuntimeError("super_resolve needs model.ccsr.mode != 'off'")
        view_idx = self.ccsr.view_index(u)
        if not no_grad:
            return self.ccsr(rgb, view_idx, hr_grid)
        with torch.no_grad():
            sr = self.ccsr(rgb, view_idx, hr_grid)
        return sr.requires_grad_(True)
