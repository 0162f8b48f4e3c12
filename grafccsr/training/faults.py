"""Fault injection at the loop's edge, for tests that run the trainer as a user does.

``GRAFCCSR_FAULT=oom@3`` raises an out-of-memory error before iteration 3;
``GRAFCCSR_FAULT=nan@2`` feeds iteration 2 a batch of NaN images (a corrupt input), so the
step's own finiteness check fires; ``GRAFCCSR_FAULT=error@2`` raises a plain error (a bug).
``:rank1`` (e.g. ``oom@3:rank1``) limits the fault to one rank of a torchrun job. Nothing in
the training step knows about this.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Optional

import torch

FAULT_ENV = "GRAFCCSR_FAULT"
KINDS = ("oom", "nan", "error")


@dataclass(frozen=True)
class Fault:
    kind: str
    iteration: int

    def before_iteration(self, iteration: int, images: torch.Tensor) -> torch.Tensor:
        """Raise or corrupt at the chosen iteration; otherwise return ``images`` unchanged."""
        if iteration != self.iteration:
            return images
        if self.kind == "oom":
            raise torch.OutOfMemoryError(f"injected out-of-memory at iteration {iteration} ({FAULT_ENV})")
        if self.kind == "error":
            raise RuntimeError(f"injected error at iteration {iteration} ({FAULT_ENV})")
        return torch.full_like(images, float("nan"))


def fault_from_env(rank: int = 0) -> Optional[Fault]:
    spec = os.environ.get(FAULT_ENV, "").strip()
    if not spec:
        return None
    spec, _, only = spec.partition(":")
    kind, _, at = spec.partition("@")
    if kind not in KINDS or not at.isdigit() or (only and not (only.startswith("rank") and only[4:].isdigit())):
        raise ValueError(f"{FAULT_ENV}={spec!r}: expected one of {KINDS}, @ITERATION and optionally :rankN, "
                         "e.g. oom@3 or oom@3:rank1")
    if only and int(only[4:]) != rank:
        return None
    return Fault(kind, int(at))
