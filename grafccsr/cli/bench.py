"""``python -m grafccsr.bench [--device cpu|cuda] [--grid NAME] [flags] [key=value ...]``: see :mod:`grafccsr.bench`."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import List, Optional

from grafccsr.bench.grids import GRIDS, Grid, load_grid
from grafccsr.bench.report import environment, format_table, log_mlflow, write_results
from grafccsr.bench.runner import run_grid
from grafccsr.cli.common import add_overrides, guarded, parse, parser
from grafccsr.config import ConfigError


def build_parser() -> argparse.ArgumentParser:
    p = parser("python -m grafccsr.bench",
               "Time the D step, G step and iteration and measure peak memory per phase for a grid of configs, "
               "with ratios against the original graf_ccsr preset measured in the same process.")
    p.add_argument("--device", default="cpu", help="cpu | cuda | cuda:N | auto (default: cpu)")
    p.add_argument("--grid", default=None,
                   help=f"built-in grid ({', '.join(GRIDS)}) or a YAML file; default: 'gpu' on cuda, 'default' on cpu")
    p.add_argument("--repeats", type=int, default=None, help="timed iterations per row (default: cpu 4, cuda 10)")
    p.add_argument("--warmup", type=int, default=None, help="warm-up iterations per row (default: cpu 1, cuda 3)")
    p.add_argument("--row-budget-s", type=float, default=40.0,
                   help="cap the repeats so that one row's timed part stays under this (default 40 s)")
    p.add_argument("--threads", type=int, default=None,
                   help="torch CPU threads (default on cpu: 1, with --clock process the timing least disturbed by "
                        "other processes on a shared CPU; 0 = torch's own choice, as in training)")
    p.add_argument("--clock", default=None, choices=["wall", "process"],
                   help="wall, or process: CPU time of this process (cpu only; with 1 thread, time that other "
                        "processes take from a shared CPU is not counted). Default: process on cpu, wall on cuda")
    p.add_argument("--interleave", action=argparse.BooleanOptionalAction, default=None,
                   help="time the rows round-robin (default: on for cpu; not allowed on cuda, where each row's "
                        "peak counters need the device to itself)")
    p.add_argument("--rows", default=None, help="comma-separated row names to run (the reference always runs)")
    p.add_argument("--out", default=None, help="output folder for bench.csv / bench.json (default runs/bench/<grid>-<device>)")
    p.add_argument("--estimate", action=argparse.BooleanOptionalAction, default=None,
                   help="add the fake-tensor estimate per row (default: on for cuda, off for cpu)")
    p.add_argument("--num-classes", type=int, default=None, help="classes (default: the synthetic set's)")
    p.add_argument("--mlflow", action="store_true", help="log a parent run + one child run per row to MLflow")
    p.add_argument("--mlflow-uri", default=None, help="MLflow tracking URI (default: the project's sqlite store)")
    p.add_argument("--experiment", default="grafccsr-bench", help="MLflow experiment (default grafccsr-bench)")
    p.add_argument("--list", action="store_true", help="list the grid's rows and exit")
    add_overrides(p, "Hydra overrides applied to EVERY row (reference included)")
    return p


@guarded("grafccsr.bench")
def main(argv: Optional[List[str]] = None) -> int:
    args = parse(build_parser(), sys.argv[1:] if argv is None else argv)
    if args.list:
        grid = load_grid(args.grid or ("gpu" if args.device.startswith("cuda") else "default"))
        print(f"grid {grid.name}: {grid.reduced}")
        for row in grid.rows:
            print(f"{row.name:<22}{row.label}\n{'':<22}{' '.join(([] if row.replace_base else grid.base) + row.overrides)}")
        return 0
    import torch

    from grafccsr.training.build import resolve_device

    device = resolve_device(args.device, key="--device")
    is_cuda = device.type == "cuda"
    grid = load_grid(args.grid or ("gpu" if is_cuda else "default"))
    threads = args.threads if args.threads is not None else (0 if is_cuda else 1)
    previous_threads = torch.get_num_threads()
    if threads > 0:
        torch.set_num_threads(threads)
    try:
        return _run(args, grid, device, is_cuda, clock=args.clock or ("wall" if is_cuda else "process"))
    finally:
        torch.set_num_threads(previous_threads)


def _run(args, grid: Grid, device, is_cuda: bool, clock: str) -> int:
    if clock == "process" and is_cuda:
        raise ConfigError("--clock process is CPU-only (GPU work is not process CPU time)")
    repeats = args.repeats or (10 if is_cuda else 4)
    warmup = args.warmup if args.warmup is not None else (3 if is_cuda else 1)
    estimate = args.estimate if args.estimate is not None else is_cuda
    interleave = args.interleave if args.interleave is not None else not is_cuda
    if interleave and is_cuda:
        raise ConfigError("--interleave is CPU-only: CUDA peak counters need one row at a time")
    rows = set(args.rows.split(",")) if args.rows else None
    from grafccsr.paths import PROJECT_ROOT

    out = Path(args.out) if args.out else PROJECT_ROOT / "runs" / "bench" / f"{grid.name}-{device.type}"
    env = environment(device)
    env.update(repeats=repeats, warmup=warmup, interleave=interleave, clock=clock)
    results = run_grid(grid, device, repeats=repeats, warmup=warmup, row_budget_s=args.row_budget_s,
                       extra=args.overrides, rows=rows, estimate=estimate, num_classes=args.num_classes,
                       interleave=interleave, clock=clock)
    env["loadavg_1m_end"] = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    print()
    print(format_table(grid, results, env, estimate=estimate))
    paths = write_results(out, grid, results, env)
    print(f"\nwrote {paths['csv']} and {paths['json']}")
    if args.mlflow:
        run_id = log_mlflow(grid, results, env, paths, args.mlflow_uri, args.experiment)
        print(f"MLflow run {run_id} (experiment {args.experiment})")
    return 0 if all(r.status == "ok" for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
