"""Where runs live: tracking URIs, the UI link of a run, the tag naming a run's checkpoint.
Light (no mlflow import), for everything that only needs to name a store or a run."""

from __future__ import annotations

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
