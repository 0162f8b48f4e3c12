"""Process-level memory (Linux ``/proc``): resident set size and its high-water mark.

The peak is the kernel's high-water mark (``VmHWM``), which :func:`reset_peak_rss` sets back
to the current RSS. It counts everything the process holds (tensors, the allocator's cached
blocks, the C library's freed-but-kept heap), unlike the live-tensor peak of
:mod:`grafccsr.measure.tracker`.
"""

from __future__ import annotations

import resource
from pathlib import Path

_STATUS = Path("/proc/self/status")


def _status_kb(key: str) -> int:
    for line in _STATUS.read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{key} not in {_STATUS}")


def process_memory_supported() -> bool:
    return _STATUS.is_file() and Path("/proc/self/clear_refs").exists()


def rss_mb() -> float:
    return _status_kb("VmRSS") / 1024.0


def peak_rss_mb() -> float:
    return _status_kb("VmHWM") / 1024.0


def reset_peak_rss() -> None:
    """Set the high-water mark to the current RSS (Linux >= 4.0)."""
    Path("/proc/self/clear_refs").write_text("5")


def process_peak_rss_mb() -> float:
    """Peak resident set size of this process since it started (Linux ru_maxrss is in KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0
