"""Where the project's files live: its configs and the default stores.

Run from a checkout, defaults sit in the checkout (``data/``, ``mlflow.db``, ``runs/`` under
the working directory); installed from a wheel, the configs come with the package and the
stores go to the current directory.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

_CHECKOUT = Path(__file__).resolve().parent.parent
IN_CHECKOUT = (_CHECKOUT / "pyproject.toml").is_file() and (_CHECKOUT / "conf" / "config.yaml").is_file()

PROJECT_ROOT = _CHECKOUT if IN_CHECKOUT else Path.cwd()
"""The checkout, or (installed) the directory the tools were started in."""
CONF_DIR = _CHECKOUT / "conf" if IN_CHECKOUT else Path(__file__).resolve().parent / "conf"
"""Hydra's config tree."""
DATA_DIR = PROJECT_ROOT / "data"
"""Generated datasets and the FID real-statistics cache."""


def default_tracking_uri() -> str:
    """MLflow's default store: ``sqlite:///<project>/mlflow.db`` (artifacts in ``mlartifacts/``)."""
    return f"sqlite:///{PROJECT_ROOT / 'mlflow.db'}"


def program_name(prog: str) -> str:
    """``prog`` ("python -m grafccsr.models") as the user invoked it: the console script's name
    (``grafccsr-models``) when run as one, for usage lines and help texts."""
    invoked = os.path.basename(sys.argv[0]) if sys.argv and sys.argv[0] else ""
    return invoked if invoked.startswith("grafccsr-") else prog
