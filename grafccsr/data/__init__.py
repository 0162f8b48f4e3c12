"""Multi-view data: the embedded synthetic set, real folders, and endless batches.

Every dataset, embedded or real, ends up as a :class:`MultiViewFolder` whose items are
``dict(image=(3, S, S) in [-1, 1], label=(class, elevation index, azimuth deg), pose=(u, v))``.
"""

from __future__ import annotations

from pathlib import Path

from grafccsr.config import CameraConfig, DataConfig
from grafccsr.data.errors import DatasetError
from grafccsr.data.folder import MultiViewFolder
from grafccsr.data.loader import InfiniteSampler, build_loader
from grafccsr.data.synthetic import build_synthetic

__all__ = ["DatasetError", "InfiniteSampler", "MultiViewFolder", "build_dataset", "build_loader", "build_synthetic"]


def build_dataset(cfg: DataConfig, camera: CameraConfig) -> MultiViewFolder:
    """The dataset ``cfg`` names: ``synthetic`` is rendered through ``camera`` on first use
    (then cached), ``folder`` is read from ``cfg.root``; both are validated and loaded into memory."""
    if cfg.kind == "synthetic":
        return MultiViewFolder(build_synthetic(cfg, camera), cfg)
    if cfg.kind == "folder":
        if not cfg.root:
            raise DatasetError("data.root must name the dataset folder when data.kind=folder")
        return MultiViewFolder(Path(cfg.root), cfg)
    raise DatasetError(f"data.kind={cfg.kind!r} is not allowed; choose synthetic or folder")
