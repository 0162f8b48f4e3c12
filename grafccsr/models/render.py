"""Volume rendering of a radiance field along rays (NeRF / GRAF), fully batched.

Ray parameter ``t`` is measured in units of the (unnormalised) direction, so with
:func:`grafccsr.camera.rays_from_grid` it is depth along the optical axis and
``near`` / ``far`` are depths. Nothing here reads tensor values into Python
(no ``.item()``, no data-dependent branches): it must trace under FakeTensorMode.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from grafccsr.config import Config

_LAST_DELTA = 1e10  # the last sample's interval reaches "infinity": it absorbs what is left


@dataclass(frozen=True)
class RenderSettings:
    """Everything that decides how rays are rendered: the camera, ``model.render`` and the
    memory switches that shape the work. Built once from the config (:meth:`from_config`)
    and passed to every render (training step, samples, evaluation, sizing)."""

    fov_deg: float
    """Camera field of view (``camera.fov_deg``)."""
    radius: float
    """Camera distance from the origin (``camera.radius``)."""
    near: float
    """Near bound of each ray (depth along the optical axis)."""
    far: float
    """Far bound of each ray."""
    samples_per_ray: int
    """Stratified samples per ray."""
    importance_samples: int
    """Extra samples per ray from the hierarchical pass (0 = off)."""
    perturb: bool
    """Jitter the stratified samples when training."""
    density_noise_std: float
    """Noise on raw density at iteration 0 (training only)."""
    density_noise_decay_iters: int
    """The noise decays linearly to exactly 0 at this iteration."""
    white_background: bool
    """Composite on white instead of black."""
    chunk: int
    """Rays rendered at a time (0 = all)."""
    grad_checkpoint: bool
    """Recompute the field's activations in backward, segment by segment."""
    checkpoint_segment_points: int
    """Points per checkpointed segment."""
    no_grad_segment_points: int
    """Points per field call when no graph is recorded."""

    @classmethod
    def from_config(cls, cfg: Config) -> "RenderSettings":
        cam, render, mem = cfg.camera, cfg.model.render, cfg.memory
        return cls(
            fov_deg=cam.fov_deg, radius=cam.radius, near=cam.near, far=cam.far,
            samples_per_ray=render.samples_per_ray, importance_samples=render.importance_samples,
            perturb=render.perturb, density_noise_std=render.density_noise_std,
            density_noise_decay_iters=render.density_noise_decay_iters, white_background=render.white_background,
            chunk=mem.render_chunk, grad_checkpoint=mem.grad_checkpoint,
            checkpoint_segment_points=mem.checkpoint_segment_points, no_grad_segment_points=mem.no_grad_segment_points,
        )

    @property
    def points_per_ray(self) -> int:
        return self.samples_per_ray + self.importance_samples

    def noise_std(self, iteration: int | None) -> float:
        """Std of the noise on raw density: linear decay from ``density_noise_std`` at 0 to
        exactly 0.0 at ``density_noise_decay_iters`` and after; 0 when evaluating (None)."""
        decay = self.density_noise_decay_iters
        if iteration is None or decay <= 0:
            return 0.0
        return self.density_noise_std * max(0, decay - iteration) / decay


def render_rays(
    field: nn.Module,
    origins: torch.Tensor,
    directions: torch.Tensor,
    z_shape: torch.Tensor,
    z_appearance: torch.Tensor,
    settings: RenderSettings,
    *,
    iteration: int | None = None,
    generator: torch.Generator | None = None,
) -> dict[str, torch.Tensor]:
    """Render rays through a field with forward(points, view_dirs, z_shape, z_appearance).

    origins, directions: (B, R, 3); z_shape (B, Zs); z_appearance (B, Za).
    ``settings.samples_per_ray`` depths on [near, far]; with ``importance_samples`` > 0 a
    hierarchical pass draws that many more depths from the coarse weights and re-renders
    all of them with the same field (GRAF uses one network). ``iteration`` is training:
    jittered samples (``perturb``) and density noise at ``settings.noise_std(iteration)``;
    None is evaluation, deterministic and noise-free. ``chunk`` > 0 renders at most that
    many rays at a time (less peak memory, same result). ``grad_checkpoint`` recomputes the
    field's activations in backward, in segments of at most ``checkpoint_segment_points``
    points; without autograd the field runs on at most ``no_grad_segment_points`` points at
    a time. ``generator`` draws the jitter and noise.

    Returns ``rgb`` (B, R, 3) in [-1, 1], ``depth`` (B, R) (expected t, with empty
    space contributing 0: divide by ``acc`` for the depth of what was hit) and
    ``acc`` (B, R) (opacity).
    """
    perturb = settings.perturb and iteration is not None
    noise_std = settings.noise_std(iteration)
    num_rays, chunk = origins.shape[1], settings.chunk
    if chunk <= 0 or chunk >= num_rays:
        return _render(field, origins, directions, z_shape, z_appearance, settings, perturb, noise_std, generator)
    parts = [
        _render(field, origins[:, i : i + chunk], directions[:, i : i + chunk], z_shape, z_appearance, settings,
                perturb, noise_std, generator)
        for i in range(0, num_rays, chunk)
    ]
    return {key: torch.cat([p[key] for p in parts], dim=1) for key in parts[0]}


def _render(field, origins, directions, z_shape, z_appearance, s: RenderSettings, perturb: bool, noise_std: float,
            generator) -> dict[str, torch.Tensor]:
    depths = stratified_depths(origins, s.near, s.far, s.samples_per_ray, perturb, generator)
    if s.importance_samples > 0:
        # the coarse pass only places the fine samples (its weights are detached), so it
        # needs no graph; its depths are re-rendered with gradient in the merged pass
        with torch.no_grad():
            rgb, sigma_raw = _query_field(field, origins, directions, depths, z_shape, z_appearance,
                                          no_grad_segment_points=s.no_grad_segment_points)
            weights = composite(rgb, sigma_raw, depths, directions, noise_std, generator)["weights"]
        mids = 0.5 * (depths[..., 1:] + depths[..., :-1])
        fine = sample_pdf(mids, weights[..., 1:-1], s.importance_samples, not perturb, generator)
        depths = torch.sort(torch.cat([depths, fine], dim=-1), dim=-1).values
    rgb, sigma_raw = _query_field(field, origins, directions, depths, z_shape, z_appearance,
                                  s.checkpoint_segment_points if s.grad_checkpoint else 0, s.no_grad_segment_points)
    out = composite(rgb, sigma_raw, depths, directions, noise_std, generator)
    colour = out["rgb"]
    if s.white_background:
        colour = colour + (1.0 - out["acc"][..., None])
    return {"rgb": colour * 2.0 - 1.0, "depth": out["depth"], "acc": out["acc"]}


def stratified_depths(
    origins: torch.Tensor, near: float, far: float, samples_per_ray: int, perturb: bool,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Depths (B, R, S) evenly spaced on [near, far]; with ``perturb`` one uniform draw
    per stratum (the interval between neighbouring midpoints)."""
    b, r = origins.shape[:2]
    steps = torch.linspace(0.0, 1.0, samples_per_ray, device=origins.device, dtype=origins.dtype)
    depths = (near + (far - near) * steps).expand(b, r, samples_per_ray)
    if not perturb:
        return depths
    mids = 0.5 * (depths[..., 1:] + depths[..., :-1])
    upper = torch.cat([mids, depths[..., -1:]], dim=-1)
    lower = torch.cat([depths[..., :1], mids], dim=-1)
    jitter = torch.rand(depths.shape, generator=generator, device=origins.device, dtype=origins.dtype)
    return lower + (upper - lower) * jitter


def _query_field(field, origins, directions, depths, z_shape, z_appearance, checkpoint_segment_points=0,
                 no_grad_segment_points=0):
    """Evaluate the field at every (ray, depth): rgb (B, R, S, 3), raw sigma (B, R, S).

    The field runs on segments of whole rays: with ``checkpoint_segment_points`` > 0 (and
    grad enabled) checkpointed segments of at most that many points,
    without grad segments of at most ``no_grad_segment_points`` points, otherwise
    all points at once (saved activations are needed anyway).
    """
    b, r, s = depths.shape
    points = origins[:, :, None, :] + directions[:, :, None, :] * depths[..., None]
    view_dirs = F.normalize(directions, dim=-1)[:, :, None, :].expand(b, r, s, 3)
    points, view_dirs = points.reshape(b, r * s, 3), view_dirs.reshape(b, r * s, 3)
    run, segment_points = field, None
    if checkpoint_segment_points > 0 and torch.is_grad_enabled():
        segment_points = checkpoint_segment_points

        def run(*args):
            return checkpoint(field, *args, use_reentrant=False)
    elif not torch.is_grad_enabled() and no_grad_segment_points > 0:
        segment_points = no_grad_segment_points
    rays = r if segment_points is None else max(1, segment_points // (b * s))
    if rays >= r:
        rgb, sigma_raw = run(points, view_dirs, z_shape, z_appearance)
    else:
        parts = [run(points[:, i * s:(i + rays) * s], view_dirs[:, i * s:(i + rays) * s], z_shape, z_appearance)
                 for i in range(0, r, rays)]
        rgb, sigma_raw = torch.cat([p[0] for p in parts], dim=1), torch.cat([p[1] for p in parts], dim=1)
    # composite in the rays' precision: cumprod over many samples is unstable in bf16/fp16
    return rgb.reshape(b, r, s, 3).to(depths.dtype), sigma_raw.reshape(b, r, s).to(depths.dtype)


def composite(
    rgb: torch.Tensor,
    sigma_raw: torch.Tensor,
    depths: torch.Tensor,
    directions: torch.Tensor,
    noise_std: float = 0.0,
    generator: torch.Generator | None = None,
) -> dict[str, torch.Tensor]:
    """Alpha-composite samples along rays.

    rgb (B, R, S, 3), sigma_raw and depths (B, R, S), directions (B, R, 3).
    alpha_i = 1 - exp(-relu(sigma_i + noise) * delta_i), delta in world units
    (t-spacing times |direction|); weights_i = alpha_i * prod_{j<i} (1 - alpha_j).
    Returns weights (B, R, S), rgb (B, R, 3) in [0, 1] (black background), depth and acc (B, R).
    """
    deltas = depths[..., 1:] - depths[..., :-1]
    deltas = torch.cat([deltas, torch.full_like(deltas[..., :1], _LAST_DELTA)], dim=-1)
    deltas = deltas * directions.norm(dim=-1, keepdim=True)
    if noise_std > 0:
        noise = torch.randn(sigma_raw.shape, generator=generator, device=sigma_raw.device, dtype=sigma_raw.dtype)
        sigma_raw = sigma_raw + noise * noise_std
    alpha = 1.0 - torch.exp(-F.relu(sigma_raw) * deltas)
    # exclusive cumprod: transmittance before each sample (1e-10 keeps an opaque sample from zeroing the product's gradient)
    transmittance = torch.cumprod(
        torch.cat([torch.ones_like(alpha[..., :1]), 1.0 - alpha + 1e-10], dim=-1), dim=-1
    )[..., :-1]
    weights = alpha * transmittance
    return {
        "weights": weights,
        "rgb": (weights[..., None] * rgb).sum(dim=-2),
        "depth": (weights * depths).sum(dim=-1),
        "acc": weights.sum(dim=-1),
    }


def sample_pdf(
    bins: torch.Tensor, weights: torch.Tensor, count: int, deterministic: bool,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Inverse-CDF sampling of ``count`` depths (B, R, count) from a piecewise-constant pdf.

    bins: (B, R, M + 1) interval edges; weights: (B, R, M) mass per interval (detached
    here: sample positions carry no gradient). ``deterministic``: evenly spaced quantiles.
    """
    weights = weights.detach() + 1e-5  # no empty pdf: rays that hit nothing sample uniformly
    pdf = weights / weights.sum(dim=-1, keepdim=True)
    cdf = torch.cat([torch.zeros_like(pdf[..., :1]), torch.cumsum(pdf, dim=-1)], dim=-1)  # (B, R, M+1)
    shape = (*cdf.shape[:-1], count)
    if deterministic:
        quantiles = torch.linspace(0.0, 1.0, count, device=cdf.device, dtype=cdf.dtype).expand(shape).contiguous()
    else:
        quantiles = torch.rand(shape, generator=generator, device=cdf.device, dtype=cdf.dtype)
    upper = torch.searchsorted(cdf, quantiles, right=True)
    last = cdf.shape[-1] - 1
    below, above = (upper - 1).clamp(min=0), upper.clamp(max=last)
    cdf_below, cdf_above = cdf.gather(-1, below), cdf.gather(-1, above)
    bins = bins.detach()
    bins_below, bins_above = bins.gather(-1, below), bins.gather(-1, above)
    span = cdf_above - cdf_below
    span = torch.where(span < 1e-5, torch.ones_like(span), span)
    return bins_below + (quantiles - cdf_below) / span * (bins_above - bins_below)
