"""Seconds per iteration and peak process RSS of real training iterations on the CPU.

What the original graf_ccsr figures were measured as: seconds per D + G iteration and the
peak resident set size above the process's baseline, the baseline taken once the models,
optimisers and batch exist, the high-water mark reset just before the first iteration.
"""

from __future__ import annotations

import gc
import statistics
import time
from dataclasses import dataclass, field
from typing import List

import torch

from grafccsr.measure.process import peak_rss_mb, process_memory_supported, reset_peak_rss, rss_mb
from grafccsr.sizing.synthetic import synthetic_run


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
    if not process_memory_supported():
        raise SystemExit("process memory needs Linux's /proc/self/status and /proc/self/clear_refs")
    result = ProcessMeasurement(threads=torch.get_num_threads())
    step, batch = synthetic_run(cfg, num_classes, "cpu", seed=cfg.train.seed)
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
