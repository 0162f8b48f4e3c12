"""Fewer field evaluations at equal quality: rays clipped to the scene's ball, the generator's
occupancy grid (more in tests/test_occupancy.py), coarse-to-fine importance sampling, early ray
termination. Each switch against the plain render and the analytic sphere (tests/test_models.py)."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from torch import nn

from grafccsr.config import Config, load_config
from grafccsr.models.field import RadianceField
from grafccsr.models.render import RenderSettings, ray_bounds, render_rays, stratified_depths
from test_models import SphereField, _analytic_sphere, _sphere_rays

DENSITY, RADIUS, BALL = 3.0, 0.3, 0.37


def settings(**changes) -> RenderSettings:
    base = dataclasses.replace(RenderSettings.from_config(Config()), near=1.5, far=4.5, importance_samples=0)
    return dataclasses.replace(base, **changes)


class CountingField(nn.Module):
    """Wraps a field and counts the points it evaluates (both call forms)."""

    def __init__(self, inner: nn.Module):
        super().__init__()
        self.inner, self.points = inner, 0

    def forward(self, points, view_dirs, z_shape, z_appearance):
        self.points += points.shape[0] * points.shape[1]
        return self.inner(points, view_dirs, z_shape, z_appearance)


class LearnableSphere(SphereField):
    """SphereField whose density and colour are parameters (for gradients)."""

    def __init__(self, density: float, radius: float):
        super().__init__(density, radius)
        self.log_density = nn.Parameter(torch.tensor(float(density)).log())
        self.colour = nn.Parameter(torch.tensor(0.75))

    def forward(self, points, view_dirs, z_shape, z_appearance):
        inside = (points.norm(dim=-1) <= self.radius).to(points.dtype)
        return self.colour.expand_as(points), inside * self.log_density.exp()


def _errors(out, origins, directions, density=DENSITY, radius=RADIUS):
    acc, depth = _analytic_sphere(origins, directions, density, radius)
    return (out["acc"] - acc).abs().max().item(), (out["depth"] - depth).abs().max().item()


def test_ray_bounds_are_the_ball_inside_near_far():
    origins, directions = _sphere_rays()
    lo, hi, hit = ray_bounds(origins, directions, 1.5, 4.5, BALL)
    assert hit.any() and (~hit).any()
    for t in (lo[..., 0], hi[..., 0]):
        radius = (origins + directions * t[..., None]).norm(dim=-1)
        torch.testing.assert_close(radius[hit], torch.full_like(radius[hit], BALL), atol=1e-5, rtol=0)
    assert torch.equal(lo[~hit], hi[~hit])
    depths = stratified_depths(origins, lo, hi, 16, True, torch.Generator().manual_seed(0))
    assert (depths >= lo - 1e-6).all() and (depths <= hi + 1e-6).all()


def test_clipped_rays_render_the_sphere_with_a_quarter_of_the_samples():
    """16 samples inside the 0.37 ball are at least as close to the analytic sphere as 64 on
    [near, far] (max error of opacity and depth; 0.041 / 0.099 against 0.045 / 0.106 at the time
    of writing), 32 there are 4x closer; rays that miss the ball render exactly nothing."""
    origins, directions = _sphere_rays()
    field, z = SphereField(DENSITY, RADIUS), torch.zeros(1, 1)
    plain = render_rays(field, origins, directions, z, z, settings(samples_per_ray=64))
    clipped = render_rays(field, origins, directions, z, z, settings(samples_per_ray=16, bound_radius=BALL))
    clipped32 = render_rays(field, origins, directions, z, z, settings(samples_per_ray=32, bound_radius=BALL))
    plain_err, clipped_err = _errors(plain, origins, directions), _errors(clipped, origins, directions)
    clipped32_err = _errors(clipped32, origins, directions)
    assert clipped_err[0] <= plain_err[0] and clipped_err[1] <= plain_err[1], (clipped_err, plain_err)
    assert clipped32_err[0] <= plain_err[0] / 3 and clipped32_err[1] <= plain_err[1] / 3, (clipped32_err, plain_err)
    _, _, hit = ray_bounds(origins, directions, 1.5, 4.5, BALL)
    assert (clipped["acc"][~hit] == 0).all() and (clipped["depth"][~hit] == 0).all()
    assert (clipped["rgb"][~hit] == -1).all()


def test_clipped_render_gradients_match_the_plain_render():
    """d(loss)/d(density, colour) of 512 clipped samples equals the plain render's at 8192
    samples (about the same spacing) within 1 %: clipping removes only empty space."""
    origins, directions = _sphere_rays()
    z = torch.zeros(1, 1)
    grads = []
    for s in (settings(samples_per_ray=8192), settings(samples_per_ray=512, bound_radius=BALL)):
        field = LearnableSphere(DENSITY, RADIUS)
        out = render_rays(field, origins, directions, z, z, s)
        (out["rgb"].square().sum() + out["depth"].sum()).backward()
        grads.append(torch.stack([field.log_density.grad, field.colour.grad]))
    torch.testing.assert_close(grads[1], grads[0], rtol=0.01, atol=1e-3)


def test_coarse_to_fine_places_samples_on_the_object_and_trains_through_the_fine_pass():
    """The existing hierarchical pass as a switch. It is NeRF's (fine depths drawn from the coarse
    weights, the union re-rendered with NeRF's left-point quadrature); it converges to the analytic
    sphere (tests/test_models.py, 48 + 96). It is NO substitute for 64 stratified samples at equal
    quality: on this hard-edged semi-transparent sphere 16 + 16 is off by 0.089 in opacity where
    64 plain are off by 0.045 and 16 plain by 0.066 (the fine samples crowd inside the object and
    the interval that straddles its far edge stays coarse). What holds: the merged pass evaluates
    mostly on the object, and only it carries gradient."""
    origins, directions = _sphere_rays()
    z = torch.zeros(1, 1)
    field = LearnableSphere(DENSITY, RADIUS)
    s = settings(samples_per_ray=16, importance_samples=16)
    fine = render_rays(field, origins, directions, z, z, s)
    fine["acc"].sum().backward()
    assert field.log_density.grad.abs() > 0
    assert s.field_points_per_ray == 48
    # where the merged pass evaluates: inside the sphere, on rays that hit it
    seen = []
    counter = CountingField(SphereField(DENSITY, RADIUS))
    counter.inner.forward = lambda p, *a, _f=counter.inner.forward: seen.append(p) or _f(p, *a)
    with torch.no_grad():
        render_rays(counter, origins, directions, z, z, s)
    coarse, merged = (p.reshape(-1, 3).norm(dim=-1) <= RADIUS for p in seen)
    assert merged.float().mean() > 1.5 * coarse.float().mean()


def _smoke_field(opaque: bool) -> tuple[RadianceField, torch.Tensor]:
    cfg = load_config(["+exp=smoke", "tracking=none"]).model.field
    torch.manual_seed(0)
    field = RadianceField(cfg)
    if opaque:
        with torch.no_grad():
            field.density_head.bias.fill_(4.0)
    return field, torch.randn(2, cfg.z_shape_dim)


@pytest.mark.parametrize("case", ["sphere", "radiance_field", "noise_jitter", "importance", "bound_chunked"])
def test_early_termination_equals_the_full_render_within_the_threshold(case):
    """Without autograd, a ray stops being evaluated once its transmittance is <= 1e-3; opacity
    and colour (in [0, 1]) stay within 1e-3 of the full render, depth within far * 1e-3, and fewer
    points are evaluated. With density noise and jitter the random draws are the same."""
    tau = 1e-3
    gen = lambda: torch.Generator().manual_seed(3)  # noqa: E731
    kwargs: dict = {}
    base = settings(samples_per_ray=48, perturb=False, density_noise_std=0.0, termination_chunk=4)
    if case in ("sphere", "importance", "bound_chunked"):
        origins, directions = _sphere_rays()
        inner, z = SphereField(30.0, RADIUS), torch.zeros(1, 1)
    else:
        origins, directions = _sphere_rays()
        origins, directions = origins.expand(2, -1, -1), directions.expand(2, -1, -1)
        inner, z = _smoke_field(opaque=True)
    if case == "noise_jitter":
        base = dataclasses.replace(base, perturb=True, density_noise_std=1.0, density_noise_decay_iters=10)
        kwargs = {"iteration": 0}
    if case == "importance":
        base = dataclasses.replace(base, samples_per_ray=24, importance_samples=24)
    if case == "bound_chunked":
        base = dataclasses.replace(base, bound_radius=BALL, chunk=5, no_grad_segment_points=16)
    z_app = z if z.shape[-1] == 1 else torch.randn(2, 8)
    field = CountingField(inner)
    with torch.no_grad():
        full = render_rays(field, origins, directions, z, z_app, base, generator=gen(), **kwargs)
        full_points, field.points = field.points, 0
        early = render_rays(field, origins, directions, z, z_app,
                            dataclasses.replace(base, termination_transmittance=tau), generator=gen(), **kwargs)
    saved = {"sphere": 0.9, "radiance_field": 0.7, "noise_jitter": 0.7, "importance": 0.9, "bound_chunked": 0.5}
    assert field.points < saved[case] * full_points, (field.points, full_points)
    torch.testing.assert_close(early["acc"], full["acc"], atol=tau + 1e-6, rtol=0)
    torch.testing.assert_close(early["rgb"], full["rgb"], atol=2 * tau + 1e-6, rtol=0)
    torch.testing.assert_close(early["depth"], full["depth"], atol=4.5 * tau + 1e-6, rtol=0)


def test_early_termination_uses_the_gathered_field_and_is_off_with_autograd():
    field, z = _smoke_field(opaque=True)
    origins, directions = _sphere_rays()
    origins, directions = origins.expand(2, -1, -1), directions.expand(2, -1, -1)
    z_app = torch.randn(2, 8)
    s = settings(samples_per_ray=32, termination_transmittance=1e-3)
    calls = []
    field.forward_gathered = lambda *a, _f=field.forward_gathered: calls.append(1) or _f(*a)
    with torch.no_grad():
        render_rays(field, origins, directions, z, z_app, s)
    assert calls  # the live points of both samples, gathered with their owners
    calls.clear()
    with_grad = render_rays(field, origins, directions, z, z_app, s)
    plain = render_rays(field, origins, directions, z, z_app, dataclasses.replace(s, termination_transmittance=0.0))
    assert not calls and with_grad["rgb"].requires_grad
    for key in plain:
        assert torch.equal(with_grad[key], plain[key])


def test_switches_trace_under_fake_tensor_mode():
    """No value-dependent Python on the autograd path; termination falls back to the full render
    on fake tensors (the estimator's upper bound)."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    cfg = load_config(["+exp=smoke", "tracking=none"]).model.field
    s = settings(samples_per_ray=8, importance_samples=4, perturb=True, density_noise_std=1.0,
                 density_noise_decay_iters=10, bound_radius=BALL, termination_transmittance=1e-3, chunk=5)
    with FakeTensorMode():
        field = RadianceField(cfg)
        origins, directions = torch.randn(2, 16, 3), torch.randn(2, 16, 3)
        out = render_rays(field, origins, directions, torch.randn(2, 8), torch.randn(2, 8), s, iteration=0)
        out["rgb"].sum().backward()
        with torch.no_grad():
            fake_eval = render_rays(field, origins, directions, torch.randn(2, 8), torch.randn(2, 8), s)
    assert out["rgb"].shape == fake_eval["rgb"].shape == (2, 16, 3)


def test_render_settings_carry_the_switches():
    cfg = load_config(["tracking=none", "model.render.bound_radius=0.37",
                       "model.render.termination_transmittance=0.001", "model.render.termination_chunk=4"])
    s = RenderSettings.from_config(cfg)
    assert (s.bound_radius, s.termination_transmittance, s.termination_chunk) == (0.37, 0.001, 4)
    from grafccsr.config import ConfigError

    with pytest.raises(ConfigError, match="model.render.bound_radius"):
        load_config(["tracking=none", "model.render.bound_radius=3.0"])


def _sphere_grid(resolution: int = 64):
    """An occupancy grid learned from the analytic sphere's density (its warm-up, then a switch)."""
    from grafccsr.models.occupancy import OccupancyGrid

    cfg = load_config(["tracking=none", "model.occupancy.enabled=true", f"model.occupancy.resolution={resolution}"])
    s = RenderSettings.from_config(cfg)
    grid = OccupancyGrid(cfg.model.occupancy, 1)
    density = lambda points, rng: torch.where(points.norm(dim=-1) <= RADIUS, DENSITY, 0.0)  # noqa: E731
    occ = cfg.model.occupancy
    for k in range(occ.warmup_iters // occ.update_every + 1):
        grid.update(k * occ.update_every, s.occupancy_half_size, density, seed=0)
    return grid, s


def test_the_occupancy_grid_renders_the_sphere_without_being_told_its_radius():
    """No radius given: 32 samples in the cells a 64^3 grid learned from the sphere's own density
    are at least 3x closer to the analytic sphere than 64 on [near, far] (0.014 / 0.030 against
    0.045 / 0.106 at the time of writing); rays the grid says miss render nothing."""
    origins, directions = _sphere_rays()
    field, z = SphereField(DENSITY, RADIUS), torch.zeros(1, 1)
    grid, s = _sphere_grid()
    sampler = grid.sampler(torch.zeros(1, dtype=torch.long), s.occupancy_half_size, s.occupancy_steps)
    plain = render_rays(field, origins, directions, z, z, settings(samples_per_ray=64))
    grid32 = render_rays(field, origins, directions, z, z, dataclasses.replace(s, samples_per_ray=32, perturb=False),
                         occupancy=sampler)
    plain_err, grid_err = _errors(plain, origins, directions), _errors(grid32, origins, directions)
    assert grid_err[0] <= plain_err[0] / 3 and grid_err[1] <= plain_err[1] / 3, (grid_err, plain_err)
    assert not grid.occupied.all() and grid.occupied.float().mean() < 0.01


def test_fast_preset_uses_the_grid_and_no_termination_that_could_not_fire():
    """``+exp=fast``: the occupancy grid, no radius, 8 samples. Early termination is not in it: a
    ray's transmittance is checked after every ``termination_chunk`` samples, so with 8 samples and
    the default chunk of 8 it was only checked after the last one and never saved a point (shown
    here on an opaque sphere); with a chunk of 2 it does, but on a +exp=fast generator trained for
    1000 iterations it saved 0.04 % of the points (README)."""
    cfg = load_config(["+exp=fast", "tracking=none"])
    render = cfg.model.render
    assert cfg.model.occupancy.enabled and render.bound_radius == 0 and render.termination_transmittance == 0
    assert render.samples_per_ray == 8
    origins, directions = _sphere_rays()
    z = torch.zeros(1, 1)
    points = {}
    for chunk in (8, 2):
        field = CountingField(SphereField(30.0, RADIUS))
        with torch.no_grad():
            render_rays(field, origins, directions, z, z, settings(samples_per_ray=8, bound_radius=BALL,
                                                                   termination_transmittance=0.01,
                                                                   termination_chunk=chunk))
        points[chunk] = field.points
    _, _, hit = ray_bounds(origins, directions, 1.5, 4.5, BALL)
    assert points[8] == 8 * int(hit.sum())  # every sample of every ray that enters the ball
    assert points[2] < points[8]
