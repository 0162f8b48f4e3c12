"""Render whole images from a generator at given poses (samples, evaluation, videos)."""

from __future__ import annotations

import torch

from grafccsr.camera import full_grid, pose_matrix
from grafccsr.models.render import NO_GRAD_SEGMENT_POINTS


@torch.no_grad()
def render_views(
    generator: torch.nn.Module,
    z: torch.Tensor,
    class_idx: torch.Tensor,
    u: torch.Tensor,
    v: torch.Tensor,
    *,
    radius: float,
    image_size: int,
    ccsr_mode: str = "off",
    ccsr_scale: int = 1,
    batch_size: int = 8,
    render_chunk: int = 0,
    no_grad_segment_points: int = NO_GRAD_SEGMENT_POINTS,
    to_cpu: bool = True,
    return_depth: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Images (N, 3, image_size, image_size) in [-1, 1] for N latent codes and poses.

    In CCSR ``discriminator`` mode the radiance field renders at image_size / scale
    and the CCSR supplies the rest, which is the resolution the model was trained
    to produce. ``to_cpu`` moves each batch off the device at once (guide item 10).
    With ``return_depth`` also returns the rendered depth (N, 1, h, h).
    """
    device = z.device
    use_sr = ccsr_mode == "discriminator"
    render_size = image_size // ccsr_scale if use_sr else image_size
    images, depths = [], []
    for start in range(0, z.shape[0], batch_size):
        sl = slice(start, start + batch_size)
        batch = z[sl].shape[0]
        c2w = pose_matrix(u[sl], v[sl], radius)
        grid = full_grid(render_size, batch, device=device)
        out = generator.render(z[sl], class_idx[sl], c2w, grid, 0, perturb=False, render_chunk=render_chunk,
                                 no_grad_segment_points=no_grad_segment_points)
        rgb = out["rgb"]
        if use_sr:
            rgb = generator.super_resolve(rgb, u[sl], full_grid(image_size, batch, device=device))
        rgb = rgb.float().clamp(-1, 1)
        images.append(rgb.cpu() if to_cpu else rgb)
        if return_depth:
            depths.append(out["depth"].float().cpu() if to_cpu else out["depth"].float())
    result = torch.cat(images)
    return (result, torch.cat(depths)) if return_depth else result
