"""Training statistics in the spirit of StyleGAN3's ``training_stats``: report a named scalar
anywhere during a logging interval; :meth:`Stats.collect` returns each name's mean over the
interval and starts the next one. No global state: the loop owns one :class:`Stats`.

Tensors are summed on their device and read once per interval, so reporting a loss costs
no host synchronisation per iteration.
"""

from __future__ import annotations

import time
from contextlib import contextmanager
from typing import Dict, Iterator, Mapping, Optional, Union

import torch

Number = Union[float, int, torch.Tensor]


class Stats:
    """Means of named scalars over one interval (a ``train.log_every`` window)."""

    def __init__(self) -> None:
        self._sums: Dict[str, Number] = {}
        self._counts: Dict[str, int] = {}

    def report(self, name: str, value: Number) -> None:
        """Add one observation of ``name``."""
        if isinstance(value, torch.Tensor):
            value = value.detach()
        self._sums[name] = self._sums[name] + value if name in self._sums else value
        self._counts[name] = self._counts.get(name, 0) + 1

    def report_all(self, values: Mapping[str, Number]) -> None:
        for name, value in values.items():
            self.report(name, value)

    @contextmanager
    def timer(self, name: str) -> Iterator[None]:
        """Report the wall seconds of the block as ``name`` (e.g. ``perf/step_s``)."""
        start = time.perf_counter()
        try:
            yield
        finally:
            self.report(name, time.perf_counter() - start)

    def count(self, name: str) -> int:
        return self._counts.get(name, 0)

    def collect(self) -> Dict[str, float]:
        """Mean of every name reported since the last call; resets."""
        out = {name: float(total) / self._counts[name] for name, total in self._sums.items()}
        self._sums, self._counts = {}, {}
        return out


def train_key(name: str) -> str:
    """The logged name of a training step's statistic: the losses (``loss/d`` -> ``train/loss_d``)
    and D's mean logits (``d/real_logit`` -> ``train/d_real_logit``) go with the learning rate under
    ``train/``; ``perf/*`` keeps its name. MLflow's UI groups a run's charts by what precedes the
    key's last ``/`` and orders the groups alphabetically, so ``eval/`` and ``mem/``
    come first (:mod:`grafccsr.tracking.ui`)."""
    group, _, rest = name.partition("/")
    if group == "loss":
        return f"train/loss_{rest}"
    if group == "d":
        return f"train/d_{rest}"
    return name


def throughput(iterations: int, seconds: float, rays_per_iteration: int, points_per_ray: int) -> Dict[str, float]:
    """``perf/it_per_s``, ``perf/rays_per_s`` (rays rendered: D-step and G-step fakes) and
    ``perf/points_per_s`` (field evaluations) for ``iterations`` that took ``seconds``."""
    if iterations <= 0 or seconds <= 0:
        return {}
    it_per_s = iterations / seconds
    return {
        "perf/it_per_s": it_per_s,
        "perf/rays_per_s": it_per_s * rays_per_iteration,
        "perf/points_per_s": it_per_s * rays_per_iteration * points_per_ray,
    }


def fmt(value: Optional[float]) -> str:
    """A short human number for log lines."""
    if value is None:
        return "-"
    return f"{value:.3g}" if abs(value) < 1000 else f"{value:.0f}"
