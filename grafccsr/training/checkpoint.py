"""Atomic, iteration-based checkpoints holding everything a resume needs."""

from __future__ import annotations

import os
import random
from pathlib import Path
from typing import Any, Dict

import numpy as np
import torch

from grafccsr.config import ConfigError


class CheckpointError(ConfigError):
    """A checkpoint named on the command line is missing, unreadable or not ours."""

CHECKPOINT_NAME = "checkpoint.pt"
"""The latest state of a run (written every ``train.ckpt_every`` iterations and at the end)."""
BEST_NAME = "best.pt"
"""The state with the best ``eval.best_metric`` so far."""
SNAPSHOT_DIR = "snapshots"
"""``snapshots/<k>.pt``: states at fractions of a time budget (``train.snapshots``)."""
PARTIAL_SUFFIX = ".tmp"


def rng_state() -> Dict[str, Any]:
    state = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: Dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(state: Dict[str, Any], path: Path) -> Path:
    """Write ``state`` to ``path`` atomically: a crash mid-write leaves the previous file intact."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + PARTIAL_SUFFIX)
    torch.save(state, tmp)
    with open(tmp, "rb") as f:
        os.fsync(f.fileno())
    os.replace(tmp, path)
    return path


def remove_partial_files(run_dir: Path) -> None:
    """Delete checkpoints half-written by a killed process (``*.pt.tmp``); the complete
    files beside them are untouched."""
    for partial in Path(run_dir).rglob(f"*.pt{PARTIAL_SUFFIX}"):
        partial.unlink(missing_ok=True)


def resolve_checkpoint(path_or_dir: str | Path, name: str = CHECKPOINT_NAME) -> Path:
    """Accept a checkpoint file or a run folder holding ``name``."""
    path = Path(path_or_dir).expanduser()
    if path.is_dir():
        path = path / name
    if not path.is_file():
        raise CheckpointError(f"no checkpoint at {path}")
    return path


def load_checkpoint(path: str | Path, name: str = CHECKPOINT_NAME) -> Dict[str, Any]:
    """A checkpoint file (or a run folder's ``name``) as saved by the trainer."""
    path = resolve_checkpoint(path, name)
    try:
        state = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as err:  # torch raises many types for corrupt or truncated files
        raise CheckpointError(f"could not read checkpoint {path}: {first_line(err)}") from None
    if not isinstance(state, dict) or "config" not in state or "step" not in state:
        raise CheckpointError(f"{path} is not a grafccsr training checkpoint (no config/step)")
    return state


def first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__
