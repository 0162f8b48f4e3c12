"""Atomic, iteration-based checkpoints holding everything a resume needs, as data only.

A checkpoint holds tensors, state dicts and plain Python values (numbers, strings, lists,
tuples, dicts, None) and is read with ``torch.load(weights_only=True)``: unpickling it cannot
run code, whoever wrote the file (a checkpoint may come from an MLflow server or a shared
folder). Checkpoints grafccsr wrote before this held the NumPy RNG state as NumPy arrays;
NumPy's array and scalar reconstruction (data, no code) is allow-listed for them. A file that
needs anything else is refused.
"""

from __future__ import annotations

import pickle
import random
import re
from pathlib import Path
from typing import Any, BinaryIO, Dict, List, Optional

import numpy as np
import torch

from grafccsr.config import ConfigError
from grafccsr.tracking.files import PARTIAL_SUFFIX, write_atomic


class CheckpointError(ConfigError):
    """A checkpoint named on the command line is missing, unreadable or not ours."""

CHECKPOINT_NAME = "checkpoint.pt"
"""The latest state of a run (written every ``train.ckpt_every`` iterations and at the end)."""
BEST_NAME = "best.pt"
"""The state with the best ``eval.best_metric`` so far."""
SNAPSHOT_DIR = "snapshots"
"""``snapshots/<k>.pt``: states at fractions of a time budget (``train.snapshots``)."""


def rng_state() -> Dict[str, Any]:
    """Every random stream of this process, as tensors and plain values."""
    kind, key, pos, has_gauss, cached_gaussian = np.random.get_state()
    version, internal, gauss_next = random.getstate()
    state = {
        "torch": torch.get_rng_state(),
        "numpy": {"bit_generator": str(kind), "key": torch.from_numpy(key.astype(np.int64)), "pos": int(pos),
                  "has_gauss": int(has_gauss), "cached_gaussian": float(cached_gaussian)},
        "python": [int(version), list(internal), gauss_next],
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: Dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    numpy_state = state["numpy"]
    if isinstance(numpy_state, dict):
        numpy_state = (numpy_state["bit_generator"], numpy_state["key"].numpy().astype(np.uint32),
                       numpy_state["pos"], numpy_state["has_gauss"], numpy_state["cached_gaussian"])
    np.random.set_state(numpy_state)  # a tuple with a NumPy array in checkpoints written before
    version, internal, gauss_next = state["python"]
    random.setstate((version, tuple(internal), gauss_next))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def plain(value: Any) -> Any:
    """``value`` with NumPy arrays as tensors and NumPy scalars as Python numbers (an evaluation
    result may hand over a ``numpy.float64``), so that ``weights_only`` loading accepts it. Other
    containers (state dicts: ``OrderedDict`` with ``_metadata``) are kept as they are."""
    if type(value) is dict:
        return {k: plain(v) for k, v in value.items()}
    if type(value) in (list, tuple):
        return type(value)(plain(v) for v in value)
    if isinstance(value, np.ndarray):
        return torch.from_numpy(value.copy())
    if isinstance(value, np.generic):
        return value.item()
    return value


class _Recorder:
    """A file wrapper that keeps the OS error of a failed write: torch's writer reports a full
    disk as ``RuntimeError: [enforce fail at inline_container.cc] unexpected pos``, without it."""

    def __init__(self, fh: BinaryIO) -> None:
        self.fh, self.error = fh, None

    def write(self, data) -> int:
        try:
            return self.fh.write(data)
        except OSError as err:
            self.error = err
            raise

    def flush(self) -> None:
        self.fh.flush()


def _torch_save(state: Dict[str, Any], fh: BinaryIO) -> None:
    recorder = _Recorder(fh)
    try:
        torch.save(state, recorder)
    except RuntimeError:
        if recorder.error is not None:
            raise recorder.error from None
        raise


def save_checkpoint(state: Dict[str, Any], path: Path) -> Path:
    """Write ``state`` to ``path`` atomically: a crash or a full disk mid-write leaves the
    previous file intact and no partial file (a full disk raises
    :class:`~grafccsr.tracking.files.WriteFailed` naming ``path``)."""
    state = plain(state)
    return write_atomic(Path(path), lambda fh: _torch_save(state, fh))


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


def _numpy_data_globals() -> List[Any]:
    """NumPy's reconstruction of arrays, dtypes and scalars: data, no code (older checkpoints'
    RNG states)."""
    multiarray = (getattr(np, "_core", None) or np.core).multiarray  # NumPy 2, else 1
    dtypes = [type(np.dtype(name)) for name in ("uint32", "int64", "int32", "float64", "float32", "bool")]
    return [np.ndarray, np.dtype, multiarray._reconstruct, multiarray.scalar, *dtypes]


def load_checkpoint(path: str | Path, name: str = CHECKPOINT_NAME) -> Dict[str, Any]:
    """A checkpoint file (or a run folder's ``name``) as saved by the trainer, read as data only."""
    path = resolve_checkpoint(path, name)
    try:
        with torch.serialization.safe_globals(_numpy_data_globals()):
            state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        needs = _unsafe_global(err)
        if needs is None and "weights only" not in str(err).lower():
            raise CheckpointError(f"could not read checkpoint {path}: {first_line(err)}") from None
        raise CheckpointError(
            f"{path} holds more than tensors and plain values{f' (it needs {needs})' if needs else ''}: refused, "
            "since unpickling it could run code; grafccsr writes data-only checkpoints, so this file is foreign "
            "or was tampered with") from None
    except Exception as err:  # torch raises many types for corrupt or truncated files
        raise CheckpointError(f"could not read checkpoint {path}: {first_line(err)}") from None
    if not isinstance(state, dict) or "config" not in state or "step" not in state:
        raise CheckpointError(f"{path} is not a grafccsr training checkpoint (no config/step)")
    return state


def _unsafe_global(err: BaseException) -> Optional[str]:
    """The global a refused pickle asked for (``builtins.exec``), from torch's message."""
    match = re.search(r"GLOBAL ([\w.]+)", str(err)) or re.search(r"Unsupported global: ([\w.]+)", str(err))
    return match.group(1) if match else None


def first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__
