"""``metrics.json``: the run's result, readable without MLflow (sweeps read it)."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Dict

METRICS_FILE = "metrics.json"


def write_summary(output_dir: Path, summary: Dict[str, Any]) -> Path:
    path = Path(output_dir) / METRICS_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(summary, indent=2, sort_keys=True, default=str))
    os.replace(tmp, path)
    return path


def read_summary(output_dir: Path) -> Dict[str, Any]:
    return json.loads((Path(output_dir) / METRICS_FILE).read_text())
