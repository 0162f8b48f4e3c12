"""The generator: class-conditioned radiance field rendered into patches, plus optional CCSR."""

from __future__ import annotations

import torch
from torch import nn

from grafccsr.camera import pose_matrix, rays_from_grid
from grafccsr.config import ModelConfig
from grafccsr.models.ccsr import CCSR, GrafCCSR
from grafccsr.models.field import RadianceField
from grafccsr.models.occupancy import OccupancyGrid
from grafccsr.models.render import RenderSettings, render_rays

_CLASS_EMBEDDING_STD = 0.1
"""With ``class_conditioning=add``, class embeddings start as a small offset of z (~N(0, 1)),
so early training behaves like unconditional GRAF and classes separate as the embedding
learns. (``scale`` keeps nn.Embedding's N(0, 1): the LayerNorm after it removes the scale.)"""


def _class_modules(model: ModelConfig, num_classes: int) -> tuple[nn.Embedding | None, nn.LayerNorm | None]:
    """The class embedding (and LayerNorm) of ``model.field.class_conditioning``."""
    conditioning = model.field.class_conditioning
    if conditioning not in ("add", "scale", "none"):
        raise ValueError(f"model.field.class_conditioning={conditioning!r} must be add, scale or none")
    if conditioning == "none":
        return None, None
    embedding = nn.Embedding(num_classes, model.z_dim)
    if conditioning == "add":
        nn.init.normal_(embedding.weight, std=_CLASS_EMBEDDING_STD)
        return embedding, None
    return embedding, nn.LayerNorm(model.z_dim)


def _condition(model: ModelConfig, z: torch.Tensor, class_idx: torch.Tensor, embedding: nn.Embedding | None,
               norm: nn.LayerNorm | None) -> tuple[torch.Tensor, torch.Tensor]:
    """z (B, z_dim) modulated per sample by a class embedding -> the field's (z_shape, z_appearance);
    with ``skip_latent=raw`` z_shape is [conditioned, raw] (B, 2 Zs) (see :class:`RadianceField`)."""
    raw = z
    if embedding is not None:
        e = embedding(class_idx)
        z = z * norm(e).to(z.dtype) if norm is not None else z + e.to(z.dtype)
    sizes = [model.field.z_shape_dim, model.field.z_appearance_dim]
    z_shape, z_appearance = z.split(sizes, dim=-1)
    if model.field.skip_latent == "raw":
        z_shape = torch.cat([z_shape, raw.split(sizes, dim=-1)[0]], dim=-1)
    return z_shape, z_appearance


class FineNetwork(nn.Module):
    """graf_ccsr's newest fine network (``model.render.fine_network``): a second radiance field of
    the same shape, with its own class embedding (and LayerNorm), that renders the hierarchical
    pass's merged samples; the first network (the generator's ``field``) only places them."""

    def __init__(self, model: ModelConfig, num_classes: int):
        super().__init__()
        self.model_cfg = model
        self.field = RadianceField(model.field)
        self.class_embedding, self.class_norm = _class_modules(model, num_classes)

    def condition(self, z: torch.Tensor, class_idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return _condition(self.model_cfg, z, class_idx, self.class_embedding, self.class_norm)


class Generator(nn.Module):
    """z (B, z_dim) + class (B,) + pose + patch grid -> rendered patch (and its SR).

    Sub-modules: ``field`` (:class:`RadianceField`), ``class_embedding``
    (``nn.Embedding(num_classes, z_dim)`` or None), ``class_norm`` (the LayerNorm of
    ``class_conditioning=scale``, else None), ``fine`` (:class:`FineNetwork` with
    ``model.render.fine_network``, else None), ``occupancy`` (:class:`OccupancyGrid` with
    ``model.occupancy.enabled``, else None: buffers only, so it follows the generator into its EMA
    copy, checkpoints and every rank) and ``ccsr`` (:class:`CCSR` or, with
    ``model.ccsr.variant=graf_ccsr``, :class:`GrafCCSR`; None when ``model.ccsr.mode == "off"``).
    """

    def __init__(self, model: ModelConfig, num_classes: int, image_size: int):
        super().__init__()
        self.model_cfg = model
        self.z_dim = model.z_dim
        self.field = RadianceField(model.field)
        self.class_embedding, self.class_norm = _class_modules(model, num_classes)
        self.fine = FineNetwork(model, num_classes) if model.render.fine_network else None
        self.occupancy = OccupancyGrid(model.occupancy, num_classes) if model.occupancy.enabled else None
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
        z * LayerNorm(e)) -> z_shape (B, Zs), z_appearance (B, Za) (Za may be 0); with
        ``model.field.skip_latent=raw`` z_shape is (B, 2 Zs): [conditioned, raw]."""
        return _condition(self.model_cfg, z, class_idx, self.class_embedding, self.class_norm)

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
        Returns rgb (B, 3, P, P) in [-1, 1], depth and acc (B, 1, P, P), ``points`` (B, 1, P, P)
        (field evaluations per ray), with autograd ``graph_points`` (B, 1, P, P) (those with a
        graph, :func:`render_rays`); with a fine network whose coarse pass trains
        (``model.render.coarse_loss=match_fine``) and autograd on, also ``coarse_rgb`` (B, 3, P, P),
        the first network's render. With an occupancy grid (and ``settings.occupancy_half_size`` > 0)
        each ray samples only the cells its class's grid has on.
        """
        b, rows, cols, _ = grid.shape
        c2w = pose_matrix(u, v, settings.radius)
        origins, directions = rays_from_grid(c2w, grid, settings.fov_deg, settings.ray_shift)
        z_shape, z_appearance = self.condition(z, class_idx)
        fine = None if self.fine is None else (self.fine.field, *self.fine.condition(z, class_idx))
        occupancy = None
        if self.occupancy is not None and settings.occupancy_half_size > 0:
            occupancy = self.occupancy.sampler(class_idx, settings.occupancy_half_size, settings.occupancy_steps)
        out = render_rays(self.field, origins, directions, z_shape, z_appearance, settings,
                          iteration=iteration, generator=rng, fine=fine, occupancy=occupancy)
        images = {
            "rgb": out["rgb"].transpose(1, 2).reshape(b, 3, rows, cols),
            "depth": out["depth"].reshape(b, 1, rows, cols),
            "acc": out["acc"].reshape(b, 1, rows, cols),
            "points": out["points"].reshape(b, 1, rows, cols),
        }
        if "graph_points" in out:
            images["graph_points"] = out["graph_points"].reshape(b, 1, rows, cols)
        if "coarse_rgb" in out:
            images["coarse_rgb"] = out["coarse_rgb"].transpose(1, 2).reshape(b, 3, rows, cols)
        return images

    @torch.no_grad()
    def update_occupancy(self, iteration: int, settings: RenderSettings, seed: int, every_cell: bool = False) -> None:
        """One update of the occupancy grid from this generator's own density (never the data):
        ``model.occupancy.latent_draws`` codes drawn for every class from a stream seeded by ``seed``
        (train.seed) and ``iteration`` (the same on every rank). The density is the field that
        renders the colour (the fine network's when there is one), without its colour branch.
        FP32, no autograd, at most ``settings.no_grad_segment_points`` points per field call.
        ``every_cell``: evaluate every cell whatever the iteration (:meth:`OccupancyGrid.update`)."""
        grid, draws = self.occupancy, self.model_cfg.occupancy.latent_draws
        net, condition = (self.field, self.condition) if self.fine is None else (self.fine.field, self.fine.condition)

        def max_density(points: torch.Tensor, rng: torch.Generator) -> torch.Tensor:
            classes, n, _ = points.shape
            z = self.sample_z(draws, points.device, generator=rng).repeat(classes, 1)  # row c * draws + k
            labels = torch.arange(classes, device=points.device).repeat_interleave(draws)
            z_shape, _ = condition(z, labels)
            per_call = max(1, settings.no_grad_segment_points // (classes * draws))
            parts = []
            for i in range(0, n, per_call):
                sigma = net.density(points[:, i:i + per_call].repeat_interleave(draws, dim=0), z_shape)
                parts.append(torch.relu(sigma.float()).view(classes, draws, -1).amax(dim=1))
            return torch.cat(parts, dim=1)

        grid.update(iteration, settings.occupancy_half_size, max_density, seed, every_cell)

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
