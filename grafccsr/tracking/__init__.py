"""Run tracking: MLflow (or nothing) plus the run folder's metrics.json."""

from grafccsr.tracking.base import NullTracker, Tracker, build_tracker

__all__ = ["NullTracker", "Tracker", "build_tracker"]
