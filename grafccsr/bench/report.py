"""The benchmark's outputs: the printed table, ``bench.csv``/``bench.json`` and MLflow runs."""

from __future__ import annotations

import csv
import json
import math
import os
import platform
from dataclasses import asdict
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Dict, List, Optional

import torch

from grafccsr.bench.grids import Grid
from grafccsr.bench.runner import COLUMNS, Result
from grafccsr.config import TrackingConfig
from grafccsr.tracking.base import build_tracker


def environment(device: torch.device) -> Dict[str, Any]:
    env = {
        "device": device.type,
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
        "python": platform.python_version(),
        "time": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
    try:
        env["loadavg_1m"] = os.getloadavg()[0]
    except OSError:
        pass
    return env


def _si(value: float) -> str:
    """1234567 -> '1.23M' (rays/s and points/s span k on a CPU to G on a GPU)."""
    if value is None or not math.isfinite(value):
        return "-"
    for factor, suffix in ((1e15, "P"), (1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(value) >= factor:
            return f"{value / factor:.3g}{suffix}"
    return f"{value:.3g}"


def _fmt(value: float, spec: str) -> str:
    return "-" if value is None or (isinstance(value, float) and math.isnan(value)) else format(value, spec)


def format_table(grid: Grid, results: List[Result], env: Dict[str, Any], estimate: bool = False) -> str:
    measure = "CUDA max_memory_reserved" if env["device"] == "cuda" else "live tensor bytes (512 B rounding)"
    lines = [
        f"grafccsr bench  grid={grid.name}  device={env['device']} ({env['device_name']})  torch {env['torch']}  "
        f"threads={env['threads']}" + (f"  load(1m)={env['loadavg_1m']:.1f}" if "loadavg_1m" in env else "")
        + (f"->{env['loadavg_1m_end']:.1f}" if env.get("loadavg_1m_end") is not None else ""),
        f"sizes: {grid.reduced}",
        f"times ({env.get('clock', 'wall')} clock): median of {env.get('repeats', 'the')} repeats after warm-up"
        f"{' (rows interleaved round-robin)' if env.get('interleave') else ''}; peak = max over D and G step of {measure}, "
        "in a separate untimed iteration; ratios against the first row, same process and device",
        "FLOP/it: torch's FlopCounterMode over one more untimed D+G iteration, counting matmuls and convolutions "
        "only; x flop = row FLOPs / reference FLOPs (a speed-up beyond 1 / x flop is execution, not arithmetic); "
        "pts/s: field evaluations (before early termination's savings)",
    ]
    header = (f"{'row':<20}{'B':>3}{'rays':>6}{'S':>4} {'amp':<9}{'D ms':>8}{'G ms':>8}{'it ms':>9}{'it/s':>7}"
              f"{'rays/s':>8}{'pts/s':>8}{'x it/s':>8}{'peak MiB':>10}{'x mem':>7}{'FLOP/it':>9}{'x flop':>8}")
    if estimate:
        header += f"{'est MiB':>9}"
    lines += [header, "-" * len(header)]
    for r in results:
        name = r.row + ("*" if r.changes_maths else "")
        if r.status != "ok":
            lines.append(f"{name:<20}{r.batch_size:>3}{r.rays_per_patch:>6}{r.samples_per_ray:>4} {r.amp:<9}"
                         f"  {r.status.upper()}: {r.error[:80]}")
            continue
        line = (f"{name:<20}{r.batch_size:>3}{r.rays_per_patch:>6}{r.samples_per_ray:>4} {r.amp:<9}"
                f"{r.d_ms:>8.0f}{r.g_ms:>8.0f}{r.iter_ms:>9.0f}{r.it_per_s:>7.2f}"
                f"{_si(r.rays_per_s):>8}{_si(r.points_per_s):>8}{_fmt(r.speedup_vs_ref, '>8.2f')}"
                f"{r.peak_mb:>10.1f}{_fmt(r.mem_ratio_vs_ref, '>7.2f')}"
                f"{_si(r.flops):>9}{_fmt(r.flop_ratio_vs_ref, '>8.2f')}")
        if estimate:
            est = r.est_reserved_mb if env["device"] == "cuda" else r.est_live_mb
            line += _fmt(est, ">9.1f")
        lines.append(line)
    lines.append("")
    lines += [f"  {r.row + ('*' if r.changes_maths else ''):<20}{r.label}" for r in results]
    if any(r.changes_maths for r in results):
        lines.append("  * changes the maths (another function than the reference; quality not measured by a benchmark)")
    return "\n".join(lines)


def write_results(out: Path, grid: Grid, results: List[Result], env: Dict[str, Any]) -> Dict[str, Path]:
    out.mkdir(parents=True, exist_ok=True)
    csv_path, json_path = out / "bench.csv", out / "bench.json"
    with csv_path.open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=COLUMNS)
        writer.writeheader()
        for r in results:
            writer.writerow(asdict(r))
    payload = {"grid": {"name": grid.name, "base": grid.base, "reduced": grid.reduced}, "environment": env,
               "rows": [_json_safe(asdict(r)) for r in results]}
    json_path.write_text(json.dumps(payload, indent=2))
    return {"csv": csv_path, "json": json_path}


def _json_safe(row: Dict[str, Any]) -> Dict[str, Any]:
    return {k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in row.items()}


def log_mlflow(grid: Grid, results: List[Result], env: Dict[str, Any], paths: Dict[str, Path],
               uri: Optional[str], experiment: str) -> str:
    """A parent run for the grid, one child run per row (mlflow is imported by the tracker)."""
    name = f"bench-{grid.name}-{env['device']}"
    parent = build_tracker(TrackingConfig(backend="mlflow", uri=uri, experiment=experiment), run_name=name,
                           tags={"kind": "bench", "grid": grid.name, **{k: str(v) for k, v in env.items()}})
    parent.log_params({"grid": grid.name, "base": " ".join(grid.base), "reduced": grid.reduced})
    for path in paths.values():
        parent.log_artifact(path)
    for r in results:
        child = build_tracker(TrackingConfig(backend="mlflow", uri=uri, experiment=experiment,
                                             parent_run_id=parent.run_id),
                              run_name=f"{name}-{r.row}", tags={"kind": "bench-row", "status": r.status})
        child.log_params({"row": r.row, "label": r.label, "overrides": r.overrides})
        child.log_metrics({k: v for k, v in asdict(r).items()
                           if isinstance(v, (int, float)) and not isinstance(v, bool)}, step=0)
        child.end("FINISHED" if r.status == "ok" else "FAILED")
    parent.end("FINISHED")
    return parent.run_id
