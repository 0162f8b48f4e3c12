"""MLflow run lifecycle through ``MlflowClient`` (no global active run, so the
training step and loop stay free of global state).

Default store: ``sqlite:///<project>/mlflow.db`` with artifacts beside it in
``mlartifacts/``, so ``mlflow ui`` at the project root shows every run.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Dict, Mapping, Optional
from urllib.parse import urlparse

from grafccsr.config import PROJECT_ROOT, TrackingConfig
from grafccsr.tracking.base import Tracker

PARAM_MAX_CHARS = 6000


def default_uri() -> str:
    return f"sqlite:///{PROJECT_ROOT / 'mlflow.db'}"


def resolve_uri(uri: Optional[str]) -> str:
    return uri or default_uri()


def artifact_root_for(uri: str) -> Optional[str]:
    """Local artifact folder for a local SQLite store (None for servers)."""
    if uri.startswith("sqlite:///"):
        db_path = Path(urlparse(uri).path if uri.startswith("sqlite:////") else uri[len("sqlite:///"):])
        return (db_path.resolve().parent / "mlartifacts").as_uri()
    return None


def get_or_create_experiment(client, name: str, uri: str) -> str:
    experiment = client.get_experiment_by_name(name)
    if experiment is not None:
        return experiment.experiment_id
    return client.create_experiment(name, artifact_location=artifact_root_for(uri))


class MlflowTracker(Tracker):
    def __init__(self, cfg: TrackingConfig, run_name: str, resume_run_id: Optional[str] = None,
                 tags: Optional[Dict[str, str]] = None) -> None:
        from mlflow.tracking import MlflowClient

        self.uri = resolve_uri(cfg.uri)
        self.client = MlflowClient(tracking_uri=self.uri)
        if resume_run_id:
            run = self.client.get_run(resume_run_id)
            self.run_id = run.info.run_id
            self.client.update_run(self.run_id, status="RUNNING")
            self.resumed = True
        else:
            experiment_id = get_or_create_experiment(self.client, cfg.experiment, self.uri)
            run_tags = {**cfg.tags, **(tags or {}), "mlflow.runName": cfg.run_name or run_name}
            if cfg.parent_run_id:
                run_tags["mlflow.parentRunId"] = cfg.parent_run_id
            run = self.client.create_run(experiment_id, tags=run_tags, run_name=cfg.run_name or run_name)
            self.run_id = run.info.run_id
            self.resumed = False

    def log_params(self, params: Mapping[str, Any]) -> None:
        from mlflow.entities import Param

        if self.resumed:  # params are immutable in MLflow; the resumed run keeps its own
            return
        items = [Param(k, str(v)[:PARAM_MAX_CHARS]) for k, v in params.items()]
        for start in range(0, len(items), 100):
            self.client.log_batch(self.run_id, params=items[start:start + 100], synchronous=True)

    def set_tags(self, tags: Mapping[str, Any]) -> None:
        for k, v in tags.items():
            self.client.set_tag(self.run_id, k, str(v))

    def log_metrics(self, metrics: Mapping[str, float], step: int) -> None:
        import time

        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        items = [Metric(k, float(v), now, step) for k, v in metrics.items() if v is not None and math.isfinite(float(v))]
        for start in range(0, len(items), 1000):
            self.client.log_batch(self.run_id, metrics=items[start:start + 1000], synchronous=True)

    def log_artifact(self, path: Path, artifact_path: Optional[str] = None) -> None:
        self.client.log_artifact(self.run_id, str(path), artifact_path)

    def end(self, status: str) -> None:
        self.client.set_terminated(self.run_id, status=status)
