"""Measured memory, per training phase.

Two measures, both real (no estimates here):

* **CUDA** (when the device is CUDA): ``torch.cuda.max_memory_allocated`` and
  ``max_memory_reserved`` with the peak counters reset at the start of every
  phase, so each phase reports its own peak (StyleGAN3's per-tick
  ``Resources/peak_gpu_mem``).
* **Live tensor bytes** (any device): a ``TorchDispatchMode`` that sees every
  tensor an operator returns, counts its storage once while it is alive (weak
  references tell when it is freed) and keeps the peak. Tensors that were alive
  before the phase (parameters, gradients, optimiser state, the batch) are
  registered at entry. Storage sizes are rounded up to CUDA's 512-byte
  allocation granularity so the figure is comparable with
  ``max_memory_allocated``. The mode slows every operator, so it only runs on
  sampled iterations; other iterations run untouched.
"""

from __future__ import annotations

import weakref
from contextlib import contextmanager
from typing import Dict, Iterable, Iterator, Optional

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

MB = 1024.0 * 1024.0
CUDA_BLOCK = 512


def _rounded(nbytes: int) -> int:
    return ((nbytes + CUDA_BLOCK - 1) // CUDA_BLOCK) * CUDA_BLOCK


class LiveTensorBytes(TorchDispatchMode):
    """Peak bytes of live tensor storages while the mode is active."""

    def __init__(self) -> None:
        super().__init__()
        self._live: Dict[int, weakref.ref] = {}
        self.current = 0
        self.peak = 0

    def track(self, tensor: torch.Tensor) -> None:
        if tensor.is_meta or not hasattr(tensor, "untyped_storage"):
            return
        try:
            storage = tensor.untyped_storage()
        except (RuntimeError, NotImplementedError):  # e.g. sparse or functional wrappers
            return
        key = storage._cdata
        if key in self._live:
            return
        size = _rounded(storage.nbytes())
        self.current += size
        self.peak = max(self.peak, self.current)

        def _freed(_ref, key=key, size=size) -> None:
            if self._live.pop(key, None) is not None:
                self.current -= size

        self._live[key] = weakref.ref(storage, _freed)

    def track_all(self, tensors: Iterable[torch.Tensor]) -> None:
        for tensor in tensors:
            self.track(tensor)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for item in tree_flatten(out)[0]:
            if isinstance(item, torch.Tensor):
                self.track(item)
        return out


def state_tensors(*objects) -> Iterator[torch.Tensor]:
    """Tensors held by modules (params, grads, buffers) and optimisers (state)."""
    for obj in objects:
        if obj is None:
            continue
        if isinstance(obj, torch.nn.Module):
            for p in obj.parameters():
                yield p
                if p.grad is not None:
                    yield p.grad
            yield from obj.buffers()
        elif isinstance(obj, torch.optim.Optimizer):
            for state in obj.state.values():
                yield from (v for v in state.values() if isinstance(v, torch.Tensor))
        elif isinstance(obj, torch.Tensor):
            yield obj


class PhaseMemory:
    """Peak memory per phase (``d_step``, ``g_step``, ``sample``, ``eval``, ...).

    ``window`` holds the peaks since the last :meth:`pop_window` (one log tick);
    ``run`` holds the peaks over the whole run. Values are in MiB.
    """

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.is_cuda = device.type == "cuda"
        self.window: Dict[str, float] = {}
        self.run: Dict[str, float] = {}

    def _record(self, key: str, value_mb: float) -> None:
        self.window[key] = max(self.window.get(key, 0.0), value_mb)
        self.run[key] = max(self.run.get(key, 0.0), value_mb)

    @contextmanager
    def phase(self, name: str, track_live: bool = False, state: Iterable = ()) -> Iterator[Optional[LiveTensorBytes]]:
        """Measure one phase. With ``track_live``, also count live tensor bytes;
        ``state`` lists modules/optimisers/tensors alive at entry."""
        if self.is_cuda:
            torch.cuda.reset_peak_memory_stats(self.device)
        mode = LiveTensorBytes() if track_live else None
        try:
            if mode is not None:
                mode.track_all(state_tensors(*state))
                with mode:
                    yield mode
            else:
                yield None
        finally:
            if self.is_cuda:
                self._record(f"mem/{name}/peak_allocated_mb", torch.cuda.max_memory_allocated(self.device) / MB)
                self._record(f"mem/{name}/peak_reserved_mb", torch.cuda.max_memory_reserved(self.device) / MB)
            if mode is not None:
                self._record(f"mem/{name}/peak_live_tensors_mb", mode.peak / MB)

    def pop_window(self) -> Dict[str, float]:
        """Peaks since the last call (per phase and their maximum)."""
        out = dict(self.window)
        out.update(_run_maxima(self.window))
        self.window = {}
        return out

    def summary(self) -> Dict[str, float]:
        """Per-phase and run-wide peaks over the whole run."""
        out = dict(self.run)
        out.update(_run_maxima(self.run))
        return out


TRAINING_PHASES = ("d_step", "g_step")


def _run_maxima(peaks: Dict[str, float]) -> Dict[str, float]:
    """``mem/<measure>``: maximum over every phase; ``mem/train_<measure>``: over the
    training step's phases only (what batch size, samples per ray and AMP change;
    sampling and evaluation depend on ``eval.batch_size`` and ``memory.render_chunk``)."""
    out: Dict[str, float] = {}
    for measure in ("peak_allocated_mb", "peak_reserved_mb", "peak_live_tensors_mb"):
        per_phase = {k.split("/")[1]: v for k, v in peaks.items() if k.endswith("/" + measure) and k.count("/") == 2}
        if per_phase:
            out[f"mem/{measure}"] = max(per_phase.values())
        training = [v for phase, v in per_phase.items() if phase in TRAINING_PHASES]
        if training:
            out[f"mem/train_{measure}"] = max(training)
    return out

