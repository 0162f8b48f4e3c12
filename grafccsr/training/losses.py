"""GAN losses, R1, the auxiliary multi-task classification loss and CCSR's consistency loss.

Pure functions and one stateless module, built once by the caller (memory guide
item 4: no loss objects per iteration).
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import autograd, nn


def d_loss(real_logits: torch.Tensor, fake_logits: torch.Tensor) -> torch.Tensor:
    """Non-saturating discriminator loss: softplus(-real).mean() + softplus(fake).mean()
    (= BCE-with-logits with targets 1 for real, 0 for fake)."""
    return F.softplus(-real_logits).mean() + F.softplus(fake_logits).mean()


def g_loss(fake_logits: torch.Tensor) -> torch.Tensor:
    """Non-saturating generator loss: softplus(-fake).mean()."""
    return F.softplus(-fake_logits).mean()


def r1_penalty(real_logits: torch.Tensor, real_images: torch.Tensor) -> torch.Tensor:
    """R1 in GRAF's units: the squared gradient of D's logits with respect to the real
    images, summed over channels and averaged over images AND pixels, in FP32.

    This is GAN_stability's ``compute_grad2(d_real, x).mean()`` on GRAF's discriminator input
    (the patch as B*N pixel rows of 3 values), so ``gamma * r1_penalty`` is the penalty GRAF
    and graf_ccsr apply with the same gamma (per image: gamma / N times the squared norm).

    real_logits (B,) from ``real_images`` (B, C, H, W), which must require grad. The gradient
    graph is kept (``create_graph``) so the penalty trains D.
    """
    # the logits are summed in float32 so that a bf16/fp16 D under autocast does not
    # make the penalty (a sum of many squared small gradients) lose precision
    (grad,) = autograd.grad(real_logits.float().sum(), real_images, create_graph=True)
    batch, _, height, width = real_images.shape
    return grad.float().pow(2).sum() / (batch * height * width)


class MultiTaskCrossEntropy(nn.Module):
    """One cross-entropy per task over consecutive logit slices, SUMMED over tasks.

    n_each_task: slice sizes, e.g. [2] or [2, 3, 2]. forward(logits (B, sum(n)),
    targets (B, T) int64, or (B,) for a single task) -> scalar (each CE is a batch mean).
    """

    def __init__(self, n_each_task: Sequence[int]):
        super().__init__()
        if not n_each_task:
            raise ValueError("n_each_task must name at least one task")
        self.n_each_task = list(n_each_task)

    def forward(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        if targets.dim() == 1:
            targets = targets[:, None]
        if targets.shape[1] != len(self.n_each_task):
            raise ValueError(f"targets have {targets.shape[1]} tasks, expected {len(self.n_each_task)}")
        slices = logits.split(self.n_each_task, dim=1)
        return sum(F.cross_entropy(s, targets[:, t]) for t, s in enumerate(slices))


def ccsr_consistency_loss(sr: torch.Tensor, nerf_rgb: torch.Tensor) -> torch.Tensor:
    """graf_ccsr's regulariser: MSE(area-downsample(sr) to the NeRF size, nerf_rgb.detach()).

    sr (B, 3, sP, sP), nerf_rgb (B, 3, P, P). The target is detached: the loss pulls the
    SR output towards the render, not the render towards the SR output (gradient still
    reaches the radiance field through the SR input).
    """
    downsampled = F.interpolate(sr, size=nerf_rgb.shape[-2:], mode="area")
    return F.mse_loss(downsampled, nerf_rgb.detach())


def coarse_match_loss(coarse_rgb: torch.Tensor, fine_rgb: torch.Tensor) -> torch.Tensor:
    """``model.render.coarse_loss=match_fine``: MSE(coarse render, fine render.detach()), both
    (B, 3, P, P) of the same z and pose. It trains the coarse network (which only places the
    importance samples) to see what the fine network renders; the fine render is not pulled
    towards the coarse one."""
    return F.mse_loss(coarse_rgb, fine_rgb.detach())
