"""Render whole images from a generator at given poses (samples, evaluation, videos)."""

from __future__ import annotations

import torch

from grafccsr.camera import full_grid
from grafccsr.models.render import RenderSettings


@torch.no_grad()
def render_views(
    generator: torch.nn.Module,
    settings: RenderSettings,
    z: torch.Tensor,
    class_idx: torch.Tensor,
    u: torch.Tensor,
    v: torch.Tensor,
    *,
    image_size: int,
    batch_size: int = 8,
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
    use_sr = generator.ccsr_mode == "discriminator"
    render_size = image_size // generator.ccsr.scale if use_sr else image_size
    images, depths = [], []
    for start in range(0, z.shape[0], batch_size):
        sl = slice(start, start + batch_size)
        batch = z[sl].shape[0]
        grid = full_grid(render_size, batch, device=device)
        out = generator.render(z[sl], class_idx[sl], u[sl], v[sl], grid, settings)
        rgb = out["rgb"]
        if use_sr:
            rgb = generator.super_resolve(rgb, u[sl], full_grid(image_size, batch, device=device))
        rgb = rgb.float().clamp(-1, 1)
        images.append(rgb.cpu() if to_cpu else rgb)
        if return_depth:
            depths.append(out["depth"].float().cpu() if to_cpu else out["depth"].float())
    result = torch.cat(images)
    return (result, torch.cat(depths)) if return_depth else result
