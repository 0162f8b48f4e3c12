"""How a run ends: statuses, reasons, exit codes, and which errors are out-of-memory.

One table for the trainer, its command line and the sweep driver (which reads a trial's
exit code and ``metrics.json``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, Optional

EXIT_OK = 0
EXIT_ERROR = 1
"""A bug: the traceback is printed."""
EXIT_CONFIG = 2
"""Bad config or command line: nothing started."""
EXIT_OOM = 3
EXIT_NONFINITE = 4
EXIT_DATA = 5
"""The dataset could not be read: nothing started."""
EXIT_DISK = 6
"""A run file (checkpoint, ``metrics.json``, samples) could not be written: disk full, a file-size
limit, a read-only or refusing file system. The last complete checkpoint is kept."""
EXIT_STORAGE_LOST = 7
"""The sweep's Optuna storage (database) stopped answering; the study keeps what it had stored."""
EXIT_INTERRUPTED = 130

REASON_BY_EXIT = {EXIT_ERROR: "error", EXIT_CONFIG: "config", EXIT_OOM: "oom", EXIT_NONFINITE: "nonfinite",
                  EXIT_DATA: "data", EXIT_DISK: "disk", EXIT_INTERRUPTED: "interrupted"}
"""``reason`` of a run (``metrics.json``, MLflow tag ``failure_reason``) by exit code."""

_OOM_MESSAGES = ("out of memory", "can't allocate memory", "cannot allocate memory", "failed to allocate")


@dataclass
class RunResult:
    status: str
    """FINISHED | FAILED | KILLED."""
    reason: Optional[str]
    """None | oom | nonfinite | disk | interrupted | error."""
    exit_code: int
    summary: Dict[str, Any] = field(default_factory=dict)


def is_out_of_memory(err: BaseException) -> bool:
    """True for an allocation failure on any device: CUDA's ``torch.OutOfMemoryError``, the
    CPU allocator's ``RuntimeError: ... DefaultCPUAllocator: can't allocate memory``, and
    Python's ``MemoryError``."""
    import torch

    if isinstance(err, (torch.OutOfMemoryError, MemoryError)):
        return True
    if isinstance(err, RuntimeError):
        text = str(err).lower()
        return any(m in text for m in _OOM_MESSAGES)
    return False
