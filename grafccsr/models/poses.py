"""Where the generator's cameras sit: poses ``(u, v)`` from dataset labels or at random.

A pose is ``(u, v)``: azimuth fraction ``u = deg / 360`` and elevation parameter ``v``
(polar angle ``arccos(1 - 2 v)``). Turning poses into camera matrices is
:func:`grafccsr.camera.pose_matrix`'s job.
"""

from __future__ import annotations

from typing import Sequence

import torch

from grafccsr.config import PoseConfig


def poses_from_labels(
    labels: torch.Tensor, elevation_v: Sequence[float], dtype: torch.dtype = torch.float32
) -> tuple[torch.Tensor, torch.Tensor]:
    """Known poses (graf_ccsr): the pose each real image was taken at.

    labels: (B, 3) int64 rows ``[class_idx, elev_idx, azimuth_deg]``;
    elevation_v: ``v`` of each elevation index. Returns u, v: (B,) each.
    """
    v_table = torch.tensor(list(elevation_v), dtype=dtype, device=labels.device)
    u = labels[:, 2].to(dtype) / 360.0
    v = v_table[labels[:, 1]]
    return u, v


def sample_random_poses(
    batch: int,
    cfg: PoseConfig,
    device: torch.device | str,
    generator: torch.Generator | None = None,
    dtype: torch.dtype = torch.float32,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Random poses (GRAF): u ~ U(cfg.u_range), v ~ U(cfg.v_range), each (B,).

    ``generator`` must live on ``device`` (torch draws on the generator's device).
    """
    draws = torch.rand(2, batch, generator=generator, device=device, dtype=dtype)
    (u_lo, u_hi), (v_lo, v_hi) = cfg.u_range, cfg.v_range
    return u_lo + (u_hi - u_lo) * draws[0], v_lo + (v_hi - v_lo) * draws[1]
