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

from grafccsr.camera import corner_shift
from grafccsr.config import Config
from grafccsr.models.occupancy import camera_half_size, march_steps

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
    bound_radius: float = 0.0
    """Clip rays to the ball of this radius around the origin (0 = off; ``model.render.bound_radius``)."""
    termination_transmittance: float = 0.0
    """Early ray termination threshold for renders without autograd (0 = off)."""
    termination_chunk: int = 8
    """Samples per ray between two transmittance checks (with termination)."""
    coarse_loss: bool = False
    """With a fine network: render the coarse pass with autograd and return it (``coarse_rgb``)
    for its loss (``model.render.coarse_loss=match_fine``)."""
    ray_shift: float = 0.0
    """:func:`grafccsr.camera.rays_from_grid`'s shift: 0 (pixel-centre rays) or half a pixel of
    the data's image size (``model.render.rays_through=pixel_corners``)."""
    occupancy_half_size: float = 0.0
    """Half side of the occupancy grid's cube (``model.occupancy``; 0 = render without the grid,
    even where the generator has one)."""
    occupancy_steps: int = 0
    """Steps each ray takes through [near, far] to find its occupied part (none longer than half a cell)."""
    occupancy_spacing: float = 0.0
    """``model.occupancy.sample_spacing``: each sample stands for this much occupied length (a ray
    gets ceil(length / spacing) samples, at most ``samples_per_ray``); 0 = ``samples_per_ray`` per ray."""
    skip_empty_samples: bool = False
    """``memory.skip_empty_samples``: in renders with autograd, evaluate the density first without
    it and evaluate with autograd only the samples where it (with the noise) is positive."""

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
            bound_radius=render.bound_radius, termination_transmittance=render.termination_transmittance,
            termination_chunk=render.termination_chunk,
            coarse_loss=render.fine_network and render.coarse_loss == "match_fine",
            ray_shift=corner_shift(cfg.data.image_size) if render.rays_through == "pixel_corners" else 0.0,
            skip_empty_samples=mem.skip_empty_samples, **_occupancy_settings(cfg),
        )

    @property
    def points_per_ray(self) -> int:
        """Samples per ray in the final render (stratified + importance)."""
        return self.samples_per_ray + self.importance_samples

    @property
    def field_points_per_ray(self) -> int:
        """Field evaluations per ray and render: the final render's samples plus, with a
        hierarchical pass, the coarse pass's (its samples are evaluated twice). Early
        termination, the ball and the occupancy grid evaluate fewer (data-dependent: renders
        return the count, ``points``); this is their upper bound."""
        coarse = self.samples_per_ray if self.importance_samples > 0 else 0
        return coarse + self.points_per_ray

    def noise_std(self, iteration: int | None) -> float:
        """Std of the noise on raw density: linear decay from ``density_noise_std`` at 0 to
        exactly 0.0 at ``density_noise_decay_iters`` and after; 0 when evaluating (None)."""
        decay = self.density_noise_decay_iters
        if iteration is None or decay <= 0:
            return 0.0
        return self.density_noise_std * max(0, decay - iteration) / decay


def _occupancy_settings(cfg: Config) -> dict:
    """``occupancy_half_size`` and ``occupancy_steps`` of ``model.occupancy`` (both 0 when it is off)."""
    occ, cam = cfg.model.occupancy, cfg.camera
    if not occ.enabled:
        return {}
    shift = corner_shift(cfg.data.image_size) if cfg.model.render.rays_through == "pixel_corners" else 0.0
    half = occ.half_size or camera_half_size(cam.radius, cam.near, cam.far, cam.fov_deg, shift)
    return {"occupancy_half_size": half,
            "occupancy_steps": march_steps(half, occ.resolution, cam.near, cam.far, cam.fov_deg, shift),
            "occupancy_spacing": occ.sample_spacing}


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
    fine: tuple[nn.Module, torch.Tensor, torch.Tensor] | None = None,
    occupancy=None,
) -> dict[str, torch.Tensor]:
    """Render rays through a field with forward(points, view_dirs, z_shape, z_appearance).

    origins, directions: (B, R, 3); z_shape (B, Zs); z_appearance (B, Za).
    ``settings.samples_per_ray`` depths on [near, far]; with ``importance_samples`` > 0 a
    hierarchical pass draws that many more depths from the coarse weights and re-renders
    all of them with the same field (GRAF uses one network), or with ``fine`` = (fine field,
    its z_shape, its z_appearance) with that second field (graf_ccsr's fine network; with
    ``settings.coarse_loss`` and autograd on, the coarse pass keeps its graph and its image is
    returned as ``coarse_rgb``). ``iteration`` is training:
    jittered samples (``perturb``) and density noise at ``settings.noise_std(iteration)``;
    None is evaluation, deterministic and noise-free. ``chunk`` > 0 renders at most that
    many rays at a time (less peak memory, same result). ``grad_checkpoint`` recomputes the
    field's activations in backward, in segments of at most ``checkpoint_segment_points``
    points; without autograd the field runs on at most ``no_grad_segment_points`` points at
    a time. ``generator`` draws the jitter and noise.

    ``bound_radius`` > 0 spreads each ray's samples over its part of [near, far] inside that
    ball (rays that miss it render nothing and are not evaluated); ``termination_transmittance``
    > 0 stops evaluating a ray once its transmittance falls below it, in renders without
    autograd on real tensors (:func:`march`). ``occupancy`` (a
    :class:`grafccsr.models.occupancy.RaySampler`: the generator's grid for each row's class) spreads each ray's samples over its occupied length
    instead (coordinates along the occupied steps, mapped back to depths; the intervals are
    occupied length, the last ends with the last occupied step); rays that cross no occupied cell
    render nothing and are not evaluated; with ``settings.occupancy_spacing`` a ray gets one sample per
    that much occupied length (at most ``samples_per_ray``, :func:`occupied_samples`) and only those
    are evaluated. Rays are skipped only on real tensors (data-dependent
    shapes): under FakeTensorMode (the memory estimator's tracing) termination and the ball's and
    grid's skipped rays render in full, the estimator's upper bound. A skipped ray's intervals
    have zero length, so the field's value there changes neither the image nor a gradient: the
    result is the full render's.

    ``skip_empty_samples`` (with autograd, on real tensors, fields with ``density_gathered``): the
    density is evaluated first without autograd at every sample (:func:`_density_at`), the density
    noise drawn, and only the samples where density + noise > 0 are evaluated again with autograd.
    At the others ReLU(density + noise) = 0: zero opacity and, ReLU's derivative being 0 there,
    zero gradient to the density and (at weight 0) to the colour; they keep the first pass's
    density (no graph) and zero colour, so the composite and every gradient are the full
    render's (up to float rounding between the two passes).

    Returns ``rgb`` (B, R, 3) in [-1, 1], ``depth`` (B, R) (expected t, with empty
    space contributing 0: divide by ``acc`` for the depth of what was hit), ``acc`` (B, R)
    (opacity), ``points`` (B, R), the field evaluations each ray cost (every pass; with
    ``skip_empty_samples`` the first, density-only pass's) and, with autograd, ``graph_points``
    (B, R), the samples evaluated with autograd.
    """
    perturb = settings.perturb and iteration is not None
    noise_std = settings.noise_std(iteration)
    num_rays, chunk = origins.shape[1], settings.chunk
    if chunk <= 0 or chunk >= num_rays:
        return _render(field, origins, directions, z_shape, z_appearance, settings, perturb, noise_std, generator,
                       fine, occupancy)
    parts = [
        _render(field, origins[:, i : i + chunk], directions[:, i : i + chunk], z_shape, z_appearance, settings,
                perturb, noise_std, generator, fine, occupancy)
        for i in range(0, num_rays, chunk)
    ]
    return {key: torch.cat([p[key] for p in parts], dim=1) for key in parts[0]}


def _render(field, origins, directions, z_shape, z_appearance, s: RenderSettings, perturb: bool, noise_std: float,
            generator, fine=None, occupancy=None) -> dict[str, torch.Tensor]:
    near, far, active, segments = _extent(origins, directions, s, occupancy)
    # clipped rays: the last interval ends at the ball, or with the last occupied step
    segment_end = far if s.bound_radius > 0 or segments is not None else None
    real = not _is_fake(origins)
    real_no_grad = real and not torch.is_grad_enabled()
    terminate = s.termination_transmittance > 0 and real_no_grad
    gather = terminate or (segments is not None and real_no_grad)  # evaluate only the rays the grid says cross matter
    # with autograd, rays that miss the ball or every occupied cell (zero-length intervals: zero
    # opacity and zero gradient whatever the field says there) are not evaluated either
    skip_empty = active is not None and real and not gather and hasattr(field, "forward_gathered")
    # with autograd, samples of zero density (ReLU: zero opacity and zero gradient) are not evaluated either
    if s.skip_empty_samples and real and torch.is_grad_enabled() and hasattr(field, "density_gathered"):
        active = torch.ones(origins.shape[:2], dtype=torch.bool, device=origins.device) if active is None else active
        skip_empty = True
    checkpoint_points = s.checkpoint_segment_points if s.grad_checkpoint else 0

    def render(net, zs, za, coords: torch.Tensor, checkpoint_points: int, valid=None) -> dict[str, torch.Tensor]:
        """``valid`` (B, R, S): the samples evaluated (the others lie at the end of their ray's occupied
        length, where their intervals are empty); None: every sample of an active ray."""
        depths = coords if segments is None else segments.to_depth(coords)
        spacing = None if segments is None else coords
        if gather:
            return march(net, origins, directions, depths, zs, za, s.termination_transmittance,
                         chunk=s.termination_chunk if terminate else depths.shape[-1],
                         segment_points=s.no_grad_segment_points, noise_std=noise_std, generator=generator,
                         segment_end=segment_end, active=active, spacing=spacing, valid=valid)
        samples = depths.shape[-1]
        evaluated = None if not skip_empty else (active[..., None].expand_as(depths) if valid is None else valid)
        first, noise, evaluated = _first_density_pass(net, evaluated, origins, directions, depths, zs, s, noise_std,
                                                      generator, real)
        if skip_empty:
            rgb, sigma_raw = _query_active(net, evaluated if first is not None or valid is not None else active,
                                           origins, directions, depths, zs, za, checkpoint_points,
                                           s.no_grad_segment_points)
            if first is not None:  # the skipped samples' density, without a graph: ReLU makes them empty
                sigma_raw = torch.where(evaluated, sigma_raw, first)
        else:
            rgb, sigma_raw = _query_field(net, origins, directions, depths, zs, za, checkpoint_points,
                                          s.no_grad_segment_points)
        out = composite(rgb, sigma_raw, coords, directions, noise_std, generator, segment_end=segment_end,
                        noise=noise)
        if segments is not None:
            out["depth"] = (out["weights"] * depths).sum(dim=-1)
        # the samples evaluated: every one (of an active ray), or those valid; with a graph: those kept
        out["points"] = (torch.full_like(out["acc"], samples) if not skip_empty else
                         (active * samples if valid is None else valid.sum(dim=-1)).to(out["acc"].dtype))
        if torch.is_grad_enabled():
            out["graph_points"] = out["points"] if first is None else evaluated.sum(dim=-1).to(out["acc"].dtype)
        return out

    valid = None
    if segments is not None and s.occupancy_spacing > 0:
        depths, valid = occupied_samples(far, s.occupancy_spacing, s.samples_per_ray, perturb, generator)
    else:
        depths = stratified_depths(origins, near, far, s.samples_per_ray, perturb, generator)
    coarse = None
    if s.importance_samples > 0:
        # the coarse pass only places the fine samples (sample_pdf detaches its weights), so it
        # needs a graph only when a loss trains a separate coarse network
        if fine is not None and s.coarse_loss and torch.is_grad_enabled():
            coarse = render(field, z_shape, z_appearance, depths, checkpoint_points, valid)
        else:
            with torch.no_grad():
                coarse = render(field, z_shape, z_appearance, depths, 0, valid)
        mids = 0.5 * (depths[..., 1:] + depths[..., :-1])
        extra = sample_pdf(mids, coarse["weights"][..., 1:-1], s.importance_samples, not perturb, generator)
        depths = torch.sort(torch.cat([depths, extra], dim=-1), dim=-1).values
        if fine is not None:
            field, z_shape, z_appearance = fine
        valid = None  # the importance samples lie anywhere on the occupied length: every sample is evaluated
    final = render(field, z_shape, z_appearance, depths, checkpoint_points, valid)
    out = _finish(final, s)
    out["points"] = final["points"] if coarse is None else final["points"] + coarse["points"]
    if "graph_points" in final:
        out["graph_points"] = final["graph_points"] + (0 if coarse is None else coarse.get("graph_points", 0))
    if coarse is not None and coarse["rgb"].requires_grad:
        out["coarse_rgb"] = _finish(coarse, s)["rgb"]
    return out


def _extent(origins: torch.Tensor, directions: torch.Tensor, s: RenderSettings, occupancy):
    """Where each ray's samples go: (near, far, active rays (B, R) or None, the occupied segments or
    None). With the grid, near and far are coordinates along each ray's occupied length (B, R, 1);
    with the ball, each ray's depths inside it; else ``s.near`` and ``s.far``."""
    if occupancy is not None:
        segments = occupancy.segments(origins, directions, s.near, s.far)
        return 0.0, segments.length, segments.active, segments
    if s.bound_radius > 0:
        return (*ray_bounds(origins, directions, s.near, s.far, s.bound_radius), None)
    return s.near, s.far, None, None


def _finish(out: dict[str, torch.Tensor], s: RenderSettings) -> dict[str, torch.Tensor]:
    """A composited render as returned: rgb in [-1, 1] on the background, depth, opacity."""
    colour = out["rgb"]
    if s.white_background:
        colour = colour + (1.0 - out["acc"][..., None])
    return {"rgb": colour * 2.0 - 1.0, "depth": out["depth"], "acc": out["acc"]}


def _is_fake(t: torch.Tensor) -> bool:
    """A FakeTensor (the memory estimator's tracing): no values to decide on."""
    from torch._subclasses.fake_tensor import is_fake

    return is_fake(t)


def ray_bounds(origins: torch.Tensor, directions: torch.Tensor, near: float, far: float, radius: float
               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Each ray's part of [near, far] inside the ball |x| <= radius around the origin.

    origins, directions (B, R, 3) (t in units of the direction). Returns near, far (B, R, 1) and
    ``hit`` (B, R) bool. A ray that misses the ball (or meets it only outside [near, far]) gets
    near = far = ``near``: zero-length intervals, so zero opacity, whatever the field says.
    """
    a = (directions * directions).sum(-1)
    half_b = (origins * directions).sum(-1)
    c = (origins * origins).sum(-1) - radius * radius
    disc = half_b * half_b - a * c
    root = disc.clamp(min=0).sqrt()
    t_in = ((-half_b - root) / a).clamp(min=near)
    t_out = ((-half_b + root) / a).clamp(max=far)
    hit = (disc > 0) & (t_out > t_in)
    lo = torch.where(hit, t_in, torch.full_like(t_in, near))
    hi = torch.where(hit, t_out, lo)
    return lo[..., None], hi[..., None], hit


def stratified_depths(
    origins: torch.Tensor, near: float | torch.Tensor, far: float | torch.Tensor, samples_per_ray: int, perturb: bool,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Depths (B, R, S) evenly spaced on [near, far] (floats, or (B, R, 1) per ray); with
    ``perturb`` one uniform draw per stratum (the interval between neighbouring midpoints)."""
    b, r = origins.shape[:2]
    steps = torch.linspace(0.0, 1.0, samples_per_ray, device=origins.device, dtype=origins.dtype)
    depths = (near + (far - near) * steps).expand(b, r, samples_per_ray)
    return _jittered(depths, generator) if perturb else depths


def _jittered(depths: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """Each depth (B, R, S) drawn uniformly between the midpoints to its neighbours (the first and
    last from their own position)."""
    mids = 0.5 * (depths[..., 1:] + depths[..., :-1])
    upper = torch.cat([mids, depths[..., -1:]], dim=-1)
    lower = torch.cat([depths[..., :1], mids], dim=-1)
    jitter = torch.rand(depths.shape, generator=generator, device=depths.device, dtype=depths.dtype)
    return lower + (upper - lower) * jitter


def occupied_samples(length: torch.Tensor, spacing: float, samples_per_ray: int, perturb: bool,
                     generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Coordinates (B, R, S) along each ray's occupied length (B, R, 1) for count = min(S,
    ceil(length / spacing)) samples, and which are samples (``valid`` (B, R, S): k < count). The
    length is cut into ``count`` equal strata with a sample at the start of each, so sample k stands for the interval up
    to sample k + 1 and the last for the rest of the length (with ``perturb``, jittered like
    :func:`stratified_depths`: between the midpoints of its neighbours, the end of the length being
    the last's); the others sit at the end of the length, where their intervals are empty."""
    k = torch.arange(samples_per_ray + 1, device=length.device, dtype=length.dtype)
    n = torch.ceil(length / spacing).clamp(max=samples_per_ray)  # (B, R, 1)
    coords = length * torch.minimum(k, n) / n.clamp(min=1)  # (B, R, S + 1): the last is always the end
    valid = k < n
    if perturb:  # the jitter would move the first one past the count off the end: put it back
        coords = torch.where(valid, _jittered(coords, generator), coords)
    return coords[..., :samples_per_ray], valid[..., :samples_per_ray]


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


def _query_active(field, active, origins, directions, depths, z_shape, z_appearance, checkpoint_segment_points=0,
                  no_grad_segment_points=0):
    """:func:`_query_field` at the rays ``active`` (B, R) only, or at the samples ``active`` (B, R, S)
    only (:func:`_query_live`, checkpointed in segments of whole rays as there): rgb (B, R, S, 3) and
    raw sigma (B, R, S), zero elsewhere."""
    b, r, s = depths.shape
    n = b * r
    mask = active.reshape(n, s) if active.dim() == 3 else None
    ids = (active if mask is None else mask.any(dim=-1)).reshape(n).nonzero().squeeze(1)
    d = directions.reshape(n, 3)
    grad = torch.is_grad_enabled()
    net, segment_points = field, (0 if grad else no_grad_segment_points)
    if grad and checkpoint_segment_points > 0:
        net, segment_points = _Checkpointed(field), checkpoint_segment_points
    owner = torch.arange(b, device=depths.device).repeat_interleave(r)
    rgb, sigma_raw = _query_live(net, ids, depths.reshape(n, s), origins.reshape(n, 3), d, F.normalize(d, dim=-1),
                                 owner, z_shape, z_appearance, segment_points or max(1, ids.numel() * s), mask)
    rgb_all = depths.new_zeros(n, s, 3).index_put((ids,), rgb.to(depths.dtype))
    sigma_all = depths.new_zeros(n, s).index_put((ids,), sigma_raw.to(depths.dtype))
    return rgb_all.view(b, r, s, 3), sigma_all.view(b, r, s)


class _Checkpointed:
    """A field's ``forward_gathered`` under activation checkpointing."""

    def __init__(self, field):
        self.field = field

    def forward_gathered(self, *args):
        return checkpoint(self.field.forward_gathered, *args, use_reentrant=False)


def _density_noise(like: torch.Tensor, noise_std: float, generator: torch.Generator | None) -> torch.Tensor | None:
    """The density noise for samples shaped like ``like`` (B, R, S), as :func:`composite` and
    :func:`march` draw it (one draw of that shape and dtype from ``generator``); None at std 0."""
    if noise_std <= 0:
        return None
    return torch.randn(like.shape, generator=generator, device=like.device, dtype=like.dtype) * noise_std


def _first_density_pass(field, evaluated: torch.Tensor | None, origins: torch.Tensor, directions: torch.Tensor,
                        depths: torch.Tensor, z_shape: torch.Tensor, s: RenderSettings, noise_std: float,
                        generator: torch.Generator | None, real: bool):
    """``skip_empty_samples``' first pass, in renders with autograd: the density without a graph at
    the samples ``evaluated`` (B, R, S) and the density noise drawn. Returns (that density or None,
    the noise or None, the samples to evaluate with autograd: those where density + noise > 0).
    Without the switch, autograd or ``density_gathered``: (None, None, ``evaluated``); under fake
    tensors the pass is priced (:func:`_price_density_pass`) and every sample kept."""
    if not (s.skip_empty_samples and torch.is_grad_enabled()):
        return None, None, evaluated
    if not real:
        if hasattr(field, "density"):
            _price_density_pass(field, origins, directions, depths, z_shape)
        return None, None, evaluated
    if evaluated is None or not hasattr(field, "density_gathered"):
        return None, None, evaluated
    first = _density_at(field, evaluated, origins, directions, depths, z_shape, s.no_grad_segment_points)
    noise = _density_noise(depths, noise_std, generator)
    return first, noise, evaluated & ((first if noise is None else first + noise) > 0)


@torch.no_grad()
def _price_density_pass(field, origins: torch.Tensor, directions: torch.Tensor, depths: torch.Tensor,
                        z_shape: torch.Tensor) -> None:
    """Under FakeTensorMode (the estimator, the FLOP counter), ``skip_empty_samples``'s first pass at
    every sample, its result dropped: which samples it would skip depends on values, so the trace
    then evaluates every sample with autograd as well, and prices both passes (an upper bound)."""
    b, r, s = depths.shape
    points = origins[:, :, None, :] + directions[:, :, None, :] * depths[..., None]
    field.density(points.reshape(b, r * s, 3), z_shape)


@torch.no_grad()
def _density_at(field, mask: torch.Tensor, origins: torch.Tensor, directions: torch.Tensor, depths: torch.Tensor,
                z_shape: torch.Tensor, segment_points: int) -> torch.Tensor:
    """The field's raw density (B, R, S) at the samples ``mask`` (B, R, S), without autograd (zero
    elsewhere), at most ``segment_points`` points per call: points computed as :func:`_query_live`
    computes them, so that its second evaluation sees the same points."""
    b, r, s = depths.shape
    n = b * r
    rays, samples = mask.reshape(n, s).nonzero(as_tuple=True)
    o, d, t = origins.reshape(n, 3), directions.reshape(n, 3), depths.reshape(n, s)
    owner = rays // r
    sigma = depths.new_zeros(n, s)
    step = max(1, segment_points)
    parts = []
    for i in range(0, rays.numel(), step):
        ray, sample = rays[i:i + step], samples[i:i + step]
        points = o[ray] + d[ray] * t[ray, sample][:, None]
        parts.append(field.density_gathered(points, z_shape, owner[i:i + step]).to(depths.dtype))
    if parts:
        sigma[rays, samples] = torch.cat(parts)
    return sigma.view(b, r, s)


def _deltas(depths: torch.Tensor, directions: torch.Tensor, segment_end: torch.Tensor | None) -> torch.Tensor:
    """Interval lengths (B, R, S) in world units: to the next sample, and for the last sample to
    ``segment_end`` (B, R, 1) or, when None, "infinity" (it absorbs what is left)."""
    deltas = depths[..., 1:] - depths[..., :-1]
    if segment_end is None:
        last = torch.full_like(deltas[..., :1], _LAST_DELTA)
    else:
        last = (segment_end - depths[..., -1:]).clamp(min=0)
    return torch.cat([deltas, last], dim=-1) * directions.norm(dim=-1, keepdim=True)


def composite(
    rgb: torch.Tensor,
    sigma_raw: torch.Tensor,
    depths: torch.Tensor,
    directions: torch.Tensor,
    noise_std: float = 0.0,
    generator: torch.Generator | None = None,
    *,
    segment_end: torch.Tensor | None = None,
    noise: torch.Tensor | None = None,
) -> dict[str, torch.Tensor]:
    """Alpha-composite samples along rays.

    rgb (B, R, S, 3), sigma_raw and depths (B, R, S), directions (B, R, 3).
    alpha_i = 1 - exp(-relu(sigma_i + noise) * delta_i), delta in world units
    (t-spacing times |direction|; the last one reaches ``segment_end`` (B, R, 1), or infinity
    when None); weights_i = alpha_i * prod_{j<i} (1 - alpha_j). The noise (std ``noise_std``) is
    drawn here, or given already drawn (``noise``, :func:`_density_noise`).
    Returns weights (B, R, S), rgb (B, R, 3) in [0, 1] (black background), depth and acc (B, R).
    """
    deltas = _deltas(depths, directions, segment_end)
    if noise is None:
        noise = _density_noise(sigma_raw, noise_std, generator)
    if noise is not None:
        sigma_raw = sigma_raw + noise
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


@torch.no_grad()
def march(
    field: nn.Module,
    origins: torch.Tensor,
    directions: torch.Tensor,
    depths: torch.Tensor,
    z_shape: torch.Tensor,
    z_appearance: torch.Tensor,
    threshold: float,
    *,
    chunk: int = 8,
    segment_points: int = 65536,
    noise_std: float = 0.0,
    generator: torch.Generator | None = None,
    segment_end: torch.Tensor | None = None,
    active: torch.Tensor | None = None,
    spacing: torch.Tensor | None = None,
    valid: torch.Tensor | None = None,
) -> dict[str, torch.Tensor]:
    """:func:`composite` of the field at ``depths`` (B, R, S) with early ray termination.

    Samples are processed front to back, ``chunk`` per ray at a time. Only live rays are
    evaluated: their points are gathered (of any sample of the batch: the field's
    ``forward_gathered`` takes each point's owner, other fields are called with one row of z
    per ray), and their weights scattered back. After each chunk a ray whose transmittance
    is <= ``threshold`` is dropped; rays with ``active`` (B, R) False never start (rays that
    miss the bounding ball). The density noise is drawn exactly as :func:`composite` draws it,
    so the result equals the full render's up to what the dropped samples would have added: at
    most ``threshold`` in opacity and colour (in [0, 1]) and ``threshold`` x the last depth in
    depth; skipped samples get weight 0. At most ``segment_points`` points per field call.
    ``spacing`` (B, R, S): the coordinates the intervals are measured in, when they are not the
    depths (the occupancy grid's occupied length); ``valid`` (B, R, S): the only samples evaluated
    (the others must have empty intervals). Also returns ``points`` (B, R), the samples
    evaluated per ray. Real tensors only (data-dependent shapes); no autograd.
    """
    b, r, s = depths.shape
    n, device = b * r, depths.device
    deltas = _deltas(depths if spacing is None else spacing, directions, segment_end).reshape(n, s)
    noise = _density_noise(depths, noise_std, generator)  # composite's draw
    noise = None if noise is None else noise.reshape(n, s)
    t = depths.reshape(n, s)
    o, d = origins.reshape(n, 3), directions.reshape(n, 3)
    view = F.normalize(d, dim=-1)
    owner = torch.arange(b, device=device).repeat_interleave(r)
    transmittance = torch.ones(n, device=device, dtype=depths.dtype)
    weights = torch.zeros(n, s, device=device, dtype=depths.dtype)
    rgb = torch.zeros(n, 3, device=device, dtype=depths.dtype)
    evaluated = torch.zeros(n, device=device, dtype=depths.dtype)
    live = torch.arange(n, device=device) if active is None else active.reshape(n).nonzero().squeeze(1)
    mask = None if valid is None else valid.reshape(n, s)
    for s0 in range(0, s, chunk):
        if live.numel() == 0:
            break
        s1 = min(s, s0 + chunk)
        colour, sigma = _query_live(field, live, t[:, s0:s1], o, d, view, owner, z_shape, z_appearance, segment_points,
                                    None if mask is None else mask[:, s0:s1])
        colour, sigma = colour.to(depths.dtype), sigma.to(depths.dtype)
        if noise is not None:
            sigma = sigma + noise[live, s0:s1]
        alpha = 1.0 - torch.exp(-F.relu(sigma) * deltas[live, s0:s1])
        # the same exclusive cumprod as composite's, continued from each ray's transmittance so far
        trans = torch.cumprod(torch.cat([transmittance[live, None], 1.0 - alpha + 1e-10], dim=-1), dim=-1)
        w = alpha * trans[:, :-1]
        weights[live, s0:s1] = w
        transmittance[live] = trans[:, -1]
        rgb.index_add_(0, live, (w[..., None] * colour).sum(dim=1))
        evaluated[live] += s1 - s0 if mask is None else mask[live, s0:s1].sum(dim=1).to(depths.dtype)
        live = live[trans[:, -1] > threshold]
    return {
        "weights": weights.view(b, r, s),
        "rgb": rgb.view(b, r, 3),
        "depth": (weights * t).sum(dim=-1).view(b, r),
        "acc": weights.sum(dim=-1).view(b, r),
        "points": evaluated.view(b, r),
    }


def _query_live(field, live, t, o, d, view, owner, z_shape, z_appearance, segment_points, mask=None):
    """The field at the live rays' depths ``t[live]`` (L, k): colour (L, k, 3), raw density (L, k),
    at most ``segment_points`` points per call. The field's ``forward_gathered`` (if it has one)
    takes each point's owning sample; other fields get one row of z per ray. ``mask`` (rays, k):
    evaluate only those samples (zero at the others; fields with ``forward_gathered`` only)."""
    k = t.shape[1]
    gathered = getattr(field, "forward_gathered", None)
    rays_per_call = max(1, segment_points // k)
    colours, sigmas = [], []
    for i in range(0, live.numel(), rays_per_call):
        ids = live[i:i + rays_per_call]
        points = o[ids, None, :] + d[ids, None, :] * t[ids][..., None]  # (L, k, 3)
        dirs = view[ids, None, :].expand(-1, k, -1)
        if gathered is not None and mask is not None:
            where = mask[ids].nonzero(as_tuple=True)
            c, sg = gathered(points[where], dirs[where], z_shape, z_appearance, owner[ids][where[0]])
            c = c.new_zeros(*points.shape[:2], c.shape[-1]).index_put(where, c)
            sg = sg.new_zeros(points.shape[:2]).index_put(where, sg.reshape(-1))
        elif gathered is not None:
            c, sg = gathered(points.reshape(-1, 3), dirs.reshape(-1, 3), z_shape, z_appearance,
                             owner[ids].repeat_interleave(k))
        else:
            c, sg = field(points, dirs, z_shape[owner[ids]], z_appearance[owner[ids]])
        colours.append(c.reshape(-1, k, 3))
        sigmas.append(sg.reshape(-1, k))
    if not colours:  # no live ray
        return t.new_zeros(0, k, 3), t.new_zeros(0, k)
    return torch.cat(colours), torch.cat(sigmas)


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
