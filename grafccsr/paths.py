"""Where the project's files live: the checkout root, its configs and default stores.

One place for every path default, so that data, tracking, metrics and tools agree.
"""

from __future__ import annotations

from pathlib import Path

PROJECT_ROOT = Path(__file__).resolve().parent.parent
"""The checkout (the folder holding ``conf/``, ``sweeps/``, ``pyproject.toml``)."""
CONF_DIR = PROJECT_ROOT / "conf"
"""Hydra's config tree."""
DATA_DIR = PROJECT_ROOT / "data"
"""Generated datasets and the FID real-statistics cache."""


def default_tracking_uri() -> str:
    """MLflow's default store: ``sqlite:///<project>/mlflow.db`` (artifacts in ``mlartifacts/``)."""
    return f"sqlite:///{PROJECT_ROOT / 'mlflow.db'}"
