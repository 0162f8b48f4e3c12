"""Camera geometry shared by the dataset renderer and the generator (GRAF conventions).

World: z up, objects around the origin. Cameras sit on a sphere of radius ``r``
and look at the origin; camera space is OpenGL's (x right, y up, looking down -z).
A pose is ``(u, v)``: azimuth fraction ``u = deg / 360`` and elevation parameter
``v`` with polar angle ``theta = arccos(1 - 2 v)`` measured from +z.

Image coordinates are normalised to [-1, 1] like ``F.grid_sample`` with
``align_corners=False``: x grows to the right (columns), y grows downwards (rows).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def to_sphere(u: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Unit vectors for poses ``(u, v)``: (...,) x (...,) -> (..., 3)."""
    theta = torch.arccos((1.0 - 2.0 * v).clamp(-1.0, 1.0))
    phi = 2.0 * math.pi * u
    return torch.stack(
        (torch.sin(theta) * torch.cos(phi), torch.sin(theta) * torch.sin(phi), torch.cos(theta)), dim=-1
    )


def look_at(eye: torch.Tensor, up: tuple[float, float, float] = (0.0, 0.0, 1.0), eps: float = 1e-6) -> torch.Tensor:
    """Camera-to-world rotations (..., 3, 3) for cameras at ``eye`` (..., 3) looking at the origin.

    Columns are the camera's x, y, z axes in world space; the camera looks down -z,
    so z points from the origin to the eye. At the poles (eye parallel to ``up``)
    the cross product vanishes; there a fixed second up vector (world +y) is used.
    """
    z_axis = F.normalize(eye, dim=-1)
    up_t = torch.tensor(up, dtype=eye.dtype, device=eye.device).expand_as(z_axis)
    x_axis = torch.cross(up_t, z_axis, dim=-1)
    degenerate = x_axis.norm(dim=-1, keepdim=True) < eps
    alt_up = torch.tensor((0.0, 1.0, 0.0), dtype=eye.dtype, device=eye.device).expand_as(z_axis)
    x_axis = torch.where(degenerate, torch.cross(alt_up, z_axis, dim=-1), x_axis)
    x_axis = F.normalize(x_axis, dim=-1)
    y_axis = torch.cross(z_axis, x_axis, dim=-1)
    return torch.stack((x_axis, y_axis, z_axis), dim=-1)


def pose_matrix(u: torch.Tensor, v: torch.Tensor, radius: float) -> torch.Tensor:
    """Camera-to-world matrices (B, 4, 4) for poses (B,), (B,)."""
    eye = radius * to_sphere(u, v)
    c2w = torch.zeros(*u.shape, 4, 4, dtype=eye.dtype, device=eye.device)
    c2w[..., :3, :3] = look_at(eye)
    c2w[..., :3, 3] = eye
    c2w[..., 3, 3] = 1.0
    return c2w


def focal_length(image_size: int, fov_deg: float) -> float:
    """Focal length in pixels: (W / 2) / tan(fov / 2)."""
    return 0.5 * image_size / math.tan(0.5 * math.radians(fov_deg))


def rays_from_grid(c2w: torch.Tensor, grid: torch.Tensor, fov_deg: float, shift: float = 0.0
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """Rays through normalised image points.

    c2w: (B, 4, 4); grid: (B, H, W, 2) points in [-1, 1] (x right, y down).
    ``shift`` moves every point by -shift on both axes first: 0 casts rays through the points
    themselves (a pixel-centre grid gives pixel-centre rays); 1 / W casts them half a pixel of a
    W-pixel image up and left, through the pixels' corners, GRAF's and NeRF's convention
    (direction x = (i - W/2) / f for pixel column i) (:func:`corner_shift`).
    Returns origins and directions (B, H*W, 3). Directions are not normalised:
    their camera-space z is -1, so a ray parameter t is depth along the optical axis.
    """
    tan_half = math.tan(0.5 * math.radians(fov_deg))
    b = grid.shape[0]
    flat = grid.reshape(b, -1, 2)
    if shift:
        flat = flat - shift
    dirs_cam = torch.stack(
        (flat[..., 0] * tan_half, -flat[..., 1] * tan_half, -torch.ones_like(flat[..., 0])), dim=-1
    )
    directions = dirs_cam @ c2w[:, :3, :3].transpose(1, 2)
    origins = c2w[:, None, :3, 3].expand_as(directions)
    return origins, directions


def corner_shift(image_size: int) -> float:
    """The :func:`rays_from_grid` shift that moves pixel-centre rays of a ``image_size``-pixel
    image to the pixels' corners: half a pixel, 1 / W in normalised units."""
    return 1.0 / image_size


def full_grid(size: int, batch: int = 1, device=None, dtype=torch.float32) -> torch.Tensor:
    """Pixel-centre grid (batch, size, size, 2) covering the whole image."""
    coords = (torch.arange(size, device=device, dtype=dtype) * 2 + 1) / size - 1
    yy, xx = torch.meshgrid(coords, coords, indexing="ij")
    return torch.stack((xx, yy), dim=-1).expand(batch, size, size, 2)
