"""``metrics.json``: the run's result, readable without MLflow (sweeps read it)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Dict

from grafccsr.tracking.files import write_atomic

METRICS_FILE = "metrics.json"


def write_summary(output_dir: Path, summary: Dict[str, Any]) -> Path:
    """Written whole or not at all; a full disk raises :class:`~grafccsr.tracking.files.WriteFailed`."""
    text = json.dumps(summary, indent=2, sort_keys=True, default=str).encode()
    return write_atomic(Path(output_dir) / METRICS_FILE, lambda fh: fh.write(text))


def read_summary(output_dir: Path) -> Dict[str, Any]:
    return json.loads((Path(output_dir) / METRICS_FILE).read_text())
