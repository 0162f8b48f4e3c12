"""The tracker interface the training loop talks to (MLflow or nothing)."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Dict, Mapping, Optional, Sequence

from grafccsr.config import TrackingConfig


class Tracker:
    """No tracking; :class:`grafccsr.tracking.mlflow.MlflowTracker` implements every call."""

    run_id: Optional[str] = None
    uri: Optional[str] = None
    url: Optional[str] = None
    """Where a person looks at the run (the MLflow UI), when there is one."""

    def log_params(self, params: Mapping[str, Any]) -> None:
        pass

    def set_tags(self, tags: Mapping[str, Any]) -> None:
        pass

    def log_metrics(self, metrics: Mapping[str, float], step: int) -> None:
        pass

    def log_artifact(self, path: Path, artifact_path: Optional[str] = None) -> None:
        pass

    def log_image(self, path: Path, key: str, step: int) -> None:
        """An image of a series (``key``) at ``step``: the UI's image step slider."""

    def log_dataset(self, dataset: Any) -> None:
        """The training data as the run's input (name, fingerprint, where it lives)."""

    def log_checkpoint(self, path: Path, iteration: int) -> None:
        """Upload a checkpoint so that another machine can evaluate or resume the run."""

    def describe(self, summary: Mapping[str, Any], command: str, files: Sequence[str] = ()) -> None:
        """The run's description from its ``metrics.json`` summary, its command line and its
        uploaded ``files`` (artifact paths): what the UI shows above its metrics and params
        (:func:`grafccsr.tracking.ui.run_note`)."""

    def end(self, status: str) -> None:
        """``status`` is FINISHED, FAILED or KILLED."""

    def report(self) -> Optional[Dict[str, Any]]:
        """How the tracking went (for ``metrics.json``): None without a server, else whether and
        from which iteration it was lost, and what was not sent."""
        return None


def build_tracker(cfg: TrackingConfig, run_name: str, resume_run_id: Optional[str] = None,
                  tags: Optional[Dict[str, str]] = None) -> Tracker:
    if cfg.backend == "none":
        return Tracker()
    from grafccsr.tracking.mlflow import MlflowTracker  # mlflow import costs seconds

    return MlflowTracker(cfg, run_name=run_name, resume_run_id=resume_run_id, tags=tags)
