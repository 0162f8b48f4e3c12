"""Models: poses, patch sampling, radiance field, renderer, CCSR, generator, discriminator."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from grafccsr.camera import full_grid, pose_matrix, rays_from_grid
from grafccsr.config import CCSRConfig, DiscriminatorConfig, PatchConfig, PoseConfig, load_config
from grafccsr.models import build_models, parameter_summary
from grafccsr.models.ccsr import CCSR, consistency_weight
from grafccsr.models.discriminator import PatchDiscriminator
from grafccsr.models.field import PositionalEncoding, RadianceField
from grafccsr.models.poses import poses_from_labels, sample_random_poses
from grafccsr.models.rays import PatchSampler, sample_patches, upsample_grid
from grafccsr.config import Config
from grafccsr.models.render import RenderSettings, render_rays
from grafccsr.training.losses import ccsr_consistency_loss, g_loss


@pytest.fixture(scope="module")
def smoke_cfg():
    return load_config(["+exp=smoke", "tracking=none"])


def smoke_with(*overrides: str):
    return load_config(["+exp=smoke", "tracking=none", *overrides])


def settings(cfg=None, **changes) -> RenderSettings:
    """The render settings of ``cfg`` (default: the default config) with fields replaced."""
    import dataclasses

    return dataclasses.replace(RenderSettings.from_config(cfg or Config()), **changes)


# --------------------------------------------------------------------------- poses


def test_poses_from_labels_gathers_elevation_and_azimuth():
    labels = torch.tensor([[0, 0, 0], [1, 3, 90], [0, 2, 359]])
    u, v = poses_from_labels(labels, [0.5, 0.4, 0.3, 0.2])
    torch.testing.assert_close(u, torch.tensor([0.0, 0.25, 359 / 360]))
    torch.testing.assert_close(v, torch.tensor([0.5, 0.2, 0.3]))


def test_random_poses_stay_in_range():
    cfg = PoseConfig(u_range=[0.1, 0.3], v_range=[0.2, 0.5])
    u, v = sample_random_poses(500, cfg, "cpu", torch.Generator().manual_seed(0))
    assert u.shape == v.shape == (500,)
    assert 0.1 <= u.min() and u.max() <= 0.3 and u.max() - u.min() > 0.15
    assert 0.2 <= v.min() and v.max() <= 0.5 and v.max() - v.min() > 0.25


@pytest.mark.parametrize("v", [0.0, 0.2, 0.5, 0.8, 1.0])
def test_cameras_sit_on_the_sphere_and_look_at_origin(v):
    u = torch.tensor([0.0, 0.13, 0.5, 0.77])
    c2w = pose_matrix(u, torch.full_like(u, v), radius=2.5)
    assert torch.isfinite(c2w).all()
    rotation, eye = c2w[:, :3, :3], c2w[:, :3, 3]
    torch.testing.assert_close(eye.norm(dim=-1), torch.full((4,), 2.5))
    torch.testing.assert_close(rotation.transpose(1, 2) @ rotation, torch.eye(3).expand(4, 3, 3), atol=1e-5, rtol=0)
    torch.testing.assert_close(torch.linalg.det(rotation), torch.ones(4), atol=1e-5, rtol=0)
    forward = -rotation[:, :, 2]  # the camera looks down its -z axis
    torch.testing.assert_close(forward, -eye / 2.5, atol=1e-5, rtol=0)
    # the centre ray of an image passes through the origin
    origins, directions = rays_from_grid(c2w, torch.zeros(4, 1, 1, 2), fov_deg=20.0)
    closest = origins - (origins * directions).sum(-1, keepdim=True) / directions.norm(dim=-1, keepdim=True) ** 2 * directions
    torch.testing.assert_close(closest, torch.zeros_like(closest), atol=1e-5, rtol=0)


# --------------------------------------------------------------------------- patches


@pytest.mark.parametrize("side", [16, 32])
def test_point_sampled_reals_match_a_perfect_generator(side):
    """Real and fake patches are sampled alike: a perfect generator (the embedded scene traced
    at the patch's rays, one ray per patch pixel) matches the point-sampled real patch within
    0.035 mean absolute error in [-1, 1] units, at every patch scale (what remains is the
    data's own 2x2 supersampling and the bilinear lookup). Box-filtered reals (the old
    ``antialias``) are at least 1.5x further on whole-image patches."""
    from grafccsr.config import CameraConfig
    from grafccsr.data.synthetic import class_styles, render_views, shade_rays

    cam, gen, n = CameraConfig(), torch.Generator().manual_seed(0), 16
    u, v = torch.rand(n, generator=gen), 0.2 + 0.3 * torch.rand(n, generator=gen)
    for low, high in ((0.9, 1.0), (0.5, 0.6), (0.25, 0.3)):
        sampler = PatchSampler(PatchConfig(rays_per_patch=side * side, min_scale=low, max_scale=high,
                                           min_scale_cap=low))
        errors = {True: 0.0, False: 0.0}
        for style in class_styles(2, 0):
            real = render_views(style, u, v, 64, 2, cam) * 2 - 1
            grid, _ = sampler.sample(n, 10**6, "cpu", gen)
            origins, dirs = rays_from_grid(pose_matrix(u, v, cam.radius), grid, cam.fov_deg)
            traced = shade_rays(style, origins.reshape(-1, 3), dirs.reshape(-1, 3), cam.near, cam.far)
            perfect = traced.view(n, side, side, 3).permute(0, 3, 1, 2) * 2 - 1
            for antialias in errors:
                errors[antialias] += (sample_patches(real, grid, antialias=antialias) - perfect).abs().mean().item() / 2
        assert errors[False] <= 0.035, (side, low, errors)
        if low == 0.9:
            assert errors[True] >= 1.5 * errors[False], (side, errors)


@pytest.mark.parametrize("sampling", ["full", "multiscale"])
def test_align_corners_grids_read_the_originals_image_points(sampling):
    """With ``align_corners`` the grid is GRAF's linspace(-1, 1, P) read with align_corners=True:
    our (align_corners=False) grid samples the same image points, at every scale and shift,
    and at P = image size a whole-image patch is the image itself, as without it."""
    cfg = PatchConfig(rays_per_patch=256, sampling=sampling, min_scale=0.3)
    images = torch.randn(2, 3, 40, 40)
    gen = torch.Generator().manual_seed(0)
    grid, scale = PatchSampler(dataclasses.replace(cfg, align_corners=True), image_size=40).sample(2, 10**6, "cpu", gen)
    gen.manual_seed(0)
    plain, _ = PatchSampler(cfg).sample(2, 10**6, "cpu", gen)
    # the original's grid: linspace(-1, 1, 16) * scale + shift, which is what ``plain`` holds up to
    # the linspace-vs-cell-centre spacing; rebuild it from the same draws
    shift = plain.mean(dim=(1, 2))
    coords = torch.linspace(-1, 1, 16)
    yy, xx = torch.meshgrid(coords, coords, indexing="ij")
    original = torch.stack((xx, yy), -1)[None] * scale[:, None, None, None] + shift[:, None, None, :]
    ours = sample_patches(images, grid)
    theirs = F.grid_sample(images, original, mode="bilinear", padding_mode="border", align_corners=True)
    torch.testing.assert_close(ours, theirs, atol=1e-4, rtol=0)  # float32 coordinates
    full = PatchSampler(PatchConfig(rays_per_patch=1600, sampling="full", align_corners=True), image_size=40)
    torch.testing.assert_close(sample_patches(images, full.sample(2, 0, "cpu")[0]), images, atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match="image_size"):
        PatchSampler(dataclasses.replace(cfg, align_corners=True))


def test_patch_sampler_scales_anneal_and_stay_in_bounds():
    cfg = PatchConfig(rays_per_patch=64, min_scale=0.25, max_scale=1.0, scale_anneal=0.5, anneal_every=10)
    sampler = PatchSampler(cfg)
    assert sampler.min_scale_at(0) == 0.9  # GRAF's cap: several scales from the first iteration
    assert sampler.min_scale_at(9) == 0.9  # anneals in whole steps of anneal_every
    assert PatchSampler(PatchConfig(rays_per_patch=64, min_scale_cap=1.0)).min_scale_at(0) == 1.0
    assert sampler.min_scale_at(10) == pytest.approx(math.exp(-0.5))
    assert sampler.min_scale_at(25) == pytest.approx(math.exp(-1.0))
    assert sampler.min_scale_at(10_000) == 0.25
    gen = torch.Generator().manual_seed(0)
    for iteration in (0, 10, 10_000):
        grid, scale = sampler.sample(256, iteration, "cpu", gen)
        assert grid.shape == (256, 8, 8, 2) and scale.shape == (256,)
        assert (scale >= sampler.min_scale_at(iteration) - 1e-6).all() and (scale <= 1.0).all()
        assert grid.abs().max() <= 1.0
        # a patch spans `scale` of the image side: its extent between outer cell edges is 2 * scale
        extent = (grid[:, 0, -1, 0] - grid[:, 0, 0, 0]) * 8 / 7
        torch.testing.assert_close(extent, 2 * scale)
    assert scale.min() < 0.3  # the annealed range is really used
    shifts = grid.mean(dim=(1, 2))
    assert shifts.abs().max() > 0.3  # and patches move around


def test_full_sampling_is_the_whole_image_pixel_centres():
    sampler = PatchSampler(PatchConfig(rays_per_patch=256, sampling="full"))
    grid, scale = sampler.sample(3, 12345, "cpu")
    torch.testing.assert_close(grid, full_grid(16, 3))
    torch.testing.assert_close(scale, torch.ones(3))


def test_non_square_ray_count_is_rejected():
    with pytest.raises(ValueError, match="model.patch.rays_per_patch"):
        PatchSampler(PatchConfig(rays_per_patch=2048))


def test_full_grid_at_image_resolution_reproduces_the_image():
    images = torch.rand(2, 3, 16, 16)
    for antialias in (False, True):
        torch.testing.assert_close(sample_patches(images, full_grid(16, 2), antialias), images, atol=1e-5, rtol=0)


def test_antialias_area_averages_coarse_patches_per_sample():
    # columns j with j % 4 in {1, 2} are +1, the others -1: a 16-point grid over 64
    # pixels lands between columns 4i+1 and 4i+2, so point sampling sees +1 everywhere
    column = torch.tensor([-1.0, 1.0, 1.0, -1.0]).repeat(16)
    images = column.expand(2, 3, 64, 64).contiguous()
    grid = full_grid(16, 2).clone()
    grid[0] *= 0.25  # sample 0: a quarter-size patch, one pixel per point
    aliased = sample_patches(images, grid, antialias=False)
    filtered = sample_patches(images, grid, antialias=True)
    assert aliased[1].min() == 1.0  # the aliasing this guards against
    torch.testing.assert_close(filtered[1], torch.zeros(3, 16, 16), atol=1e-5, rtol=0)  # 4x4 area mean
    torch.testing.assert_close(filtered[0], aliased[0], atol=1e-5, rtol=0)  # fine patch untouched


def test_upsample_grid_covers_the_same_region_at_higher_density():
    torch.testing.assert_close(upsample_grid(full_grid(8, 2), 2), full_grid(16, 2))
    grid, _ = PatchSampler(PatchConfig(rays_per_patch=64, min_scale=0.3)).sample(4, 10**6, "cpu")
    fine = upsample_grid(grid, 4)
    assert fine.shape == (4, 32, 32, 2)
    torch.testing.assert_close(fine.mean(dim=(1, 2)), grid.mean(dim=(1, 2)))
    # outer cell edges agree: coarse extent * 8/7 == fine extent * 32/31
    coarse_extent = (grid[:, 0, -1, 0] - grid[:, 0, 0, 0]) * 8 / 7
    fine_extent = (fine[:, 0, -1, 0] - fine[:, 0, 0, 0]) * 32 / 31
    torch.testing.assert_close(coarse_extent, fine_extent)


# --------------------------------------------------------------------------- field


def test_positional_encoding_dims():
    assert PositionalEncoding(10).out_dim == 63 and PositionalEncoding(10)(torch.zeros(2, 5, 3)).shape == (2, 5, 63)
    assert PositionalEncoding(4).out_dim == 27 and PositionalEncoding(4)(torch.zeros(7, 3)).shape == (7, 27)


def test_radiance_field_parameter_count_at_graf_defaults():
    field = RadianceField(load_config(["model=graf", "tracking=none"]).model.field)
    count = sum(p.numel() for p in field.parameters())
    assert abs(count - 730_000) <= 73_000, count


def test_radiance_field_shapes_and_ranges(smoke_cfg):
    field = RadianceField(smoke_cfg.model.field)
    rgb, sigma = field(torch.randn(3, 10, 3), F.normalize(torch.randn(3, 10, 3), dim=-1), torch.randn(3, 8), torch.randn(3, 8))
    assert rgb.shape == (3, 10, 3) and sigma.shape == (3, 10)
    assert rgb.min() >= 0 and rgb.max() <= 1


def _plain_field(field: RadianceField, points, view_dirs, z_shape, z_appearance):
    """The radiance field as the class docstring states it, written the plain way: every
    input concatenated per point, the skip input concatenated again, a linear feature layer
    before the colour branch. Uses ``field``'s parameters."""
    b, n, _ = points.shape
    per_point = lambda z: z[:, None, :].expand(b, n, z.shape[-1])  # noqa: E731
    # skip_latent=raw: the shape input is [conditioned, raw]; the skip re-injects the raw half
    z_first, z_skip = z_shape.chunk(2, dim=-1) if field.cfg.skip_latent == "raw" else (z_shape, z_shape)
    x_in = torch.cat([field.xyz_encoding(points), per_point(z_first)], dim=-1)
    skip_in = torch.cat([field.xyz_encoding(points), per_point(z_skip)], dim=-1)
    h = x_in
    for i, layer in enumerate(field.trunk):
        h = torch.relu(layer(h))
        if i in field.skips:
            h = torch.cat([skip_in, h], dim=-1)
    sigma = field.density_head(h).squeeze(-1)
    feature = field.feature(h)
    view = torch.relu(field.view_layer(torch.cat([feature, field.dir_encoding(view_dirs), per_point(z_appearance)], -1)))
    return torch.sigmoid(field.rgb_head(view)), sigma


@pytest.mark.parametrize("execution", ["fused", "concat"])
@pytest.mark.parametrize("sizes", ["+exp=smoke", "model=small", "model=graf", "+exp=graf_ccsr_original"])
def test_fused_field_equals_the_plain_concatenating_mlp(sizes, execution):
    """Both executions of the field (fused: per-sample latent matmuls, composed colour layers;
    concat: the original's per-point concatenation) are the same function with the same
    gradients (parameters and z) as the plain concatenating MLP, weights shared; also
    graf_ccsr's field (all 256 z dims in the trunk, no appearance code). ``forward_gathered``
    (points of several samples mixed, each with its owner) is the same function again."""
    cfg = dataclasses.replace(load_config([sizes, "tracking=none"]).model.field, execution=execution)
    torch.manual_seed(0)
    field = RadianceField(cfg).double()
    for p in field.parameters():  # non-zero biases, so that a dropped bias would show
        p.data.add_(0.05 * torch.randn_like(p))
    points = torch.randn(3, 17, 3, dtype=torch.float64)
    dirs = F.normalize(torch.randn(3, 17, 3, dtype=torch.float64), dim=-1)
    z_shape = torch.randn(3, field.shape_input_dim, dtype=torch.float64, requires_grad=True)
    z_app = torch.randn(3, cfg.z_appearance_dim, dtype=torch.float64, requires_grad=True)

    def outputs_and_grads(fn):
        field.zero_grad(set_to_none=True)
        z_shape.grad = z_app.grad = None
        rgb, sigma = fn(field, points, dirs, z_shape, z_app)
        (rgb.pow(2).sum() + sigma.sin().sum()).backward()
        grads = {k: p.grad.clone() for k, p in field.named_parameters()}
        grads["z_shape"] = z_shape.grad.clone()
        if cfg.z_appearance_dim:
            grads["z_appearance"] = z_app.grad.clone()
        return rgb.detach(), sigma.detach(), grads

    def gathered(f, points, dirs, z_shape, z_app):  # the points shuffled across samples, then put back
        order = torch.randperm(3 * 17, generator=torch.Generator().manual_seed(1))
        owner = torch.arange(3).repeat_interleave(17)[order]
        rgb, sigma = f.forward_gathered(points.reshape(-1, 3)[order], dirs.reshape(-1, 3)[order], z_shape, z_app, owner)
        inverse = torch.argsort(order)
        return rgb[inverse].view(3, 17, 3), sigma[inverse].view(3, 17)

    rgb_ref, sigma_ref, grads_ref = outputs_and_grads(_plain_field)
    for fn in (lambda f, *a: f(*a), gathered):
        rgb, sigma, grads = outputs_and_grads(fn)
        torch.testing.assert_close(rgb, rgb_ref, rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(sigma, sigma_ref, rtol=1e-10, atol=1e-12)
        for name in grads_ref:
            torch.testing.assert_close(grads[name], grads_ref[name], rtol=1e-9, atol=1e-11, msg=name)


def test_original_preset_field_has_graf_ccsr_sizes_and_parameter_count():
    """graf_ccsr's generator without CCSR at one class: trunk input 63 + 256 = 319, skip input
    575, colour branch input 256 + 27 = 283, z * LayerNorm(class embedding): 727,684 parameters."""
    cfg = load_config(["+exp=graf_ccsr_original", "tracking=none"])
    gen, _ = build_models(cfg, num_classes=1)
    assert gen.field.trunk[0].in_features == 319 and gen.field.trunk[5].in_features == 575
    assert gen.field.view_layer.in_features == 283
    assert sum(p.numel() for name, p in gen.named_parameters() if not name.startswith("ccsr.")) == 727_684
    assert dict(parameter_summary(gen))["class_norm"] == 512


@pytest.mark.parametrize("conditioning", ["add", "scale", "none"])
def test_class_conditioning_variants_modulate_z_per_sample(conditioning):
    cfg = smoke_with(f"model.field.class_conditioning={conditioning}")
    torch.manual_seed(0)
    gen, _ = build_models(cfg, num_classes=3)
    z, classes = torch.randn(4, cfg.model.z_dim), torch.tensor([0, 2, 1, 2])
    z_shape, z_app = gen.condition(z, classes)
    got = torch.cat([z_shape, z_app], dim=-1)
    if conditioning == "none":
        assert gen.class_embedding is None
        torch.testing.assert_close(got, z)
        return
    e = gen.class_embedding.weight[classes]
    if conditioning == "add":
        expected = z + e
    else:
        with torch.no_grad():
            gen.class_norm.weight.add_(torch.randn(cfg.model.z_dim))  # a non-trivial affine part
        z_shape, z_app = gen.condition(z, classes)
        got = torch.cat([z_shape, z_app], dim=-1)
        expected = z * F.layer_norm(e, (cfg.model.z_dim,), gen.class_norm.weight, gen.class_norm.bias)
    torch.testing.assert_close(got, expected)
    got.sum().backward()
    assert gen.class_embedding.weight.grad[[0, 1, 2]].abs().sum(dim=1).gt(0).all()


# --------------------------------------------------------------------------- renderer


class SphereField(nn.Module):
    """Constant density inside a centred sphere, nothing outside; constant colour."""

    def __init__(self, density: float, radius: float):
        super().__init__()
        self.density, self.radius = density, radius

    def forward(self, points, view_dirs, z_shape, z_appearance):
        inside = points.norm(dim=-1) <= self.radius
        sigma = torch.where(inside, torch.full_like(points[..., 0], self.density), torch.zeros_like(points[..., 0]))
        return torch.full_like(points, 0.75), sigma


def _sphere_rays():
    c2w = pose_matrix(torch.tensor([0.3]), torch.tensor([0.4]), radius=2.5)
    return rays_from_grid(c2w, full_grid(8, 1), fov_deg=20.0)


def _analytic_sphere(origins, directions, density, radius):
    """Opacity and expected depth sum(w t) for rays through a homogeneous sphere."""
    a = (directions**2).sum(-1)
    b = (origins * directions).sum(-1)
    c = (origins**2).sum(-1) - radius**2
    disc = (b**2 - a * c).clamp(min=0)
    t0, t1 = (-b - disc.sqrt()) / a, (-b + disc.sqrt()) / a
    k, span = density * a.sqrt(), t1 - t0
    opacity = 1 - torch.exp(-k * span)
    depth = t0 * opacity + (1 - torch.exp(-k * span)) / k - span * torch.exp(-k * span)
    return opacity, depth


@pytest.mark.parametrize(
    "samples_per_ray,importance_samples,tolerance",
    # 48 stratified samples alone are off by ~0.04 in opacity: the hierarchical pass must help
    [(1024, 0, 0.005), (48, 96, 0.02)],
)
def test_renderer_matches_analytic_sphere(samples_per_ray, importance_samples, tolerance):
    density, radius = 3.0, 0.3
    origins, directions = _sphere_rays()
    expected_acc, expected_depth = _analytic_sphere(origins, directions, density, radius)
    assert (expected_acc == 0).any() and (expected_acc > 0.5).any()  # misses and solid hits
    out = render_rays(
        SphereField(density, radius), origins, directions, torch.zeros(1, 1), torch.zeros(1, 1),
        settings(near=1.5, far=4.5, samples_per_ray=samples_per_ray, importance_samples=importance_samples),
    )
    torch.testing.assert_close(out["acc"], expected_acc, atol=tolerance, rtol=0)
    torch.testing.assert_close(out["depth"], expected_depth, atol=2 * tolerance, rtol=0)
    expected_rgb = (2 * 0.75 * expected_acc[..., None] - 1).expand(-1, -1, 3)  # black background, mapped to [-1, 1]
    torch.testing.assert_close(out["rgb"], expected_rgb, atol=2 * tolerance, rtol=0)  # 2 * 0.75 * acc - 1


def test_renderer_white_background_and_chunks():
    origins, directions = _sphere_rays()
    base = settings(near=1.5, far=4.5, samples_per_ray=32, importance_samples=0, white_background=True)
    field, z = SphereField(3.0, 0.3), torch.zeros(1, 1)
    full = render_rays(field, origins, directions, z, z, base)
    chunked = render_rays(field, origins, directions, z, z, dataclasses.replace(base, chunk=7))
    for key in full:
        torch.testing.assert_close(chunked[key], full[key])
    missed = full["acc"] == 0
    assert missed.any()
    torch.testing.assert_close(full["rgb"][missed], torch.ones_like(full["rgb"][missed]))


def test_renderer_runs_under_fake_tensor_mode(smoke_cfg):
    """No .item() or value-dependent branch: the memory estimator traces it with fake tensors."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        field = RadianceField(smoke_cfg.model.field)
        origins, directions = torch.randn(2, 16, 3), torch.randn(2, 16, 3)
        out = render_rays(
            field, origins, directions, torch.randn(2, 8), torch.randn(2, 8),
            settings(near=1.0, far=2.0, samples_per_ray=8, importance_samples=4, perturb=True, density_noise_std=1.0,
                     density_noise_decay_iters=10, chunk=5, grad_checkpoint=True),
            iteration=0,
        )
        out["rgb"].sum().backward()
    assert out["rgb"].shape == (2, 16, 3)


def test_density_noise_decays_to_exactly_zero():
    s = settings(density_noise_std=1.0, density_noise_decay_iters=5000)
    assert s.noise_std(0) == 1.0
    assert s.noise_std(2500) == pytest.approx(0.5)
    assert 0 < s.noise_std(4999) < 1e-3
    assert all(s.noise_std(it) == 0.0 for it in (5000, 5001, 10**6))
    assert s.noise_std(None) == 0.0  # evaluation
    assert settings(density_noise_decay_iters=0).noise_std(0) == 0.0


# --------------------------------------------------------------------------- CCSR


def test_ccsr_view_bins():
    ccsr = CCSR(CCSRConfig(num_views=8), code_resolution=8)
    degrees = torch.tensor([0.0, 44.0, 45.0, 90.0, 359.0, 360.0])
    assert ccsr.view_index(degrees / 360).tolist() == [0, 0, 1, 2, 7, 0]
    assert CCSR(CCSRConfig(num_views=6), 8).view_index(torch.tensor([60.0, 300.0]) / 360).tolist() == [1, 5]


def test_ccsr_output_shape_and_consistency_weight():
    cfg = CCSRConfig(mode="discriminator", scale=2, consistency_weight=2.0, consistency_decay=1e-3)
    ccsr = CCSR(cfg, code_resolution=32)
    grid = upsample_grid(full_grid(8, 3), 2)
    lr = torch.rand(1, 3, 8, 8).expand(3, -1, -1, -1)
    sr = ccsr(lr, torch.tensor([0, 3, 3]), grid)
    assert sr.shape == (3, 3, 16, 16)
    assert not torch.allclose(sr[0], sr[1]) and torch.equal(sr[1], sr[2])  # each sample uses its view's code
    assert consistency_weight(cfg, 0) == 2.0
    assert consistency_weight(cfg, 1000) == pytest.approx(2.0 * math.exp(-1.0))


def test_cem_projects_sr_towards_the_lr_image():
    torch.manual_seed(0)
    ccsr = CCSR(CCSRConfig(mode="discriminator", scale=2, cem_weight=1.0, cem_blur="box", cem_kernel=3), 32)
    lr = F.interpolate(torch.randn(2, 3, 4, 4), size=16, mode="bicubic")
    offset = F.interpolate(torch.randn(2, 3, 4, 4), size=16, mode="bicubic")
    sr = F.interpolate(lr + 0.5 * offset, scale_factor=2, mode="bilinear")
    before = (ccsr.degrade(sr) - lr).abs().max()
    after = (ccsr.degrade(ccsr.enforce_consistency(sr, lr)) - lr).abs().max()
    assert after < 0.15 * before
    # with weight 0 the CEM is the identity
    ccsr.cfg = CCSRConfig(cem_weight=0.0)
    torch.testing.assert_close(ccsr.enforce_consistency(sr, lr), sr)


def test_graf_ccsr_variant_needs_regularizer_mode():
    from grafccsr.config import ConfigError

    with pytest.raises(ConfigError, match="model.ccsr.variant=graf_ccsr needs model.ccsr.mode=regularizer"):
        smoke_with("model.ccsr.mode=discriminator", "model.ccsr.variant=graf_ccsr")


# --------------------------------------------------------------------------- discriminator


@pytest.mark.parametrize("size", [16, 32, 64, 128])
def test_discriminator_shapes(size):
    cfg = DiscriminatorConfig(base_channels=4, max_channels=16, aux_classifier=True, n_each_task=[2, 3])
    disc = PatchDiscriminator(cfg, size, num_classes=2)
    logits, aux = disc(torch.randn(2, 3, size, size), torch.tensor([0, 1]))
    assert logits.shape == (2,) and aux.shape == (2, 5)
    assert disc.n_each_task == [2, 3]


def test_discriminator_class_channels_change_the_output():
    disc = PatchDiscriminator(DiscriminatorConfig(base_channels=8, norm="none"), 16, num_classes=3)
    x = torch.randn(1, 3, 16, 16)
    logit_0, aux = disc(x, torch.tensor([0]))
    logit_2, _ = disc(x, torch.tensor([2]))
    assert aux is None
    assert not torch.allclose(logit_0, logit_2)
    assert PatchDiscriminator(DiscriminatorConfig(), 16, num_classes=1).class_channels == 0
    default_aux = PatchDiscriminator(DiscriminatorConfig(base_channels=4, aux_classifier=True), 16, num_classes=3)
    assert default_aux.n_each_task == [3]


@pytest.mark.parametrize("size", [8, 48, 512])
def test_discriminator_rejects_bad_sizes(size):
    with pytest.raises(ValueError, match=str(size)):
        PatchDiscriminator(DiscriminatorConfig(), size, num_classes=2)


# --------------------------------------------------------------------------- generator


def _render_inputs(cfg, batch=2, seed=0):
    gen = torch.Generator().manual_seed(seed)
    sampler = PatchSampler(cfg.model.patch)
    grid, _ = sampler.sample(batch, 0, "cpu", gen)
    u, v = sample_random_poses(batch, cfg.model.pose, "cpu", gen)
    z = torch.randn(batch, cfg.model.z_dim, generator=gen)
    classes = torch.arange(batch) % cfg.data.synthetic.num_classes
    return z, classes, u, v, grid


def _generate(gen, cfg, z, classes, u, v, grid, *, iteration=None, rng=None, ccsr_no_grad=False, **changes):
    """Render (and super-resolve, when the generator has a CCSR) as the training step does."""
    out = gen.render(z, classes, u, v, grid, settings(cfg, **changes), iteration=iteration, rng=rng)
    if gen.ccsr is not None:
        out["sr"] = gen.super_resolve(out["rgb"], u, upsample_grid(grid, gen.ccsr.scale), no_grad=ccsr_no_grad)
    return out


def _nonzero_finite_grads(module: nn.Module) -> dict[str, bool]:
    return {
        name: p.grad is not None and bool(torch.isfinite(p.grad).all()) and bool(p.grad.abs().sum() > 0)
        for name, p in module.named_parameters()
    }


def test_adversarial_gradient_reaches_every_generator_part_in_discriminator_mode():
    cfg = smoke_with("model.ccsr.mode=discriminator", "model.ccsr.num_layers=1", "model.ccsr.hidden_channels=8")
    torch.manual_seed(0)
    gen, disc = build_models(cfg, num_classes=2)
    assert disc.input_size == 32
    z, classes, u, v, grid = _render_inputs(cfg)
    out = _generate(gen, cfg, z, classes, u, v, grid, iteration=0)
    assert out["rgb"].shape == (2, 3, 16, 16) and out["sr"].shape == (2, 3, 32, 32)
    logits, _ = disc(out["sr"], classes)
    g_loss(logits).backward()
    grads = _nonzero_finite_grads(gen)
    assert grads.keys() >= {"class_embedding.weight", "ccsr.codes", "field.trunk.0.weight", "ccsr.sr_net.0.weight"}
    assert all(grads.values()), [name for name, ok in grads.items() if not ok]


def test_regularizer_mode_trains_ccsr_and_the_no_grad_toggle_stops_it():
    cfg = smoke_with("model.ccsr.mode=regularizer", "model.ccsr.num_layers=1", "model.ccsr.hidden_channels=8")
    torch.manual_seed(0)
    gen, _ = build_models(cfg, num_classes=2)
    z, classes, u, v, grid = _render_inputs(cfg)

    out = _generate(gen, cfg, z, classes, u, v, grid, iteration=0)
    ccsr_consistency_loss(out["sr"], out["rgb"]).backward()
    assert all(_nonzero_finite_grads(gen.ccsr).values())

    # memory-guide item 9 as written: the SR output is a new leaf, the CCSR learns nothing
    gen.zero_grad(set_to_none=True)
    out = _generate(gen, cfg, z, classes, u, v, grid, iteration=0, ccsr_no_grad=True)
    assert out["sr"].requires_grad and out["sr"].is_leaf
    ccsr_consistency_loss(out["sr"], out["rgb"]).backward()
    assert all(p.grad is None or not p.grad.any() for p in gen.ccsr.parameters())
    assert all(p.grad is None for p in gen.field.parameters())


def test_changing_one_sample_changes_only_its_output(smoke_cfg):
    torch.manual_seed(0)
    gen, _ = build_models(smoke_cfg, num_classes=2)
    z, _, u, v, grid = _render_inputs(smoke_cfg, batch=3)
    classes = torch.tensor([0, 0, 0])
    with torch.no_grad():
        base = _generate(gen, smoke_cfg, z, classes, u, v, grid)["rgb"]
        other_class = _generate(gen, smoke_cfg, z, torch.tensor([0, 1, 0]), u, v, grid)["rgb"]
        z_changed = z.clone()
        z_changed[2] += 1.0
        other_z = _generate(gen, smoke_cfg, z_changed, classes, u, v, grid)["rgb"]
    for changed, index in ((other_class, 1), (other_z, 2)):
        same = [i for i in range(3) if i != index]
        torch.testing.assert_close(changed[same], base[same], atol=1e-6, rtol=0)
        assert (changed[index] - base[index]).abs().max() > 1e-4


def test_render_is_deterministic_under_a_fixed_seed(smoke_cfg):
    def run():
        torch.manual_seed(123)
        gen, disc = build_models(smoke_cfg, num_classes=2)
        z, classes, u, v, grid = _render_inputs(smoke_cfg, seed=7)
        out = _generate(gen, smoke_cfg, z, classes, u, v, grid, iteration=0, rng=torch.Generator().manual_seed(1))
        return out["rgb"], disc(out["rgb"], classes)[0]

    (rgb_a, logits_a), (rgb_b, logits_b) = run(), run()
    assert torch.equal(rgb_a, rgb_b) and torch.equal(logits_a, logits_b)


def test_render_chunks_and_checkpointing_do_not_change_the_result(smoke_cfg):
    torch.manual_seed(0)
    gen, _ = build_models(smoke_cfg, num_classes=2)
    z, classes, u, v, grid = _render_inputs(smoke_cfg)
    plain = _generate(gen, smoke_cfg, z, classes, u, v, grid)["rgb"]
    plain.sum().backward()
    grad_plain = gen.field.trunk[0].weight.grad.clone()
    gen.zero_grad(set_to_none=True)
    other = _generate(gen, smoke_cfg, z, classes, u, v, grid, chunk=100, grad_checkpoint=True,
                      checkpoint_segment_points=512)["rgb"]
    other.sum().backward()
    torch.testing.assert_close(other, plain)
    torch.testing.assert_close(gen.field.trunk[0].weight.grad, grad_plain)


def test_parameter_summary_and_cli(capsys):
    from grafccsr.cli.models import main

    cfg = smoke_with("model.ccsr.mode=regularizer")
    gen, _ = build_models(cfg, num_classes=2)
    names = dict(parameter_summary(gen))
    assert set(names) == {"field", "class_embedding", "ccsr"}
    assert dict(parameter_summary(gen.ccsr))["codes"] == 8 * 3 * 32 * 32
    assert main(["--summary", "+exp=smoke", "tracking=none", "model.ccsr.mode=regularizer"]) == 0
    printed = capsys.readouterr().out
    for label in ("radiance field", "class embedding", "CCSR codes", "CCSR SR net", "discriminator"):
        assert label in printed
