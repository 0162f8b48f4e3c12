"""Where and from what a run came: git commit, user, host, entry point (MLflow's standard
tags and ours)."""

from __future__ import annotations

import getpass
import os
import socket
import subprocess
import sys
from typing import Dict

from grafccsr.paths import PROJECT_ROOT


def git_state() -> Dict[str, str]:
    """``git_commit`` and ``git_dirty`` of the checkout (empty when not a git checkout)."""
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=PROJECT_ROOT, capture_output=True, text=True,
                                timeout=5).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=PROJECT_ROOT,
                               capture_output=True, text=True, timeout=5).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return {}
    if not commit:
        return {}
    return {"git_commit": commit, "git_dirty": str(bool(dirty)).lower()}


def _user() -> str:
    try:
        return getpass.getuser()
    except (KeyError, OSError):  # no passwd entry in some containers
        return os.environ.get("USER", "unknown")


def provenance_tags() -> Dict[str, str]:
    """MLflow's standard source tags plus ``host``: the UI's Source, User and Version columns."""
    tags = {
        "mlflow.user": _user(),
        "mlflow.source.type": "LOCAL",
        "mlflow.source.name": " ".join(["python", "-m", _module_name()] if _module_name() else sys.argv[:1]),
        "host": socket.gethostname(),
    }
    git = git_state()
    tags.update(git)
    if "git_commit" in git:
        tags["mlflow.source.git.commit"] = git["git_commit"]
    return tags


def _module_name() -> str:
    main = sys.modules.get("__main__")
    spec = getattr(main, "__spec__", None)
    return getattr(spec, "name", "") or ""
