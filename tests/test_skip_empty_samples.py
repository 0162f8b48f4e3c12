"""``memory.skip_empty_samples``: with autograd, only the samples of positive density (plus noise)
are evaluated a second time with a graph. Where ReLU(density + noise) = 0 a sample adds no opacity
and gets no gradient, so the image and every gradient must equal the render that evaluates every
sample with autograd: checked at equal weights in float64 against the plain path (a field without
``forward_gathered``/``density_gathered``, which the renderer evaluates in full), and in a whole
training step."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from grafccsr.camera import full_grid, pose_matrix, rays_from_grid
from grafccsr.config import load_config
from grafccsr.models import build_models
from grafccsr.models.occupancy import OccupancyGrid
from grafccsr.models.render import RenderSettings, render_rays
from test_occupancy import _AllRays  # the field with only forward: every sample of every ray evaluated


def _rays(size=10, views=3):
    u = torch.arange(views, dtype=torch.float32) / views + 0.03
    c2w = pose_matrix(u, torch.full_like(u, 0.3), 2.5)
    return (t.double() for t in rays_from_grid(c2w, full_grid(size, views), 20.0))


CASES = {
    "plain": [],
    "importance": ["model.render.importance_samples=3"],
    "ball": ["model.render.bound_radius=0.6"],
    "grid_spaced": ["model.occupancy.enabled=true", "model.occupancy.resolution=16",
                    "model.occupancy.sample_spacing=0.1"],
}


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("iteration", [0, 10_000], ids=["noise", "no_noise"])
@pytest.mark.parametrize("checkpointed", [False, True])
def test_values_and_gradients_equal_the_render_of_every_sample(case, iteration, checkpointed):
    cfg = load_config(["tracking=none", "model.render.samples_per_ray=6", "memory.skip_empty_samples=true",
                       *CASES[case]])
    s = dataclasses.replace(RenderSettings.from_config(cfg), grad_checkpoint=checkpointed,
                            checkpoint_segment_points=300)
    assert s.skip_empty_samples and s.noise_std(iteration) == (1.0 if iteration == 0 else 0.0)
    torch.manual_seed(0)
    field = build_models(cfg, 2)[0].field.double()
    origins, directions = _rays()
    occupancy = None
    if cfg.model.occupancy.enabled:
        grid = OccupancyGrid(cfg.model.occupancy, 2)
        grid.occupied.zero_()
        grid.occupied[:, 6:10, 6:10, 6:10] = True
        occupancy = grid.sampler(torch.tensor([0, 1, 0]), s.occupancy_half_size, s.occupancy_steps)
    zs = torch.randn(3, field.shape_input_dim, dtype=torch.float64)
    za = torch.randn(3, cfg.model.field.z_appearance_dim, dtype=torch.float64)

    def run(net):
        net.zero_grad()
        rng = torch.Generator().manual_seed(1)
        out = render_rays(net, origins, directions, zs, za, s, iteration=iteration, generator=rng,
                          occupancy=occupancy)
        weights = torch.linspace(-1, 1, out["rgb"].numel(), dtype=torch.float64).view_as(out["rgb"])
        ((out["rgb"] * weights).sum() + out["acc"].square().sum() + out["depth"].sum()).backward()
        return out, [p.grad.clone() for p in field.parameters()]

    dense, grads = run(field)
    full, full_grads = run(_AllRays(field))
    graph, points = dense["graph_points"].sum(), dense["points"].sum()
    assert 0.05 * points < graph < 0.9 * points  # some samples skipped, some kept
    for key in ("rgb", "acc", "depth"):
        torch.testing.assert_close(dense[key], full[key], rtol=0, atol=1e-12)
        assert full[key].abs().max() > 1e-3  # the render is not empty
    for g, ref in zip(grads, full_grads):
        torch.testing.assert_close(g, ref, rtol=1e-9, atol=1e-12)
    assert any(g.abs().max() > 0 for g in full_grads)


def test_a_training_step_learns_the_same_and_reports_the_samples_with_a_graph():
    """One D step and one G step from the same seed with and without the switch: equal weights
    after them (float32), and ``perf/graph_points_per_ray`` below ``perf/points_per_ray``."""
    from grafccsr.sizing.synthetic import synthetic_run

    params, sums = [], []
    for skip in (False, True):
        cfg = load_config(["+exp=smoke", "tracking=none", f"memory.skip_empty_samples={str(skip).lower()}"])
        step, batch = synthetic_run(cfg, 2, "cpu", seed=0)
        step.d_step(batch, 600)
        sums.append(step.g_step(batch, 600))
        params.append([p.detach().clone() for p in step.generator.parameters()])
    plain, skipped = sums
    assert float(plain["perf/graph_points_per_ray"]) == float(plain["perf/points_per_ray"])
    assert 0 < float(skipped["perf/graph_points_per_ray"]) < float(skipped["perf/points_per_ray"])
    assert float(skipped["perf/points_per_ray"]) == float(plain["perf/points_per_ray"])
    torch.testing.assert_close(skipped["loss/g"], plain["loss/g"], rtol=1e-5, atol=1e-6)
    for a, b in zip(*params):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


def test_the_flop_counter_prices_both_passes_as_an_upper_bound():
    """Under fake tensors which samples are empty is unknown: every sample keeps its graph and the
    density pass is priced on top (one trunk per sample, between nothing and a full forward)."""
    from grafccsr.bench.flops import fake_iteration_flops

    base = ["+exp=smoke", "tracking=none"]
    plain = fake_iteration_flops(load_config(base))
    skip = fake_iteration_flops(load_config(base + ["memory.skip_empty_samples=true"]))
    cfg = load_config(base)
    field = cfg.model.field
    rays = cfg.train.batch_size * cfg.model.patch.rays_per_patch * cfg.model.render.samples_per_ray
    assert rays * 2 * field.width * field.width < skip - plain < plain / 3
