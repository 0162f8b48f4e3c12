"""Measuring what a run uses: live tensor bytes and CUDA peaks per phase, process RSS.

A leaf: needs only torch, and is used by training, sizing and the benchmark.
"""

from grafccsr.measure.process import peak_rss_mb, process_memory_supported, process_peak_rss_mb, reset_peak_rss, rss_mb
from grafccsr.measure.tracker import MB, TRAINING_PHASES, LiveTensorBytes, PhaseMemory, state_tensors

__all__ = [
    "MB", "TRAINING_PHASES", "LiveTensorBytes", "PhaseMemory", "peak_rss_mb", "process_memory_supported",
    "process_peak_rss_mb", "reset_peak_rss", "rss_mb", "state_tensors",
]
