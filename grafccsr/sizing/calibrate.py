"""The estimator against measured peaks over a small grid of configs (CSV + table).

On the CPU the measurable quantity is live tensor bytes of a real step; on CUDA also
``max_memory_allocated`` / ``max_memory_reserved``, from which :func:`fitted_overhead`
fits the estimator's CUDA constants.
"""

from __future__ import annotations

import math
import statistics
import time
from typing import Dict, List, Optional, Sequence

import torch

from grafccsr.config import load_config
from grafccsr.measure import PhaseMemory
from grafccsr.sizing.batch_finder import cached_estimate
from grafccsr.sizing.synthetic import default_num_classes, synthetic_run

CALIBRATION_GRIDS: Dict[str, Dict] = {
    # CPU: smoke-sized, seconds per config; "measured" = live tensor bytes of a real step
    "cpu": {
        "base": ["+exp=smoke"],
        "rows": [
            [], ["train.batch_size=4"], ["model.render.samples_per_ray=16"],
            ["train.amp.policy=generator"], ["model.ccsr.mode=regularizer"], ["memory.grad_checkpoint=true"],
        ],
    },
    # CUDA: GRAF sizes; measured = max_memory_allocated / reserved
    "cuda": {
        "base": ["model=graf"],
        "rows": [
            ["train.batch_size=2", "model.render.samples_per_ray=32"],
            ["train.batch_size=4", "model.render.samples_per_ray=32"],
            ["train.batch_size=4", "model.render.samples_per_ray=64"],
            ["train.batch_size=8", "model.render.samples_per_ray=64"],
            ["train.batch_size=4", "model.render.samples_per_ray=64", "train.amp.policy=generator"],
            ["train.batch_size=8", "model.render.samples_per_ray=64", "train.amp.policy=generator"],
            ["train.batch_size=8", "model.render.samples_per_ray=64", "memory.grad_checkpoint=true"],
            ["train.batch_size=8", "model.render.samples_per_ray=64", "memory.render_chunk=1024"],
            ["+exp=graf_ccsr_original"],
        ],
    },
}

CALIBRATION_COLUMNS = [
    "config", "est_live_mb", "est_alloc_mb", "est_reserved_mb", "measured_live_mb", "measured_alloc_mb",
    "measured_reserved_mb", "err_live_pct", "err_alloc_pct", "err_reserved_pct", "est_seconds", "measured_seconds",
]


def measure_real(cfg, num_classes: int, device: torch.device, iterations: int = 2,
                 phases: Sequence[str] = ("d_step", "g_step")) -> Dict[str, float]:
    """Peaks of real iterations over ``phases``: live tensor bytes (any device) and, on
    CUDA, max_memory_allocated / reserved with the counters reset per phase."""
    step, batch = synthetic_run(cfg, num_classes, device, seed=0)
    memory = PhaseMemory(device)
    state = step.modules_and_optimizers() + (batch.images, batch.labels)
    for it in range(iterations):
        for name, fn in (("d_step", step.d_step), ("g_step", step.g_step)):
            if name in phases:
                with memory.phase(name, track_live=True, state=state):
                    fn(batch, it, check_finite=False)
            else:
                fn(batch, it, check_finite=False)
    peaks = memory.summary()
    return {
        "live": peaks.get("mem/peak_live_tensors_mb", math.nan),
        "alloc": peaks.get("mem/peak_allocated_mb", math.nan),
        "reserved": peaks.get("mem/peak_reserved_mb", math.nan),
    }


def _pct(est: float, measured: float) -> float:
    if not (math.isfinite(est) and math.isfinite(measured)) or measured == 0:
        return math.nan
    return 100.0 * (est - measured) / measured


def calibrate(device: torch.device, extra: Sequence[str] = (), grid: Optional[str] = None,
              num_classes: Optional[int] = None, limit: Optional[int] = None, log=print) -> List[Dict]:
    """Estimate vs measured for the configs of a grid (``cpu`` or ``cuda``; the first
    ``limit`` only)."""
    spec = CALIBRATION_GRIDS[grid or device.type]
    rows = []
    for row in spec["rows"][:limit]:
        overrides = list(spec["base"]) + list(row) + list(extra)
        if any(o.startswith("+exp=") for o in row):  # a preset row replaces the base
            overrides = list(row) + list(extra)
        cfg = load_config(overrides + ["tracking=none"])
        classes = num_classes or default_num_classes(cfg)
        est = cached_estimate(cfg, classes, False)
        t1 = time.perf_counter()
        try:
            measured = measure_real(cfg, classes, device)
        except torch.OutOfMemoryError:
            measured = {"live": math.inf, "alloc": math.inf, "reserved": math.inf}
        finally:
            if device.type == "cuda":
                torch.cuda.empty_cache()
        t2 = time.perf_counter()
        out = {
            "config": " ".join(overrides),
            "est_live_mb": est.live_tensor_peak_mb,
            "est_alloc_mb": est.estimated_allocated_mb,
            "est_reserved_mb": est.estimated_reserved_mb,
            "measured_live_mb": measured["live"],
            "measured_alloc_mb": measured["alloc"],
            "measured_reserved_mb": measured["reserved"],
            "err_live_pct": _pct(est.live_tensor_peak_mb, measured["live"]),
            "err_alloc_pct": _pct(est.estimated_allocated_mb, measured["alloc"]),
            "err_reserved_pct": _pct(est.estimated_reserved_mb, measured["reserved"]),
            "est_seconds": est.seconds,
            "measured_seconds": t2 - t1,
        }
        rows.append(out)
        log(f"[calibrate] {out['config']}: est {out['est_live_mb']:.2f} / measured {out['measured_live_mb']:.2f} MiB live")
    return rows


def fitted_overhead(rows: List[Dict]) -> Dict[str, float]:
    """Constants of :class:`CudaOverhead` that fit the CUDA measurements (medians)."""
    ok = [r for r in rows if math.isfinite(r["measured_alloc_mb"]) and math.isfinite(r["measured_reserved_mb"])]
    if not ok:
        return {}
    workspace = statistics.median(r["measured_alloc_mb"] - r["est_live_mb"] for r in ok)
    frag = statistics.median(r["measured_reserved_mb"] / r["measured_alloc_mb"] - 1.0 for r in ok)
    return {"workspace_mb": workspace, "fragmentation": frag}


def format_calibration(rows: List[Dict], device: torch.device) -> str:
    def f(v: float) -> str:
        return "-" if not math.isfinite(v) else f"{v:.1f}"

    head = (f"{'est live':>10}{'meas live':>10}{'err %':>7}{'est alloc':>10}{'meas alloc':>11}{'err %':>7}"
            f"{'est resv':>10}{'meas resv':>10}{'err %':>7}  config")
    lines = [f"estimate vs measured on {device.type} (MiB; err = (est - measured) / measured)", head, "-" * len(head)]
    for r in rows:
        lines.append(
            f"{r['est_live_mb']:>10.2f}{r['measured_live_mb']:>10.2f}{f(r['err_live_pct']):>7}"
            f"{r['est_alloc_mb']:>10.1f}{f(r['measured_alloc_mb']):>11}{f(r['err_alloc_pct']):>7}"
            f"{r['est_reserved_mb']:>10.1f}{f(r['measured_reserved_mb']):>10}{f(r['err_reserved_pct']):>7}  {r['config']}"
        )
    errs = [abs(r["err_live_pct"]) for r in rows if math.isfinite(r["err_live_pct"])]
    if errs:
        lines.append(f"live-tensor agreement: max |err| {max(errs):.2f} %, median {statistics.median(errs):.2f} %")
    fit = fitted_overhead(rows)
    if fit:
        lines.append(f"fitted CudaOverhead(workspace_mb={fit['workspace_mb']:.1f}, "
                     f"fragmentation={fit['fragmentation']:.3f})  <- put these in grafccsr/sizing/estimate.py (CudaOverhead)")
    elif device.type != "cuda":
        lines.append("(CPU: only live tensor bytes are measurable; allocated/reserved need --device cuda)")
    return "\n".join(lines)
