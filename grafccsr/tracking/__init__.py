"""Run tracking: MLflow (or nothing) plus the run folder's metrics.json."""

from grafccsr.tracking.base import Tracker, build_tracker

__all__ = ["Tracker", "build_tracker"]
