"""The faithful presets against graf_ccsr's maths, at equal weights.

Every reference here is written from the description in ``shared/docs/domain.md`` §9–10 (the
original layer by layer), not from grafccsr's modules: it reads the module's parameters, lays
them out as the description says, and computes in float64 with plain ``torch.nn.functional``
calls. A module that lays out, orders or wires its layers otherwise fails on shapes or values.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from grafccsr.camera import full_grid, pose_matrix, rays_from_grid
from grafccsr.config import ConfigError, load_config
from grafccsr.models import build_models
from grafccsr.models.discriminator import PatchDiscriminator
from grafccsr.models.render import RenderSettings
from grafccsr.sizing.synthetic import synthetic_batch
from grafccsr.training.build import build_run


def original(*overrides: str):
    return load_config(["+exp=graf_ccsr_original", "tracking=none", *overrides])


def _randomise(module: nn.Module, scale: float = 0.05, seed: int = 0) -> None:
    """Non-zero biases and affine norms, so that a dropped or misplaced one shows."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(scale * torch.randn(p.shape, generator=g, dtype=p.dtype))


# --------------------------------------------------------------------------- field


def _pe(x: torch.Tensor, frequencies: int) -> torch.Tensor:
    """NeRF's embedder: [x, sin(2^0 x), cos(2^0 x), ..., sin(2^(F-1) x), cos(2^(F-1) x)] (3 dims each)."""
    parts = [x]
    for k in range(frequencies):
        parts += [torch.sin(2.0**k * x), torch.cos(2.0**k * x)]
    return torch.cat(parts, dim=-1)


def _reference_field(gen, points, dirs, z, class_idx):
    """graf_ccsr's generator MLP (dfc7945): z_c = z * LayerNorm(embedding(class)); trunk input
    [PE(x) (63), z_c (256)]; 8 ReLU layers of 256; after layer 4 (the fifth) the RAW input
    [PE(x), z] is concatenated again, with the trunk's features; sigma = linear(h); feature =
    linear(h); rgb = sigmoid(linear(relu(linear([feature, PE(d)])))). Weights read from ``gen``
    in the layout [PE(x), z, h] (the original's [h, input] order is a column permutation)."""
    f = gen.field
    emb = gen.class_embedding.weight[class_idx]
    z_c = z * F.layer_norm(emb, (z.shape[-1],), gen.class_norm.weight, gen.class_norm.bias)
    b, n, _ = points.shape
    pe = _pe(points, 10)
    x_in = torch.cat([pe, z_c[:, None, :].expand(b, n, -1)], dim=-1)
    raw_in = torch.cat([pe, z[:, None, :].expand(b, n, -1)], dim=-1)
    h = x_in
    for i in range(8):
        layer = f.trunk[i]
        h = torch.relu(F.linear(h, layer.weight, layer.bias))
        if i == 4:
            h = torch.cat([raw_in, h], dim=-1)
    sigma = F.linear(h, f.density_head.weight, f.density_head.bias)[..., 0]
    feature = F.linear(h, f.feature.weight, f.feature.bias)
    view = torch.relu(F.linear(torch.cat([feature, _pe(dirs, 4)], dim=-1), f.view_layer.weight, f.view_layer.bias))
    return torch.sigmoid(F.linear(view, f.rgb_head.weight, f.rgb_head.bias)), sigma


@pytest.mark.parametrize("execution", ["concat", "fused"])
def test_original_field_reinjects_the_raw_latent_at_the_skip(execution):
    """+exp=graf_ccsr_original's field (both executions) equals graf_ccsr's to float64 precision;
    re-injecting the class-conditioned z instead (ours) changes the density visibly."""
    cfg = original(f"model.field.execution={execution}")
    torch.manual_seed(0)
    gen, _ = build_models(cfg, num_classes=3)
    gen = gen.double()
    _randomise(gen)
    points = torch.randn(2, 33, 3, dtype=torch.float64)
    dirs = F.normalize(torch.randn(2, 33, 3, dtype=torch.float64), dim=-1)
    z = torch.randn(2, 256, dtype=torch.float64)
    classes = torch.tensor([2, 0])
    rgb, sigma = gen.field(points, dirs, *gen.condition(z, classes))
    rgb_ref, sigma_ref = _reference_field(gen, points, dirs, z, classes)
    torch.testing.assert_close(sigma, sigma_ref, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(rgb, rgb_ref, rtol=1e-10, atol=1e-12)
    # the conditioned skip (grafccsr's own field) is another function at the same weights
    gen.model_cfg.field.skip_latent = "conditioned"
    gen.field.cfg.skip_latent = "conditioned"
    _, sigma_ours = gen.field(points, dirs, *gen.condition(z, classes))
    assert (sigma_ours - sigma_ref).abs().mean() > 1e-3


# --------------------------------------------------------------------------- discriminator


_ORIGINAL_D = {
    # per 4x4 stride-2 conv: (out channels, spectral norm, norm); domain.md §9
    64: [(64, True, None), (128, True, "instance"), (256, False, "batch"), (512, False, "batch")],
    32: [(128, False, "batch"), (256, False, "batch"), (512, False, "batch")],
    128: [(32, True, None), (64, True, "instance"), (128, True, "instance"), (256, False, "batch"),
          (512, False, "batch")],
}


def _sn_weight(conv: nn.Module) -> torch.Tensor:
    """W / sigma with sigma from one power iteration of torch's spectral norm in training mode
    (u = normalise(W v), v = normalise(W^T u), sigma = u^T W v) from the module's stored vectors."""
    weight = conv.parametrizations.weight.original
    sn = conv.parametrizations.weight[0]
    mat = weight.flatten(1)
    u = F.normalize(mat @ sn._v, dim=0, eps=sn.eps)
    v = F.normalize(mat.t() @ u, dim=0, eps=sn.eps)
    return weight / torch.dot(u, mat @ v)


def _reference_d(disc, x, class_idx, layout, num_classes, with_classes=True):
    """graf_ccsr's D from the description: one-hot class maps concatenated to RGB; 4x4 stride-2
    convs, padding 1, no biases, each with its spectral norm / norm, LeakyReLU 0.2; an output
    conv 4x4 stride 1 -> the logit; the label head on the last features: 1x1 conv -> 256,
    BatchNorm, LeakyReLU, global average pool, 1x1 conv -> classes."""
    if with_classes:
        maps = F.one_hot(class_idx, num_classes).to(x.dtype)[:, :, None, None].expand(-1, -1, *x.shape[-2:])
        x = torch.cat([x, maps], dim=1)
    convs = [m for m in disc.body if isinstance(m, nn.Conv2d)]
    batch_norms = iter(m for m in disc.body if isinstance(m, nn.BatchNorm2d))
    assert len(convs) == len(layout)
    h = x
    for conv, (channels, sn, norm) in zip(convs, layout):
        weight = _sn_weight(conv) if sn else conv.weight
        assert weight.shape[0] == channels and conv.bias is None
        h = F.conv2d(h, weight, stride=2, padding=1)
        if norm == "instance":
            h = F.instance_norm(h, eps=1e-5)
        elif norm == "batch":
            bn = next(batch_norms)
            h = F.batch_norm(h, None, None, bn.weight, bn.bias, training=True, eps=1e-5)
        h = F.leaky_relu(h, 0.2)
    logits = F.conv2d(h, disc.head.weight).flatten(1)[:, 0]
    c1, bn, _, _, c2 = disc.aux_head
    a = F.leaky_relu(F.batch_norm(F.conv2d(h, c1.weight), None, None, bn.weight, bn.bias, training=True), 0.2)
    aux = F.conv2d(a.mean(dim=(2, 3), keepdim=True), c2.weight).flatten(1)
    return logits, aux


@pytest.mark.parametrize("size", [64, 32, 128])
def test_original_discriminator_matches_the_description_per_patch_size(size):
    conditioning = size != 128
    cfg = original(f"model.patch.rays_per_patch={size * size}", "model.discriminator.aux_classifier=true",
                   f"model.discriminator.class_conditioning={str(conditioning).lower()}")
    torch.manual_seed(0)
    disc = PatchDiscriminator(cfg.model.discriminator, size, num_classes=3).double().train()
    _randomise(disc)
    x = torch.randn(4, 3, size, size, dtype=torch.float64)
    classes = torch.tensor([0, 2, 1, 2])
    expected = _reference_d(disc, x, classes, _ORIGINAL_D[size], 3, with_classes=conditioning)  # before SN updates u, v
    logits, aux = disc(x, classes)
    torch.testing.assert_close(logits, expected[0], rtol=1e-9, atol=1e-10)
    torch.testing.assert_close(aux, expected[1], rtol=1e-9, atol=1e-10)
    assert all(m.bias is None for m in disc.modules() if isinstance(m, nn.Conv2d))
    assert not any(getattr(m, "affine", False) for m in disc.modules() if isinstance(m, nn.InstanceNorm2d))


def test_original_discriminator_parameter_counts_and_refusals():
    """At 64^2 (the faithful preset) and 32^2, one class; the label head runs on every call and
    its logits are dropped without ``aux_classifier``; 128^2 with class channels crashes in the
    original, so it is refused with one line."""
    counts = {}
    for size in (64, 32):
        cfg = original(f"model.patch.rays_per_patch={size * size}")
        disc = PatchDiscriminator(cfg.model.discriminator, size, num_classes=1)
        counts[size] = sum(p.numel() for p in disc.parameters())
        calls = []
        disc.aux_head.register_forward_hook(lambda *args: calls.append(1))
        logits, aux = disc(torch.randn(2, 3, size, size), torch.tensor([0, 0]))
        assert logits.shape == (2,) and aux is None and calls == [1]
    # 64^2: 4*4*(4*64 + 64*128 + 128*256 + 256*512) + 16*512 (output) + 512*256 + 2*256 (BN) + 256 (label)
    # + BatchNorms 2*(256 + 512)
    assert counts[64] == 16 * (4 * 64 + 64 * 128 + 128 * 256 + 256 * 512) + 16 * 512 + 512 * 256 + 512 + 256 \
        + 2 * (256 + 512)
    assert counts[32] == 16 * (4 * 128 + 128 * 256 + 256 * 512) + 16 * 512 + 512 * 256 + 512 + 256 \
        + 2 * (128 + 256 + 512)
    with pytest.raises(ConfigError, match="class_conditioning=false"):
        original("model.patch.rays_per_patch=16384")
    with pytest.raises(ConfigError, match="no discriminator for 256px"):
        original("model.discriminator.class_conditioning=false", "model.ccsr.mode=off",
                 "model.patch.rays_per_patch=65536", "data.image_size=256")


# --------------------------------------------------------------------------- CCSR


def test_original_ccsr_shrinks_to_a_quarter_and_back_projects_at_low_resolution():
    """graf_ccsr's CCSR on 64^2 patches, by hand for each sample: shrink to max(8, 64 // 4) = 16^2
    (bilinear), upsample to the 64^2 view code, concatenate the code, 3 + 1 convs, PixelShuffle(4)
    -> 256^2, LeakyReLU 0.2, clamp [-1, 1]; CEM: 3x3 box blur with ZERO padding, bilinear resize
    to 16^2, residual against the 16^2 input, residual resized to 256^2, SR + 0.5 residual; then
    resized to 64^2 for the consistency MSE."""
    cfg = original("model.ccsr.hidden_channels=8")
    torch.manual_seed(0)
    gen, _ = build_models(cfg, num_classes=1)
    ccsr = gen.ccsr.double()
    _randomise(ccsr, scale=0.2)
    lr = torch.rand(3, 3, 64, 64, dtype=torch.float64) * 2 - 1
    views = torch.tensor([5, 0, 5])
    out = ccsr(lr, views)

    def by_hand(x, view):
        small = F.interpolate(x[None], size=16, mode="bilinear", align_corners=False)
        up = F.interpolate(small, size=64, mode="bilinear", align_corners=False)
        h = torch.cat([up, ccsr.codes[view][None]], dim=1)
        convs = [m for m in ccsr.sr_net if isinstance(m, nn.Conv2d)]
        assert len(convs) == 4
        for conv in convs[:-1]:
            h = F.leaky_relu(F.conv2d(h, conv.weight, conv.bias, padding=1), 0.2)
        sr = F.pixel_shuffle(F.conv2d(h, convs[-1].weight, convs[-1].bias, padding=1), 4)
        assert sr.shape == (1, 3, 256, 256)
        sr = F.leaky_relu(sr, 0.2).clamp(-1, 1)
        blurred = F.conv2d(sr, torch.full((3, 1, 3, 3), 1 / 9, dtype=sr.dtype), padding=1, groups=3)
        residual = small - F.interpolate(blurred, size=16, mode="bilinear", align_corners=False)
        sr = sr + 0.5 * F.interpolate(residual, size=256, mode="bilinear", align_corners=False)
        return F.interpolate(sr, size=64, mode="bilinear", align_corners=False)[0]

    for i in range(3):
        torch.testing.assert_close(out[i], by_hand(lr[i], int(views[i])), rtol=1e-10, atol=1e-12)


def test_regularizer_ccsr_runs_in_the_generator_step_only():
    """CCSR as a regulariser feeds only the G step's loss; the D step does not compute it (the
    original did not; ours used to, and threw the output away)."""
    cfg = load_config(["+exp=smoke", "tracking=none", "model.ccsr.mode=regularizer"])
    step = build_run(cfg, 2, "cpu", seed=0)
    calls = []
    step.generator.ccsr.register_forward_hook(lambda *args: calls.append(1))
    batch = synthetic_batch(cfg, 2)
    step.d_step(batch, 0)
    assert calls == []
    step.g_step(batch, 0)
    assert calls == [1]


def test_original_memory_behaviour_renders_d_step_fakes_without_a_graph():
    """memory=none is graf_ccsr's memory behaviour, which (as GRAF) rendered the D step's fakes
    under no_grad: the guide's "before" keeps that."""
    for preset in ("+exp=graf_ccsr_original", "+exp=baseline_fp32"):
        assert load_config([preset, "tracking=none"]).memory.fakes_without_graph


# --------------------------------------------------------------------------- rays


def test_original_rays_pass_through_pixel_corners():
    """direction = ((i - W/2) / f, -(j - H/2) / f, -1) in camera space for pixel column i, row j
    (NeRF's get_rays), with the faithful preset's whole-image 64^2 patch."""
    cfg = original()
    settings = RenderSettings.from_config(cfg)
    w = cfg.data.image_size
    focal = 0.5 * w / math.tan(0.5 * math.radians(cfg.camera.fov_deg))
    c2w = pose_matrix(torch.tensor([0.3]), torch.tensor([0.4]), cfg.camera.radius).double()
    _, dirs = rays_from_grid(c2w, full_grid(w, 1, dtype=torch.float64), cfg.camera.fov_deg, settings.ray_shift)
    j, i = torch.meshgrid(torch.arange(w, dtype=torch.float64), torch.arange(w, dtype=torch.float64), indexing="ij")
    cam = torch.stack([(i - 0.5 * w) / focal, -(j - 0.5 * w) / focal, -torch.ones_like(i)], dim=-1).reshape(1, -1, 3)
    torch.testing.assert_close(dirs, cam @ c2w[:, :3, :3].transpose(1, 2), rtol=1e-12, atol=1e-12)
    assert RenderSettings.from_config(load_config(["tracking=none"])).ray_shift == 0.0  # ours: pixel centres


# --------------------------------------------------------------------------- fine network


def _reference_two_pass(gen, origins, dirs, z, classes, samples, importance, near, far):
    """NeRF's hierarchical render with graf_ccsr's separate fine network (no jitter, no noise):
    ``samples`` evenly spaced depths through the coarse network, weights w_i = alpha_i T_i
    (alpha = 1 - exp(-relu(sigma) delta), delta to the next depth in world units, the last 1e10);
    ``importance`` depths by inverse-CDF at evenly spaced quantiles from the piecewise-constant
    pdf of w[1:-1] + 1e-5 over the midpoints; the sorted union through the fine network; colour
    from the fine pass only, mapped to [-1, 1]."""

    def composite(net, depths, z_shape, z_app):
        pts = origins[:, :, None] + dirs[:, :, None] * depths[..., None]
        view = F.normalize(dirs, dim=-1)[:, :, None].expand_as(pts)
        b, r, s, _ = pts.shape
        rgb, sigma = net(pts.reshape(b, r * s, 3), view.reshape(b, r * s, 3), z_shape, z_app)
        rgb, sigma = rgb.reshape(b, r, s, 3), sigma.reshape(b, r, s)
        delta = torch.cat([depths[..., 1:] - depths[..., :-1], torch.full_like(depths[..., :1], 1e10)], -1)
        alpha = 1 - torch.exp(-torch.relu(sigma) * delta * dirs.norm(dim=-1, keepdim=True))
        trans = torch.cumprod(torch.cat([torch.ones_like(alpha[..., :1]), 1 - alpha + 1e-10], -1), -1)[..., :-1]
        w = alpha * trans
        return w, (w[..., None] * rgb).sum(-2)

    b, r, _ = origins.shape
    depths = torch.linspace(near, far, samples, dtype=origins.dtype).expand(b, r, samples)
    w, _ = composite(gen.field, depths, *gen.condition(z, classes))
    mids = 0.5 * (depths[..., 1:] + depths[..., :-1])
    pdf = w[..., 1:-1] + 1e-5
    pdf = pdf / pdf.sum(-1, keepdim=True)
    cdf = torch.cat([torch.zeros_like(pdf[..., :1]), pdf.cumsum(-1)], -1)
    extra = torch.empty(b, r, importance, dtype=origins.dtype)
    for q, u in enumerate(torch.linspace(0, 1, importance, dtype=origins.dtype)):
        k = (cdf <= u).sum(-1, keepdim=True)  # first cdf entry above u (searchsorted, right)
        lo, hi = (k - 1).clamp(min=0), k.clamp(max=cdf.shape[-1] - 1)
        c0, c1, b0, b1 = cdf.gather(-1, lo), cdf.gather(-1, hi), mids.gather(-1, lo), mids.gather(-1, hi)
        span = torch.where(c1 - c0 < 1e-5, torch.ones_like(c1), c1 - c0)
        extra[..., q] = (b0 + (u - c0) / span * (b1 - b0))[..., 0]
    merged = torch.sort(torch.cat([depths, extra], -1), -1).values
    _, rgb = composite(gen.fine.field, merged, *gen.fine.condition(z, classes))
    return rgb * 2 - 1


def test_fine_network_renders_the_merged_samples_with_a_second_field():
    cfg = original("model=small", "model.field.z_shape_dim=64", "model.field.z_appearance_dim=0",
                   "model.render.samples_per_ray=12", "model.render.importance_samples=10",
                   "model.render.fine_network=true", "model.render.perturb=false")
    torch.manual_seed(0)
    gen, _ = build_models(cfg, num_classes=2)
    gen = gen.double()
    _randomise(gen, scale=0.3)
    settings = RenderSettings.from_config(cfg)
    u, v = torch.tensor([0.1, 0.6], dtype=torch.float64), torch.tensor([0.4, 0.3], dtype=torch.float64)
    grid = full_grid(6, 2, dtype=torch.float64)
    z = torch.randn(2, cfg.model.z_dim, dtype=torch.float64)
    classes = torch.tensor([1, 0])
    with torch.no_grad():
        out = gen.render(z, classes, u, v, grid, settings)
        origins, dirs = rays_from_grid(pose_matrix(u, v, settings.radius), grid, settings.fov_deg,
                                       settings.ray_shift)
        ref = _reference_two_pass(gen, origins, dirs, z, classes, 12, 10, settings.near, settings.far)
    torch.testing.assert_close(out["rgb"], ref.transpose(1, 2).reshape(2, 3, 6, 6), rtol=1e-9, atol=1e-10)


def test_fine_preset_has_upstream_sizes_and_a_coarse_network_that_never_trains():
    """+exp=graf_ccsr_fine: two 8 x 256 fields with their own class embedding and LayerNorm,
    1,455,368 field parameters at one class; upstream's coarse network gets no gradient at all,
    ours (coarse_loss=match_fine) trains it."""
    cfg = load_config(["+exp=graf_ccsr_fine", "tracking=none"])
    gen, _ = build_models(cfg, num_classes=1)
    assert sum(p.numel() for n, p in gen.named_parameters() if not n.startswith("ccsr.")) == 1_455_368
    small = ["+exp=graf_ccsr_fine", "tracking=none", "model=small", "model.field.z_shape_dim=64",
             "model.field.z_appearance_dim=0", "model.patch.rays_per_patch=256", "model.render.samples_per_ray=8",
             "model.render.importance_samples=8", "train.batch_size=2", "model.ccsr.code_resolution=16",
             "model.discriminator.max_channels=64"]
    for loss, trains in (("none", False), ("match_fine", True)):
        cfg = load_config([*small, f"model.render.coarse_loss={loss}"])
        step = build_run(cfg, 2, "cpu", seed=0)
        sums = step.g_step(synthetic_batch(cfg, 2), 0)
        coarse = [p.grad for n, p in step.generator.named_parameters() if n.startswith(("field.", "class_"))]
        fine = [p.grad for n, p in step.generator.named_parameters() if n.startswith("fine.")]
        assert all(g is not None and g.abs().sum() > 0 for g in fine)
        if trains:
            assert all(g is not None and g.abs().sum() > 0 for g in coarse) and float(sums["loss/coarse"]) > 0
        else:
            assert all(g is None for g in coarse) and float(sums["loss/coarse"]) == 0


def test_fine_preset_run_warns_that_its_coarse_network_does_not_train(tmp_path):
    out = subprocess.run(
        [sys.executable, "-m", "grafccsr.train", "+exp=graf_ccsr_fine", "tracking=none", "model=small",
         "model.field.z_shape_dim=64", "model.field.z_appearance_dim=0", "model.patch.rays_per_patch=256",
         "model.render.samples_per_ray=8", "model.render.importance_samples=8", "model.ccsr.code_resolution=16",
         "model.discriminator.max_channels=64", "train.batch_size=2", "train.max_iters=2", "eval.at_end=false",
         "train.progress=false", "data.synthetic.num_azimuths=8", "data.image_size=32",
         f"hydra.run.dir={tmp_path / 'run'}"],
        capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-2000:]
    warned = [line for line in (out.stdout + out.stderr).splitlines() if "never trains" in line]
    assert len(warned) == 1 and "WARNING" in warned[0], out.stdout[-2000:]
    # the measurement of where its coarse network puts the fine samples reads this checkpoint
    from analysis.fine_sampling import main as fine_sampling

    state = torch.load(tmp_path / "run" / "checkpoint.pt", weights_only=True)
    for name, value in state["step"]["generator"].items():  # some density, so that there is something to find
        if name.endswith("density_head.bias"):
            value += 1.0
    torch.save(state, tmp_path / "dense.pt")
    result = tmp_path / "fine.json"
    assert fine_sampling([f"upstream={tmp_path / 'dense.pt'}", "--images", "2", "--size", "8",
                          "--reference-samples", "16", "--out", str(result)]) == 0
    summary = json.loads(result.read_text())["summary"]["upstream"]
    assert summary["n"] == 1 and 0 < summary["reference_opacity"] <= 1
    assert summary["uniform_rgb_error"] == summary["uniform_acc_error"] == 0  # 8 + 8 samples: the reference's 16
    assert 0 < summary["hierarchical_rgb_error"] < 2 and 0 <= summary["hierarchical_acc_error"] < 1
