"""Where runs live: tracking URIs, the UI link of a run, the tag naming a run's checkpoint.
Light (no mlflow import), for everything that only needs to name a store or a run."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Optional
from urllib.parse import urlparse

from grafccsr.paths import default_tracking_uri

LOCAL_UI = "http://127.0.0.1:5000"
"""Where ``make ui`` serves a local store."""
CHECKPOINT_TAG = "checkpoint.latest"
"""Artifact path of the newest completely uploaded checkpoint (``tracking.log_checkpoints``)."""


def resolve_uri(uri: Optional[str]) -> str:
    return uri or default_tracking_uri()


def is_server(uri: str) -> bool:
    return urlparse(uri).scheme in ("http", "https")


def artifact_root_for(uri: str) -> Optional[str]:
    """Local artifact folder for a local SQLite store (None for servers)."""
    if uri.startswith("sqlite:///"):
        db_path = Path(urlparse(uri).path if uri.startswith("sqlite:////") else uri[len("sqlite:///"):])
        return (db_path.resolve().parent / "mlartifacts").as_uri()
    return None


def run_url(uri: str, experiment_id: str, run_id: str) -> str:
    """Link to a run in the MLflow UI (a server's own, or ``make ui`` for a local store), opening
    the model-training view."""
    base = uri.rstrip("/") if is_server(uri) else LOCAL_UI
    return f"{base}/#/experiments/{experiment_id}/runs/{run_id}?workflowType=machine_learning"


def http_settings(request_timeout_s: int, request_retries: int) -> dict:
    """MLflow's HTTP client settings (environment variables it reads at every request) that
    bound each call to a tracking server: ``(retries + 1) x timeout`` plus 1 + 2 + ... s of
    back-off (and up to 1 s of jitter per retry)."""
    return {"MLFLOW_HTTP_REQUEST_TIMEOUT": str(int(request_timeout_s)),
            "MLFLOW_HTTP_REQUEST_MAX_RETRIES": str(int(request_retries)),
            "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1"}


def apply_http_settings(request_timeout_s: int, request_retries: int) -> None:
    """Bound every MLflow HTTP call of this process (and of the processes it starts)."""
    os.environ.update(http_settings(request_timeout_s, request_retries))
