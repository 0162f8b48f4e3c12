"""Losses: GAN losses, R1, multi-task cross-entropy, CCSR consistency."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from grafccsr.training.losses import MultiTaskCrossEntropy, ccsr_consistency_loss, d_loss, g_loss, r1_penalty


def test_gan_losses_are_non_saturating_bce():
    real, fake = torch.tensor([2.0, -1.0]), torch.tensor([0.5, -3.0])
    expected_d = F.binary_cross_entropy_with_logits(real, torch.ones(2)) + F.binary_cross_entropy_with_logits(
        fake, torch.zeros(2)
    )
    torch.testing.assert_close(d_loss(real, fake), expected_d)
    torch.testing.assert_close(g_loss(fake), F.binary_cross_entropy_with_logits(fake, torch.ones(2)))


def test_multitask_cross_entropy_matches_per_slice_cross_entropy():
    torch.manual_seed(0)
    logits = torch.randn(5, 7)
    targets = torch.stack([torch.randint(0, 2, (5,)), torch.randint(0, 3, (5,)), torch.randint(0, 2, (5,))], dim=1)
    expected = (
        F.cross_entropy(logits[:, 0:2], targets[:, 0])
        + F.cross_entropy(logits[:, 2:5], targets[:, 1])
        + F.cross_entropy(logits[:, 5:7], targets[:, 2])
    )
    torch.testing.assert_close(MultiTaskCrossEntropy([2, 3, 2])(logits, targets), expected)
    single = MultiTaskCrossEntropy([7])
    torch.testing.assert_close(single(logits, targets[:, 1]), F.cross_entropy(logits, targets[:, 1]))
    with pytest.raises(ValueError):
        MultiTaskCrossEntropy([2, 3, 2])(logits, targets[:, :2])


class _Linear(nn.Module):
    def __init__(self, scale: float, dtype=torch.float32):
        super().__init__()
        self.scale, self.dtype = scale, dtype

    def forward(self, x):
        return (self.scale * x.to(self.dtype)).flatten(1).sum(1)


def test_r1_is_zero_for_an_input_independent_d_and_positive_otherwise():
    images = torch.randn(3, 3, 4, 4, requires_grad=True)
    constant = (images * 0).flatten(1).sum(1) + 1.0
    assert r1_penalty(constant, images).item() == 0.0
    images = torch.randn(3, 3, 4, 4, requires_grad=True)
    # D(x) = 2 * sum(x): gradient 2 everywhere; per pixel 3 channels x 4 = 12
    torch.testing.assert_close(r1_penalty(_Linear(2.0)(images), images), torch.tensor(4.0 * 3))
    # D(x) = sum(w * x^2): gradient 2 w x; the penalty keeps its graph, so it can train w
    weight = torch.tensor(0.5, requires_grad=True)
    penalty = r1_penalty((weight * images**2).flatten(1).sum(1), images)
    torch.testing.assert_close(penalty, (images.detach() ** 2).sum() / (3 * 16))
    penalty.backward()
    assert weight.grad is not None and weight.grad > 0


def test_r1_stays_float32_with_bf16_logits():
    images = torch.randn(2, 3, 4, 4, requires_grad=True)
    logits = _Linear(0.5, dtype=torch.bfloat16)(images)
    assert logits.dtype == torch.bfloat16
    penalty = r1_penalty(logits, images)
    assert penalty.dtype == torch.float32
    torch.testing.assert_close(penalty, torch.tensor(0.25 * 3))


def graf_r1(discriminator, patches: torch.Tensor, gamma: float) -> torch.Tensor:
    """GRAF's R1, written independently: D reads the patch as B*N pixel rows of 3 values
    (GRAF's discriminator input), and GAN_stability's compute_grad2 sums the squared
    gradient of d_out.sum() over each row's channels; the penalty is gamma * its mean."""
    b, c, h, w = patches.shape
    rows = patches.detach().permute(0, 2, 3, 1).reshape(b * h * w, c).requires_grad_(True)
    d_out = discriminator(rows.reshape(b, h, w, c).permute(0, 3, 1, 2))
    (grad,) = torch.autograd.grad(d_out.sum(), rows, create_graph=True)
    reg = grad.pow(2).reshape(rows.shape[0], -1).sum(1)
    return gamma * reg.mean()


@pytest.mark.parametrize("side", [16, 32, 64])
def test_r1_equals_grafs_formula(side):
    """gamma * r1_penalty is GRAF's penalty with the same gamma: ratio 1 at 16^2, 32^2, 64^2
    (the old per-image sum times gamma / 2 was side^2 / 2 times stronger)."""
    from grafccsr.config import DiscriminatorConfig
    from grafccsr.models.discriminator import PatchDiscriminator

    torch.manual_seed(side)
    disc = PatchDiscriminator(DiscriminatorConfig(base_channels=8, spectral_norm=False, norm="none"), side, 1).double()
    logits = lambda x: disc(x, torch.zeros(x.shape[0], dtype=torch.long))[0]  # noqa: E731
    patches = torch.randn(3, 3, side, side, dtype=torch.float64, requires_grad=True)
    ours = 10.0 * r1_penalty(logits(patches), patches)
    reference = graf_r1(logits, patches, 10.0)
    assert abs((ours / reference).item() - 1.0) < 1e-6
    old_units = 0.5 * 10.0 * torch.autograd.grad(logits(patches).sum(), patches)[0].pow(2).flatten(1).sum(1).mean()
    assert (old_units / reference).item() == pytest.approx(side * side / 2, rel=1e-6)


def test_ccsr_consistency_loss_compares_area_downsampled_sr_with_detached_render():
    nerf = torch.rand(2, 3, 4, 4, requires_grad=True)
    sr = nerf.detach().repeat_interleave(2, dim=2).repeat_interleave(2, dim=3).requires_grad_(True)
    assert ccsr_consistency_loss(sr, nerf).item() == pytest.approx(0.0, abs=1e-12)
    shifted = (sr + 0.5).detach().requires_grad_(True)
    loss = ccsr_consistency_loss(shifted, nerf)
    assert loss.item() == pytest.approx(0.25)
    loss.backward()
    assert nerf.grad is None  # the render is the target, not trained by this loss
    assert shifted.grad.abs().sum() > 0
