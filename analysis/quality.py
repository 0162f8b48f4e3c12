"""Time-to-quality benchmark: ``python -m analysis.quality`` (``make quality``).

Trains each recipe for the same wall-clock budget on the same device, saves snapshots at
fixed fractions of that budget, then evaluates every snapshot with the same extractor and
sample count, for several seeds. Every run holds out the same views (``data.holdout``), and
every snapshot is also scored against them, pose by pose (held-out PSNR, SSIM and silhouette
IoU, :mod:`grafccsr.metrics.views`). Writes ``reports/quality/``: ``quality.json`` (every
number), ``table.md`` (final FID/KID and held-out PSNR/SSIM/IoU mean +- std per recipe, the
targets), ``curves.png`` (FID and KID against training seconds, mean and min-max band over
seeds) and ``samples.png`` (each recipe's final generator at the poses of held-out views,
with the same latent codes, below those real views), and logs them as one MLflow run.

Training runs one at a time with all cores; evaluation starts only when every training
has finished, so the two never compete for the CPU. Training time is the trainer's own
clock (``train.time_budget_s``: from the first iteration, snapshot saving excluded).
"""

from __future__ import annotations

import argparse
import json
import math
import multiprocessing
import os
import statistics
import subprocess
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Sequence

from grafccsr.metrics.keys import (METRIC_NAMES, RANDOM_FEATURES, VIEW_COLUMNS, VIEW_METRICS,  # noqa: E402
                                   metric_key)
from grafccsr.paths import PROJECT_ROOT, program_name  # noqa: E402

SCALED = ("model=small", "model.field.z_shape_dim=64", "model.field.z_appearance_dim=0", "model.ccsr.lr_size=4",
          "model.ccsr.code_resolution=16", "model.discriminator.max_channels=64")
"""graf_ccsr's presets at model=small, every size in graf_ccsr's proportion to the data (see ``faithful``)."""
FINE = ("model.render.samples_per_ray=24", "model.render.importance_samples=24")
"""The fine network's passes at model=small: 24 stratified + 24 importance samples (upstream: 64 + 64)."""

RECIPES: Dict[str, tuple] = {
    "default": ((), "the default job: model=small, 16^2 multi-scale patches of 64 px images, 24 samples/ray, "
                    "R1 gamma 10 (GRAF units), EMA 0.99, spectral-norm InstanceNorm D, CCSR (x2) as a regulariser"),
    "faithful": (("+exp=graf_ccsr_original", *SCALED),
                 "graf_ccsr's maths and choices on model=small, every size in graf_ccsr's proportion to the data: "
                 "whole-image 16^2 point-sampled thumbnails of the 64 px images (graf_ccsr: 64^2 of 256^2), "
                 "rays through pixel corners, R1 gamma 80, its field (z x LayerNorm(class embedding) into the "
                 "trunk, the raw z at the skip, no appearance code), its D at 16^2 (the 32^2 branch without its "
                 "first level: BatchNorm, no spectral norm, no biases, label head) at the default D's widths "
                 "(32, 64), its CCSR regulariser in the G step only (16^2 patch -> 4^2 -> 16^2 codes -> 64^2 SR, "
                 "i.e. patch / 4, patch, 4 x patch as at graf_ccsr's 64^2), no EMA, lr 6e-4/1e-4, the original's "
                 "memory behaviour"),
    "no_ccsr": (("model.ccsr.mode=off",), "the default job without CCSR (GRAF alone)"),
    "ccsr_d": (("model.ccsr.mode=discriminator",),
               "CCSR as the path to extra resolution: 16^2 renders super-resolved x2, D sees 32^2 patches (reals "
               "at 32^2); evaluation renders 32^2 images and super-resolves them to 64^2"),
    "fine_upstream": (("+exp=graf_ccsr_fine", *SCALED, *FINE),
                      "graf_ccsr's newest upstream (e905243) scaled like faithful: a separate fine network, 24 + 24 "
                      "samples; its coarse network never trains"),
    "fine_ours": (("+exp=graf_ccsr_fine", *SCALED, *FINE, "model.render.coarse_loss=match_fine"),
                  "fine_upstream with the coarse network trained towards the fine render (coarse_loss=match_fine)"),
    "old_r1": (("train.r1_gamma=1280",),
               "the default job with the pre-fix R1 weight (gamma/2 x per-image sum = 1280 in GRAF units at 16^2)"),
    "default_antialias": (("model.patch.antialias=true",),
                          "the default job with box-filtered (antialiased) real patches"),
    "fast": (("+exp=fast",), "+exp=fast: the default job with the generator's own occupancy grid (64^3 cells per "
                             "class over the cube every camera ray reaches), one sample per 0.125 of a ray's "
                             "occupied depth, at most 8, memory.skip_empty_samples; no hand-set bound"),
    "ball": (("model.render.bound_radius=0.4", "model.render.samples_per_ray=8"),
             "the previous +exp=fast: rays clipped to a hand-set ball of radius 0.4, 8 samples there"),
    "default_skip": (("memory.skip_empty_samples=true",),
                     "the default job with memory.skip_empty_samples (the same images and gradients; only the "
                     "samples of positive density evaluated with autograd)"),
    "ball_skip": (("model.render.bound_radius=0.4", "model.render.samples_per_ray=8", "memory.skip_empty_samples=true"),
                  "the ball with memory.skip_empty_samples, as +exp=fast has it"),
    "default_offset": (("data.synthetic.scene=offset",),
                       "the default job on the off-centre scene set (a tall column beside a low block)"),
    "fast_offset": (("+exp=fast", "data.synthetic.scene=offset"), "+exp=fast (the grid) on the off-centre scene set"),
    "ball_offset": (("data.synthetic.scene=offset", "model.render.bound_radius=0.42", "model.render.samples_per_ray=8"),
                    "the ball on the off-centre scene set: radius 0.42, the smallest holding every object"),
    "ball_offset_skip": (("data.synthetic.scene=offset", "model.render.bound_radius=0.42",
                          "model.render.samples_per_ray=8", "memory.skip_empty_samples=true"),
                         "ball_offset with memory.skip_empty_samples, as +exp=fast has it"),
}
DEFAULT_RECIPES = ("default", "faithful", "old_r1")
FRACTIONS = (0.1, 0.2, 0.4, 0.7, 1.0)
TRAIN_SHARE = 0.6
"""Share of ``--budget-min`` given to training (the rest is evaluation and start-up)."""
RUN_OVERRIDES = ("tracking=none", "train.max_iters=100000000", "train.sample_every=0", "train.ckpt_every=0",
                 "train.eval_every=0", "eval.at_end=false", "train.progress=false", "train.log_every=50",
                 "memory.track_peak_every=0", "train.device=cpu")
"""Every training run: no evaluation, samples or live-tensor tracking inside the timed budget."""
HOLDOUT = ("data.holdout.every_k_azimuth=8", "data.holdout.azimuth_offset=0")
"""Every run holds out the same views, every 8th azimuth (72 of the embedded set's 576 views), for
the held-out columns; given before a recipe's own overrides, so that a recipe may change them."""
VIEW_CODES = 4
"""Latent codes rendered at each held-out view."""


@dataclass
class Run:
    recipe: str
    seed: int
    folder: Path
    train_seconds: float = math.nan
    iterations: int = 0
    exit_code: Optional[int] = None
    points: List[Dict] = field(default_factory=list)
    """One per snapshot: fraction, train_seconds, iteration, fid_rf, kid_rf_mean, kid_rf_std, and
    the held-out view_psnr, view_ssim, view_iou (and their _best)."""


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog=program_name("python -m analysis.quality"), description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="recipes:\n" + "\n".join(f"  {k:<18} {d}" for k, (_, d) in RECIPES.items()))
    p.add_argument("--budget-min", type=float, default=40.0, help="whole benchmark, in minutes (default 40)")
    p.add_argument("--train-seconds", type=float, default=None,
                   help="training budget per run (default: %.0f %%%% of the budget split over the runs)" % (100 * TRAIN_SHARE))
    p.add_argument("--recipes", default=",".join(DEFAULT_RECIPES), help="comma list of recipes (see below)")
    p.add_argument("--define", action="append", default=[], metavar="NAME=OVERRIDES",
                   help="an extra recipe: a name and space-separated Hydra overrides, e.g. "
                        "--define 'r1_100=train.r1_gamma=100' (then list it in --recipes)")
    p.add_argument("--seeds", type=int, default=2, help="seeds per recipe (default 2)")
    p.add_argument("--fractions", default=",".join(map(str, FRACTIONS)), help="snapshot fractions of the budget")
    p.add_argument("--eval-samples", type=int, default=128,
                   help="fakes per FID/KID (default 128 on a CPU; >= 1000 where the device allows)")
    p.add_argument("--workers", type=int, default=2, help="evaluation processes (default 2)")
    p.add_argument("--threads", type=int, default=0, help="torch threads per training run (0: all cores)")
    p.add_argument("--out", type=Path, default=PROJECT_ROOT / "reports" / "quality")
    p.add_argument("--tracking-uri", default=None, help="MLflow URI (default the project's store); 'none' to skip")
    p.add_argument("--experiment", default="quality")
    p.add_argument("--evaluate-only", action="store_true", help="evaluate the snapshots already in --out")
    return p.parse_args(argv)


# ----------------------------------------------------------------------------- training


def train_command(run: Run, extra: Sequence[str], seconds: float, fractions: Sequence[float]) -> List[str]:
    fractions_text = "[" + ",".join(str(f) for f in fractions) + "]"
    return [sys.executable, "-m", "grafccsr.train", *HOLDOUT, *extra, *RUN_OVERRIDES, f"train.seed={run.seed}",
            f"train.time_budget_s={seconds}", "train.snapshots=1", f"train.snapshot_fractions={fractions_text}",
            f"hydra.run.dir={run.folder}"]


def train_all(runs: Sequence[Run], seconds: float, fractions: Sequence[float], threads: int) -> None:
    env = dict(os.environ)
    if threads > 0:
        env.update(OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    for k, run in enumerate(runs, 1):
        cmd = train_command(run, RECIPES[run.recipe][0], seconds, fractions)
        print(f"[quality] train {k}/{len(runs)}: {run.recipe} seed {run.seed} for {seconds:.0f} s", flush=True)
        with open(run.folder.parent / f"{run.folder.name}.log", "w") as log:
            run.exit_code = subprocess.run(cmd, cwd=PROJECT_ROOT, env=env, stdout=log, stderr=subprocess.STDOUT).returncode
        summary = run.folder / "metrics.json"
        if summary.is_file():
            data = json.loads(summary.read_text())
            run.train_seconds, run.iterations = data.get("train_seconds", math.nan), data.get("iteration", 0)
        print(f"[quality]   exit {run.exit_code}, {run.iterations} iterations in {run.train_seconds:.0f} s", flush=True)


# ----------------------------------------------------------------------------- evaluation


def _evaluate(task: tuple) -> Dict:
    """One snapshot's FID/KID and held-out scores (runs in a worker process, one thread)."""
    import torch

    torch.set_num_threads(1)
    from grafccsr.evaluation import load_eval_model
    from grafccsr.evaluation.run import compute_metrics
    from grafccsr.training.checkpoint import load_checkpoint

    path, overrides = task
    state = load_checkpoint(path)
    metrics = compute_metrics(load_eval_model(Path(path), overrides, state), seed=0)
    return {"train_seconds": state.get("train_seconds"), "iteration": state["iteration"],
            **{k: metrics[k] for k in (metric_key(n, RANDOM_FEATURES) for n in METRIC_NAMES)},
            **{k: metrics.get(k, math.nan) for k in VIEW_COLUMNS}}


def eval_overrides(samples: int) -> List[str]:
    return [f"eval.num_samples={samples}", "eval.kid_subsets=50",
            "eval.extractor=random-features", "eval.batch_size=32", f"eval.view_codes={VIEW_CODES}",
            "tracking.backend=none", "train.device=cpu"]


def evaluate_all(runs: Sequence[Run], fractions: Sequence[float], samples: int, workers: int) -> None:
    tasks, owners = [], []
    for run in runs:
        for k, fraction in enumerate(fractions):
            path = run.folder / "snapshots" / f"{k}.pt"
            if path.is_file():
                tasks.append((str(path), eval_overrides(samples)))
                owners.append((run, fraction))
    if not tasks:
        return
    print(f"[quality] evaluating {len(tasks)} snapshots, {samples} fakes each, {workers} processes", flush=True)
    first = _evaluate(tasks[0])  # fills the real-statistics cache before the workers share it
    results = [first]
    with ProcessPoolExecutor(max_workers=workers, mp_context=multiprocessing.get_context("spawn")) as pool:
        results += list(pool.map(_evaluate, tasks[1:]))
    for (run, fraction), result in zip(owners, results):
        run.points.append({"fraction": fraction, **result})


# ----------------------------------------------------------------------------- summaries


def _mean_std(values: Sequence[float]) -> tuple:
    values = [v for v in values if v is not None and math.isfinite(v)]
    if not values:
        return math.nan, math.nan
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def curve(runs: Sequence[Run], recipe: str, key: str) -> List[Dict]:
    """Per snapshot fraction: mean, min, max of ``key`` and the mean training seconds over seeds."""
    out = []
    fractions = sorted({p["fraction"] for r in runs if r.recipe == recipe for p in r.points})
    for f in fractions:
        pts = [p for r in runs if r.recipe == recipe for p in r.points if p["fraction"] == f]
        values = [p[key] for p in pts]
        out.append({"fraction": f, "seconds": statistics.fmean(p["train_seconds"] for p in pts),
                    "mean": statistics.fmean(values), "min": min(values), "max": max(values), "n": len(values)})
    return out


def summarise(runs: Sequence[Run], recipes: Sequence[str], budget_s: float) -> Dict:
    table = {}
    for recipe in recipes:
        finals = [max(r.points, key=lambda p: p["fraction"]) for r in runs if r.recipe == recipe and r.points]
        fid, fid_sd = _mean_std([p["fid_rf"] for p in finals])
        kid, kid_sd = _mean_std([p["kid_rf_mean"] for p in finals])
        its = [r.iterations for r in runs if r.recipe == recipe]
        views = {}
        for key in VIEW_COLUMNS:  # held-out scores: NaN for a snapshot of a run without a holdout
            views[key], views[f"{key}_std"] = _mean_std([p.get(key, math.nan) for p in finals])
        table[recipe] = {"fid_rf": fid, "fid_rf_std": fid_sd, "kid_rf": kid, "kid_rf_std": kid_sd, **views,
                         "seeds": len(finals), "iterations": its, "curve_fid": curve(runs, recipe, "fid_rf"),
                         "curve_kid": curve(runs, recipe, "kid_rf_mean"), "description": RECIPES[recipe][1]}
    targets = {}
    if "default" in table and "faithful" in table:
        ref = table["faithful"]["fid_rf"]
        targets["final_fid_ratio"] = table["default"]["fid_rf"] / ref if ref else math.nan
        reached = [c for c in table["default"]["curve_fid"] if c["mean"] <= ref]
        targets["time_to_faithful_final_fraction"] = reached[0]["fraction"] if reached else None
        targets["time_to_faithful_final_s"] = reached[0]["seconds"] if reached else None
        targets["final_fid_ratio_target"], targets["time_fraction_target"] = 0.5, 0.2
    return {"recipes": table, "targets": targets, "budget_s": budget_s}


def table_markdown(summary: Dict, settings: Dict) -> str:
    lines = [f"Time-to-quality benchmark: {settings['train_seconds']:.0f} s of training per run on {settings['device']}, "
             f"{settings['seeds']} seeds, FID/KID with the random-feature extractor on {settings['eval_samples']} "
             f"fakes per snapshot (`{settings['command']}`).", "",
             "| recipe | final FID_rf (mean ± std) | final KID_rf (mean ± std) | held-out PSNR dB | held-out SSIM "
             "| held-out IoU | iterations per seed | what |",
             "|---|---|---|---|---|---|---|---|"]
    for name, row in summary["recipes"].items():
        held = " | ".join(f"{row[k]:{f}} ± {row[k + '_std']:.2g}" for k, f in zip(VIEW_METRICS, (".2f", ".3f", ".3f")))
        lines.append(f"| {name} | {row['fid_rf']:.4g} ± {row['fid_rf_std']:.2g} | {row['kid_rf']:.3g} ± "
                     f"{row['kid_rf_std']:.2g} | {held} | {', '.join(map(str, row['iterations']))} | "
                     f"{row['description']} |")
    lines += ["", f"Held-out: the final generator rendered at the pose of each view that no run trained on "
              f"(`{' '.join(HOLDOUT)}`), mean over {VIEW_CODES} latent codes, against that view; IoU of the "
              "rendered opacity > 0.5 with the real view's non-background pixels; higher is better."]
    t = summary["targets"]
    if t:
        frac = t["time_to_faithful_final_fraction"]
        lines += ["", f"- default / faithful final FID_rf: {t['final_fid_ratio']:.3f} (target <= 0.5)",
                  "- time the default recipe needs to reach the faithful recipe's final FID_rf: " +
                  (f"{frac:g} of the budget ({t['time_to_faithful_final_s']:.0f} s; target <= 0.2, a >= 5x speed-up)"
                   if frac is not None else "not reached within the budget")]
    return "\n".join(lines) + "\n"


# ----------------------------------------------------------------------------- figures


def plot_curves(summary: Dict, path: Path) -> Path:
    from .plots import _plt

    plt = _plt()
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for ax, key, label in ((axes[0], "curve_fid", "FID (random features)"), (axes[1], "curve_kid", "KID (random features)")):
        for name, row in summary["recipes"].items():
            pts = row[key]  # one point per snapshot fraction the benchmark was asked for: two make a curve
            if not pts:
                continue
            x = [p["seconds"] for p in pts]
            ax.plot(x, [p["mean"] for p in pts], marker="o", label=f"{name} ({row['seeds']} seeds)")
            ax.fill_between(x, [p["min"] for p in pts], [p["max"] for p in pts], alpha=0.2)
        ax.set_xlabel("training seconds (same CPU, same budget)")
        ax.set_ylabel(f"{label}, lower is better")
        ax.set_yscale("log")
        ax.grid(True, alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend()
    fig.suptitle("Quality against training time: mean over seeds, band = min..max")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def shown_azimuths(data, views: int) -> List[int]:
    """The azimuths (degrees) of the samples figure: at the first elevation, the held-out ones
    (``data.holdout``; at most ``views``, evenly spaced), else ``views`` evenly spaced ones."""
    at_first = data.labels[:, 1] == 0
    held = sorted(set(data.labels[at_first & data.held_out, 2].tolist()))
    if not held:
        return [round(360 * i / views) for i in range(views)]
    if len(held) <= views:
        return held
    return [held[round(i * (len(held) - 1) / (views - 1))] for i in range(views)]


def sample_grid(runs: Sequence[Run], recipes: Sequence[str], path: Path, views: int = 8) -> Optional[Path]:
    """Rows: the real held-out views (no run trained on them), then every recipe's final generator
    (seed 0), per class; same poses (first elevation, the held-out azimuths) and the same latent
    code per class."""
    import torch

    from grafccsr.data import build_dataset
    from grafccsr.evaluation import load_eval_model
    from grafccsr.imaging import image_grid, labelled_grid, save_png, to_uint8, upscale_nearest
    from grafccsr.models import RenderSettings, render_views

    rows, labels = [], []
    azimuths: List[int] = []
    for recipe in recipes:
        run = next((r for r in runs if r.recipe == recipe and r.seed == 0 and r.points), None)
        if run is None:
            continue
        last = max(k for k, _ in enumerate(run.points))
        model = load_eval_model(run.folder / "snapshots" / f"{last}.pt", ["tracking.backend=none", "train.device=cpu"])
        cfg, k = model.cfg, model.num_classes
        if not rows:
            data = build_dataset(cfg.data, cfg.camera)
            azimuths = shown_azimuths(data, views)
            at = [(data.labels[:, 0] == c) & (data.labels[:, 1] == 0) & (data.labels[:, 2] == a)
                  for c in range(k) for a in azimuths]
            picks = [int(mask.nonzero()[0]) for mask in at]
            held = bool(data.held_out[picks].all())
            rows.append(data.images[picks])
            labels += [f"{'held-out' if held else 'real'} {name}"[:18] for name in data.class_names]
        u = (torch.tensor(azimuths, dtype=torch.float32) / 360).repeat(k)
        v = torch.full_like(u, cfg.data.elevation_v[0])
        cls = torch.arange(k).repeat_interleave(len(azimuths))
        z = model.generator.sample_z(k, "cpu", generator=torch.Generator().manual_seed(0))
        with torch.no_grad():
            images = render_views(model.generator, RenderSettings.from_config(cfg),
                                  z.repeat_interleave(len(azimuths), 0), cls, u, v, image_size=cfg.data.image_size,
                                  batch_size=32)
        rows.append(to_uint8(images))
        labels += [f"{recipe} c{c}"[:18] for c in range(k)]
    if not rows:
        return None
    grid = image_grid(upscale_nearest(torch.cat(rows), 2), len(azimuths))
    return save_png(labelled_grid(grid, labels, [f"{a}°" for a in azimuths], cell=rows[0].shape[-1] * 2), path)


# ----------------------------------------------------------------------------- MLflow


def log_mlflow(uri: Optional[str], experiment: str, summary: Dict, settings: Dict, files: Sequence[Path]) -> Optional[str]:
    if uri == "none":
        return None
    from mlflow.tracking import MlflowClient

    from grafccsr.tracking.mlflow import get_or_create_experiment
    from grafccsr.tracking.store import resolve_uri, run_url

    uri = resolve_uri(uri)
    client = MlflowClient(tracking_uri=uri)
    exp_id = get_or_create_experiment(client, experiment, uri)
    run = client.create_run(exp_id, run_name=f"quality-{time.strftime('%Y-%m-%d_%H-%M-%S')}", tags={"kind": "quality"})
    run_id = run.info.run_id
    for key, value in settings.items():
        client.log_param(run_id, key, str(value)[:500])
    for name, row in summary["recipes"].items():
        for metric in ("fid_rf", "fid_rf_std", "kid_rf", "kid_rf_std", *VIEW_COLUMNS):
            if math.isfinite(row[metric]):
                client.log_metric(run_id, f"{name}/{metric}", row[metric])
    for key, value in summary["targets"].items():
        if isinstance(value, (int, float)) and math.isfinite(value):
            client.log_metric(run_id, f"targets/{key}", value)
    for path in files:
        client.log_artifact(run_id, str(path))
    client.set_terminated(run_id)
    return run_url(uri, exp_id, run_id)


# ----------------------------------------------------------------------------- main


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parse_args(argv)
    for spec in args.define:
        name, _, overrides = spec.partition("=")
        RECIPES[name.strip()] = (tuple(overrides.split()), f"defined on the command line: {overrides}")
    recipes = [r.strip() for r in args.recipes.split(",") if r.strip()]
    unknown = [r for r in recipes if r not in RECIPES]
    if unknown or not recipes:
        print(f"quality: error: unknown recipe(s) {unknown}; choose from {', '.join(RECIPES)}", file=sys.stderr)
        return 2
    fractions = sorted(float(f) for f in args.fractions.split(","))
    runs_dir = args.out / "runs"
    # interleaved (seed-major): a drift of the machine's speed over the benchmark falls on every recipe alike
    runs = [Run(r, s, runs_dir / f"{r}-seed{s}") for s in range(args.seeds) for r in recipes]
    budget_s = 60.0 * args.budget_min
    seconds = args.train_seconds or TRAIN_SHARE * budget_s / len(runs)
    start = time.perf_counter()
    runs_dir.mkdir(parents=True, exist_ok=True)
    if not args.evaluate_only:
        train_all(runs, seconds, fractions, args.threads)
    else:
        for run in runs:
            summary = run.folder / "metrics.json"
            if summary.is_file():
                data = json.loads(summary.read_text())
                run.train_seconds, run.iterations = data.get("train_seconds", math.nan), data.get("iteration", 0)
    trained = time.perf_counter()
    evaluate_all(runs, fractions, args.eval_samples, args.workers)
    summary = summarise(runs, recipes, budget_s)
    settings = {"train_seconds": seconds, "seeds": args.seeds, "eval_samples": args.eval_samples,
                "holdout": " ".join(HOLDOUT), "view_codes": VIEW_CODES,
                "fractions": fractions, "device": "cpu", "cpu_count": os.cpu_count(),
                "command": "python -m analysis.quality " + " ".join(argv if argv is not None else sys.argv[1:]),
                "training_wall_s": round(trained - start, 1)}
    args.out.mkdir(parents=True, exist_ok=True)
    files = [plot_curves(summary, args.out / "curves.png")]
    grid = sample_grid(runs, recipes, args.out / "samples.png")
    files += [grid] if grid else []
    (args.out / "table.md").write_text(table_markdown(summary, settings))
    settings["total_wall_s"] = round(time.perf_counter() - start, 1)
    payload = {"settings": settings, "summary": summary, "runs": [{**asdict(r), "folder": str(r.folder)} for r in runs]}
    (args.out / "quality.json").write_text(json.dumps(payload, indent=2, default=str))
    files += [args.out / "table.md", args.out / "quality.json"]
    print(table_markdown(summary, settings))
    print(f"total {settings['total_wall_s'] / 60:.1f} min (budget {args.budget_min:g}); wrote {args.out}")
    url = log_mlflow(args.tracking_uri, args.experiment, summary, settings, files)
    if url:
        print(f"MLflow: {url}")
    return 0 if all(r.exit_code in (0, None) for r in runs) else 1


if __name__ == "__main__":
    sys.exit(main())
