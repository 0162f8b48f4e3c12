"""``python -m grafccsr.memory {estimate,calibrate,max-batch,rss}``: sizing a run before it starts.

estimate   [overrides]                          CUDA peak estimate without a GPU (fake tensors)
calibrate  [--device cpu|cuda] [overrides]      estimate vs measured over a small grid -> CSV + table
max-batch  --budget-mb N [--search-samples] [--device cpu|cuda] [overrides]
                                                largest batch (and samples/ray) under a budget
rss        [--iterations N] [--threads N] [overrides]
                                                CPU: s/iteration and peak process RSS above baseline
"""

from __future__ import annotations

import csv
import json
from dataclasses import asdict
import sys
from pathlib import Path
from typing import List, Optional

import torch

from grafccsr.cli.common import add_overrides, guarded, parser, run_subcommand
from grafccsr.config import ConfigError, load_config


# --------------------------------------------------------------------------- estimate


def cmd_estimate(args) -> int:
    from grafccsr.sizing.estimate import estimate_overrides

    est = estimate_overrides(args.overrides, args.num_classes, render_phases=not args.train_only,
                             world_size=args.world_size)
    print(est.table())
    if args.json:
        Path(args.json).write_text(json.dumps(est.to_dict(), indent=2))
        print(f"wrote {args.json}")
    return 0


# --------------------------------------------------------------------------- calibrate

def cmd_calibrate(args) -> int:
    from grafccsr.sizing.calibrate import CALIBRATION_COLUMNS, calibrate, format_calibration

    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError("--device cuda: CUDA is not available on this machine; use --device cpu")
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
    from grafccsr.sizing.batch_finder import find_max_batch

    budget, overrides = args.budget_mb, list(args.overrides)
    device = args.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError("--device cuda: CUDA is not available on this machine; the CPU path uses the estimator only")
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
    from grafccsr.sizing.rss import measure_process
    from grafccsr.sizing.synthetic import default_num_classes

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
        Path(args.json).write_text(json.dumps({"config": shown, **asdict(result), "median_s": result.median_s}, indent=2))
        print(f"wrote {args.json}")
    return 0


# --------------------------------------------------------------------------- parser


def build_parser():
    from grafccsr.sizing.calibrate import CALIBRATION_GRIDS

    p = parser("python -m grafccsr.memory", __doc__)
    sub = p.add_subparsers(dest="command", required=True)

    e = sub.add_parser("estimate", help="estimated CUDA peak of a training iteration (no GPU needed)")
    add_overrides(e)
    e.add_argument("--num-classes", type=int, default=None, help="classes (default: data.synthetic.num_classes)")
    e.add_argument("--train-only", action="store_true", help="skip the sample/eval render phases")
    e.add_argument("--world-size", type=int, default=1,
                   help="ranks of a torchrun job: estimate one rank (batch / N images, all-reduce buffers)")
    e.add_argument("--json", default=None, help="also write the estimate as JSON here")
    e.set_defaults(func=cmd_estimate)

    c = sub.add_parser("calibrate", help="estimate vs measured peaks over a small grid (CSV + table)")
    add_overrides(c, "Hydra overrides added to every config")
    c.add_argument("--device", default="cpu", help="cpu (measured = live tensor bytes) or cuda")
    c.add_argument("--grid", default=None, choices=sorted(CALIBRATION_GRIDS), help="default: the device's grid")
    c.add_argument("--num-classes", type=int, default=None)
    c.add_argument("--limit", type=int, default=None, help="only the first N configs of the grid")
    c.add_argument("--out", default="runs/memory/calibration.csv", help="CSV path")
    c.set_defaults(func=cmd_calibrate)

    m = sub.add_parser("max-batch", help="largest batch (and samples/ray) under a memory budget")
    add_overrides(m)
    m.add_argument("--budget-mb", type=float, required=True, help="memory budget in MiB")
    m.add_argument("--search-samples", action="store_true", help="also search fewer samples per ray")
    m.add_argument("--samples", default=None, help="comma-separated samples/ray candidates (implies the search)")
    m.add_argument("--measure", default="reserved", choices=["live", "allocated", "reserved"])
    m.add_argument("--phases", default="train", choices=["train", "all"],
                   help="train: D/G steps (default); all: + sample/eval render batches")
    m.add_argument("--device", default="cpu", help="cpu: estimator only; cuda: confirm by real steps")
    m.add_argument("--num-classes", type=int, default=None)
    m.add_argument("--cap", type=int, default=1024, help="largest batch considered")
    m.set_defaults(func=cmd_max_batch)

    r = sub.add_parser("rss", help="CPU: seconds per iteration and peak process RSS above baseline (Linux)")
    add_overrides(r)
    r.add_argument("--iterations", type=int, default=2, help="D+G iterations, every one timed (default 2)")
    r.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = torch's default)")
    r.add_argument("--num-classes", type=int, default=None)
    r.add_argument("--json", default=None, help="also write the result as JSON here")
    r.set_defaults(func=cmd_rss)
    return p


@guarded("grafccsr.memory")
def main(argv: Optional[List[str]] = None) -> int:
    return run_subcommand(build_parser(), sys.argv[1:] if argv is None else list(argv))


if __name__ == "__main__":
    sys.exit(main())
