"""``python -m grafccsr.memory {estimate,calibrate,max-batch,rss}``.

estimate   [overrides]                         CUDA peak estimate without a GPU (fake tensors)
calibrate  [--device cpu|cuda] [overrides]     estimate vs measured over a small grid -> CSV + table
max-batch  [overrides] budget_mb=N [--search-samples] [--device cpu|cuda]
                                               largest batch (and samples/ray) under a budget
rss        [overrides] [--iterations N] [--threads N]
                                               CPU: s/iteration and peak process RSS above baseline
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import statistics
import sys
import time
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import torch


# --------------------------------------------------------------------------- estimate


def cmd_estimate(args) -> int:
    from grafccsr.memory.estimate import estimate_overrides

    est = estimate_overrides(args.overrides, args.num_classes, render_phases=not args.train_only)
    print(est.table())
    if args.json:
        Path(args.json).write_text(json.dumps(est.to_dict(), indent=2))
        print(f"wrote {args.json}")
    return 0


# --------------------------------------------------------------------------- calibrate

CALIBRATION_GRIDS: Dict[str, Dict] = {
    # CPU: smoke-sized, seconds per config; "measured" = live tensor bytes of a real step
    "cpu": {
        "base": ["+exp=smoke"],
        "rows": [
            [], ["train.batch_size=4"], ["model.render.samples_per_ray=16"],
            ["train.amp.policy=generator"], ["model.ccsr.mode=regularizer"], ["memory.grad_checkpoint=true"],
        ],
    },
    # CUDA: GRAF sizes (UNTESTED here: no GPU); measured = max_memory_allocated / reserved
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
    from grafccsr.memory.estimate import synthetic_step
    from grafccsr.memory.tracker import PhaseMemory

    step, batch = synthetic_step(cfg, num_classes, device, seed=0)
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
    from grafccsr.config import load_config
    from grafccsr.memory.batch_finder import cached_estimate
    from grafccsr.memory.estimate import default_num_classes

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
                     f"fragmentation={fit['fragmentation']:.3f})  <- put these in grafccsr/memory/estimate.py")
    elif device.type != "cuda":
        lines.append("(CPU: only live tensor bytes are measurable; allocated/reserved need --device cuda)")
    return "\n".join(lines)


def cmd_calibrate(args) -> int:
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: CUDA is not available on this machine; use --device cpu")
    rows = calibrate(device, args.overrides, args.grid, args.num_classes, args.limit)
    print(format_calibration(rows, device))
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with out.open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=CALIBRATION_COLUMNS)
        writer.writeheader()
        writer.writerows(rows)
    print(f"wrote {out}")
    return 0


# --------------------------------------------------------------------------- max-batch


def cmd_max_batch(args) -> int:
    from grafccsr.memory.batch_finder import find_max_batch

    budget = args.budget_mb
    overrides = []
    for o in args.overrides:
        if o.startswith("budget_mb="):
            budget = float(o.split("=", 1)[1])
        else:
            overrides.append(o)
    if budget is None:
        raise SystemExit("max-batch needs a budget: budget_mb=N (MiB) or --budget-mb N")
    device = args.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit("--device cuda: CUDA is not available on this machine; the CPU path uses the estimator only")
    samples = [int(s) for s in args.samples.split(",")] if args.samples else None
    report = find_max_batch(overrides, budget, measure=args.measure, phases=args.phases,
                            search_samples=args.search_samples, samples=samples, device=device,
                            num_classes=args.num_classes, cap=args.cap, log=print)
    print()
    print(f"budget {budget:.0f} MiB ({args.measure}, phases={args.phases}); "
          f"batch multiple of train.grad_accum_steps={report.grad_accum_steps}; "
          f"{'confirmed on ' + device if device.startswith('cuda') else 'estimator only (no GPU confirmation)'}")
    print(f"{'samples/ray':>12}{'max batch':>11}{'MiB':>11}  source")
    for c in report.choices:
        mark = "  <- chosen" if c is report.chosen else ""
        mem = "-" if c.memory_mb is None else f"{c.memory_mb:.1f}"
        print(f"{c.samples_per_ray:>12}{str(c.batch_size):>11}{mem:>11}  {c.source}{mark}")
    for note in report.notes:
        print(f"note: {note}")
    if report.chosen is None:
        print("nothing fits the budget, even batch "
              f"{report.grad_accum_steps} at the smallest samples per ray")
        return 1
    print(f"chosen: train.batch_size={report.chosen.batch_size} model.render.samples_per_ray={report.chosen.samples_per_ray}")
    print(f"override line: {report.override_line(overrides)}")
    return 0


# --------------------------------------------------------------------------- rss


def cmd_rss(args) -> int:
    from grafccsr.config import load_config
    from grafccsr.memory.estimate import default_num_classes
    from grafccsr.memory.process import measure_process

    if args.threads > 0:
        torch.set_num_threads(args.threads)
    cfg = load_config(list(args.overrides) + ["tracking=none", "train.device=cpu"])
    result = measure_process(cfg, args.num_classes or default_num_classes(cfg), args.iterations)
    shown = " ".join(args.overrides) or "(default config)"
    print(f"config: {shown}")
    print(f"cpu threads {result.threads}")
    print(f"seconds per D+G iteration: median {result.median_s:.2f} "
          f"({', '.join(f'{s:.2f}' for s in result.iteration_s)})")
    print(f"peak RSS above baseline: {result.peak_rss_above_baseline_mb:.0f} MiB "
          f"(baseline {result.baseline_rss_mb:.0f} MiB after building models, optimisers and batch)")
    if args.json:
        from dataclasses import asdict

        Path(args.json).write_text(json.dumps({"config": shown, **asdict(result), "median_s": result.median_s}, indent=2))
        print(f"wrote {args.json}")
    return 0


# --------------------------------------------------------------------------- parser


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m grafccsr.memory", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)

    e = sub.add_parser("estimate", help="estimated CUDA peak of a training iteration (no GPU needed)")
    e.add_argument("overrides", nargs="*", help="Hydra overrides, e.g. +exp=amp_bs8")
    e.add_argument("--num-classes", type=int, default=None, help="classes (default: data.synthetic.num_classes)")
    e.add_argument("--train-only", action="store_true", help="skip the sample/eval render phases")
    e.add_argument("--json", default=None, help="also write the estimate as JSON here")
    e.set_defaults(func=cmd_estimate)

    c = sub.add_parser("calibrate", help="estimate vs measured peaks over a small grid (CSV + table)")
    c.add_argument("overrides", nargs="*", help="Hydra overrides added to every config")
    c.add_argument("--device", default="cpu", help="cpu (measured = live tensor bytes) or cuda (UNTESTED here)")
    c.add_argument("--grid", default=None, choices=sorted(CALIBRATION_GRIDS), help="default: the device's grid")
    c.add_argument("--num-classes", type=int, default=None)
    c.add_argument("--limit", type=int, default=None, help="only the first N configs of the grid")
    c.add_argument("--out", default="runs/memory/calibration.csv", help="CSV path")
    c.set_defaults(func=cmd_calibrate)

    m = sub.add_parser("max-batch", help="largest batch (and samples/ray) under a memory budget")
    m.add_argument("overrides", nargs="*", help="Hydra overrides and budget_mb=N")
    m.add_argument("--budget-mb", type=float, default=None, help="budget in MiB (or budget_mb=N)")
    m.add_argument("--search-samples", action="store_true", help="also search fewer samples per ray")
    m.add_argument("--samples", default=None, help="comma-separated samples/ray candidates (implies the search)")
    m.add_argument("--measure", default="reserved", choices=["live", "allocated", "reserved"])
    m.add_argument("--phases", default="train", choices=["train", "all"],
                   help="train: D/G steps (default); all: + sample/eval render batches")
    m.add_argument("--device", default="cpu", help="cpu: estimator only; cuda: confirm by real steps (UNTESTED here)")
    m.add_argument("--num-classes", type=int, default=None)
    m.add_argument("--cap", type=int, default=1024, help="largest batch considered")
    m.set_defaults(func=cmd_max_batch)

    r = sub.add_parser("rss", help="CPU: seconds per iteration and peak process RSS above baseline (Linux)")
    r.add_argument("overrides", nargs="*", help="Hydra overrides, e.g. +exp=graf_ccsr_original")
    r.add_argument("--iterations", type=int, default=2, help="D+G iterations, every one timed (default 2)")
    r.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = torch's default)")
    r.add_argument("--num-classes", type=int, default=None)
    r.add_argument("--json", default=None, help="also write the result as JSON here")
    r.set_defaults(func=cmd_rss)
    return p


def main(argv: Optional[List[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
