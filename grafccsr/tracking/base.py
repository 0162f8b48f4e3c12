"""The tracker interface the training loop talks to (MLflow or nothing)."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Dict, Mapping, Optional

from grafccsr.config import TrackingConfig


class Tracker:
    """No-op tracker; :class:`grafccsr.tracking.mlflow.MlflowTracker` overrides every call."""

    run_id: Optional[str] = None

    def log_params(self, params: Mapping[str, Any]) -> None:
        pass

    def set_tags(self, tags: Mapping[str, Any]) -> None:
        pass

    def log_metrics(self, metrics: Mapping[str, float], step: int) -> None:
        pass

    def log_artifact(self, path: Path, artifact_path: Optional[str] = None) -> None:
        pass

    def end(self, status: str) -> None:
        """``status`` is FINISHED, FAILED or KILLED."""


NullTracker = Tracker


def build_tracker(cfg: TrackingConfig, run_name: str, resume_run_id: Optional[str] = None,
                  tags: Optional[Dict[str, str]] = None) -> Tracker:
    if cfg.backend == "none":
        return NullTracker()
    from grafccsr.tracking.mlflow import MlflowTracker  # mlflow import costs seconds

    return MlflowTracker(cfg, run_name=run_name, resume_run_id=resume_run_id, tags=tags)
