"""Which views of a dataset are held out of training (``data.holdout``).

The split is a property of the dataset: computed once from its labels when it is loaded, so the
loader (which skips held-out views), the evaluation (which renders exactly them) and the record
of the run agree on it.
"""

from __future__ import annotations

from typing import Any, Dict, Sequence

import torch

from grafccsr.config.schema import HoldoutConfig
from grafccsr.data.errors import DatasetError


def held_out_mask(labels: torch.Tensor, holdout: HoldoutConfig) -> torch.Tensor:
    """Bool (N,): which views (labels (N, 3) = class, elevation index, azimuth degrees) are held out.

    Every k-th azimuth counts steps of the set's azimuth grid, the sorted distinct azimuths of all
    views, so every class and elevation loses the same azimuths."""
    azimuth, elevation = labels[:, 2], labels[:, 1]
    held = torch.zeros(labels.shape[0], dtype=torch.bool)
    if holdout.every_k_azimuth:
        grid = torch.unique(azimuth)  # sorted
        chosen = grid[holdout.azimuth_offset::holdout.every_k_azimuth]
        held |= torch.isin(azimuth, chosen)
    degrees = azimuth.double()
    for low, high in holdout.ranges():
        held |= ((degrees >= low) & (degrees < high)) if low < high else ((degrees >= low) | (degrees < high))
    if holdout.elevations:
        held &= torch.isin(elevation, torch.tensor(list(holdout.elevations), dtype=elevation.dtype))
    return held


def check_split(dataset: Any) -> None:
    """Before training on ``dataset`` (a :class:`~grafccsr.data.folder.MultiViewFolder`): a holdout
    that selects no view, or leaves a class without a view to train on, is a DatasetError."""
    holdout, held, labels = dataset.holdout, dataset.held_out, dataset.labels
    if not holdout.enabled:
        return
    if not held.any():
        raise DatasetError(f"data.holdout selects no view of {dataset.root} (every_k_azimuth="
                           f"{holdout.every_k_azimuth}, azimuth_ranges={list(holdout.azimuth_ranges)}, "
                           f"elevations={list(holdout.elevations)})")
    for k, name in enumerate(dataset.class_names):
        if bool(held[labels[:, 0] == k].all()):
            raise DatasetError(f"data.holdout holds out every view of class {name!r} in {dataset.root}: nothing "
                               "left to train on; hold out fewer views or set data.holdout.every_k_azimuth=0")


def describe_split(held: torch.Tensor, labels: torch.Tensor, elevation_prefixes: Sequence[str]) -> Dict[str, Any]:
    """The record of a split (for ``metrics.json``): how many views, and which azimuths at which
    elevation (by elevation prefix) were held out."""
    per_elevation: Dict[str, list] = {}
    for e in sorted(set(labels[held, 1].tolist())):
        at = held & (labels[:, 1] == e)
        per_elevation[str(elevation_prefixes[e])] = sorted(set(labels[at, 2].tolist()))
    return {"views": int(held.sum()), "train_views": int((~held).sum()), "azimuths_deg": per_elevation}
