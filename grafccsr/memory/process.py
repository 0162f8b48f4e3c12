"""Process-level memory and time of real training iterations (Linux ``/proc``).

What the original graf_ccsr figures in the issue measure: seconds per D + G iteration
and the peak resident set size (RSS) above the process's baseline, the baseline taken
once the models, optimisers and batch exist. The peak is the kernel's high-water mark
(``VmHWM``), reset through ``/proc/self/clear_refs`` just before the first iteration.
It counts everything the process holds (tensors, the allocator's cached blocks, the
C library's freed-but-kept heap), unlike the live-tensor peak of
:mod:`grafccsr.memory.tracker`.
"""

from __future__ import annotations

import gc
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import List

import torch

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


@dataclass
class ProcessMeasurement:
    iteration_s: List[float] = field(default_factory=list)
    baseline_rss_mb: float = 0.0
    peak_rss_above_baseline_mb: float = 0.0
    threads: int = 0

    @property
    def median_s(self) -> float:
        return statistics.median(self.iteration_s)


def measure_process(cfg, num_classes: int, iterations: int = 2, log=print) -> ProcessMeasurement:
    """Build the models and step of ``cfg`` on the CPU, then run ``iterations`` D + G
    iterations on a synthetic batch, timing each (wall clock) and recording the peak
    RSS above the baseline."""
    from grafccsr.memory.estimate import synthetic_step

    if not process_memory_supported():
        raise SystemExit("process memory needs Linux's /proc/self/status and /proc/self/clear_refs")
    result = ProcessMeasurement(threads=torch.get_num_threads())
    step, batch = synthetic_step(cfg, num_classes, "cpu", seed=cfg.train.seed)
    gc.collect()
    result.baseline_rss_mb = rss_mb()
    reset_peak_rss()
    for it in range(iterations):
        t0 = time.perf_counter()
        step.d_step(batch, it)
        step.g_step(batch, it)
        result.iteration_s.append(time.perf_counter() - t0)
        log(f"[rss] iteration {it + 1}/{iterations}: {result.iteration_s[-1]:.1f} s, "
            f"peak RSS above baseline so far {peak_rss_mb() - result.baseline_rss_mb:.0f} MiB")
    result.peak_rss_above_baseline_mb = peak_rss_mb() - result.baseline_rss_mb
    return result
