"""Speed and memory benchmark of the training step: ``python -m grafccsr.bench``.

For every row of a grid (a list of Hydra overrides) it builds the models and a
:class:`~grafccsr.training.step.GanStep` exactly as the training loop does, feeds
it a synthetic batch of the right shapes (no dataset needed) and measures

* time of the D step, the G step and the whole iteration: the median of
  ``--repeats`` iterations after ``--warmup`` iterations (``torch.cuda.synchronize``
  around every phase on CUDA; ``check_finite=True`` as in the loop);
* peak memory per phase in one more, untimed iteration (so tracking overhead
  never pollutes a timing): on CUDA ``max_memory_allocated`` / ``max_memory_reserved``
  with the peak counters reset per phase; everywhere the live tensor bytes of
  :class:`~grafccsr.memory.tracker.PhaseMemory` (rounded to 512 B like CUDA);
* rays/s and radiance-field points/s (2 x batch x rays per patch per iteration:
  the D step's fakes and the G step's fakes);
* ratios against the grid's first row, the reference (the original graf_ccsr
  preset), measured in the same process on the same device.

Results: a printed table, ``bench.csv`` and ``bench.json`` in ``--out``, and with
``--mlflow`` a parent MLflow run with one child run per row (mlflow is imported
only then). The code path is the same on CPU and CUDA apart from synchronisation
and the CUDA memory statistics.
"""

from __future__ import annotations

import argparse
import csv
import gc
import json
import math
import os
import platform
import statistics
import sys
import time
import traceback
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any, Dict, List, Optional, Sequence

if TYPE_CHECKING:  # torch is imported lazily, so that --help and --list answer at once
    import torch

MB = 1024.0 * 1024.0

# --------------------------------------------------------------------------- grids

ORIGINAL = "+exp=graf_ccsr_original"
OURS = ["memory.set_to_none=true", "memory.eager_free=true", "memory.fakes_without_graph=true"]
"""Our defaults that do not change the maths: fakes for the D step rendered without a
graph (D sees them detached anyway), zero_grad(set_to_none=True), eager ``del``."""
BF16 = ["train.amp.policy=generator", "train.amp.dtype=bf16"]


def _lean() -> List[str]:
    """What ``conf/memory/lean.yaml`` sets, as overrides: the original preset's own memory
    keys would override ``memory=lean`` itself."""
    import yaml

    from grafccsr.config import CONF_DIR

    spec = yaml.safe_load((CONF_DIR / "memory" / "lean.yaml").read_text())
    return [f"memory.{key}={str(value).lower()}" for key, value in spec.items() if key != "defaults"]


@dataclass
class Row:
    name: str
    label: str
    overrides: List[str] = field(default_factory=list)
    replace_base: bool = False
    """True: the row ignores the grid's base overrides (e.g. our default config,
    which is NOT the same maths as the reference)."""
    warmup_extra: int = 0
    """Extra warm-up iterations (torch.compile compiles in the first ones)."""


@dataclass
class Grid:
    name: str
    base: List[str]
    """Overrides every row starts from (the reference row is exactly these)."""
    reduced: str
    """What differs from the original preset at its real sizes, for the table header."""
    rows: List[Row]


def _grid_default() -> Grid:
    # 2 x 1024 x 32 = 65536 points per render: each activation of the field is 64 MB,
    # over glibc's 32 MiB mmap ceiling, as at the original's real sizes
    base = [ORIGINAL, "train.batch_size=2", "model.patch.rays_per_patch=1024", "model.render.samples_per_ray=32"]
    return Grid(
        name="default",
        base=base,
        reduced=(
            "CPU-sized, the same for the reference and every ours_* row: +exp=graf_ccsr_original (GRAF model 8x256, "
            "whole-image patches, CCSR regulariser, BN D, R1 80) with batch 8->2, rays/patch 4096 (64^2)->1024 (32^2), "
            "samples/ray 64->32 (ours_s16 halves the samples on purpose; default_cfg is our default config)"
        ),
        rows=[
            Row("original", "original preset (reference)"),
            Row("ours", "ours, equal maths (graph-free fakes, set_to_none, eager del)", OURS),
            Row("ours_lean", "ours + checkpointing in 4096-point segments (memory=lean)", OURS + _lean()),
            Row("ours_chunk", "ours + render chunking (256 rays)", OURS + ["memory.render_chunk=256"]),
            Row("ours_accum2", "ours + grad accumulation 2", OURS + ["train.grad_accum_steps=2"]),
            Row("ours_s16", "ours + fewer samples 32->16 (quality not measured here)",
                OURS + ["model.render.samples_per_ray=16"]),
            Row("default_cfg", "default train config (model=small; NOT equal maths)", ["tracking=none"],
                replace_base=True),
        ],
    )


def _grid_gpu() -> Grid:
    ckpt, chunk = ["memory.grad_checkpoint=true"], ["memory.render_chunk=1024"]
    return Grid(
        name="gpu",
        base=[ORIGINAL],
        reduced="nothing: +exp=graf_ccsr_original at its real sizes (batch 8, 64^2 patches, 64 samples/ray, GRAF model)",
        rows=[
            Row("original", "original preset (reference)"),
            Row("ours", "ours, equal maths (graph-free fakes, set_to_none, eager del)", OURS),
            Row("ours_bf16", "ours + bf16 generator autocast", OURS + BF16),
            Row("ours_bf16_ckpt", "ours + bf16 + grad checkpointing", OURS + BF16 + ckpt),
            Row("ours_bf16_chunk", "ours + bf16 + render chunking (1024 rays)", OURS + BF16 + chunk),
            Row("ours_bf16_compile", "ours + bf16 + torch.compile(field)", OURS + BF16 + ["train.compile=true"],
                warmup_extra=3),
            Row("ours_bf16_accum2", "ours + bf16 + grad accumulation 2", OURS + BF16 + ["train.grad_accum_steps=2"]),
            Row("ours_bf16_s32", "ours + bf16 + fewer samples 64->32 (quality not measured here)",
                OURS + BF16 + ["model.render.samples_per_ray=32"]),
            Row("ours_bf16_ckpt_b16", "ours + bf16 + ckpt, batch 16", OURS + BF16 + ckpt + ["train.batch_size=16"]),
            Row("ours_bf16_ckpt_b32", "ours + bf16 + ckpt, batch 32", OURS + BF16 + ckpt + ["train.batch_size=32"]),
            Row("ours_bf16_ckpt_b64", "ours + bf16 + ckpt, batch 64", OURS + BF16 + ckpt + ["train.batch_size=64"]),
        ],
    )


_TINY = [
    "data.image_size=32", "data.synthetic.num_azimuths=8", "model.z_dim=16", "model.field.xyz_frequencies=4",
    "model.field.dir_frequencies=2", "model.field.depth=2", "model.field.width=32", "model.field.skips=[]",
    "model.field.view_width=16", "model.field.z_shape_dim=8", "model.field.z_appearance_dim=8",
    "model.discriminator.base_channels=8", "model.ccsr.hidden_channels=8", "model.ccsr.num_layers=1",
    "model.patch.rays_per_patch=256", "model.render.samples_per_ray=8", "train.batch_size=2",
]


def _grid_smoke() -> Grid:
    return Grid(
        name="smoke",
        base=[ORIGINAL, *_TINY],
        reduced="tiny (seconds; for tests): smoke-sized field, D and CCSR, batch 2, 16^2 patches, 8 samples/ray",
        rows=[
            Row("original", "original preset (reference)"),
            Row("ours", "ours, equal maths", OURS),
            Row("ours_ckpt", "ours + grad checkpointing (1024-point segments)",
                OURS + ["memory.grad_checkpoint=true", "memory.checkpoint_segment_points=1024"]),
        ],
    )


def _grid_cpu_amp() -> Grid:
    base = [ORIGINAL, "train.batch_size=2", "model.patch.rays_per_patch=256", "model.render.samples_per_ray=8"]
    return Grid(
        name="cpu-amp",
        base=base,
        reduced="CPU bf16 check, tiny: +exp=graf_ccsr_original with batch 2, 16^2 patches, 8 samples/ray",
        rows=[
            Row("original", "original preset (reference)"),
            Row("ours", "ours, equal maths", OURS),
            Row("ours_bf16", "ours + bf16 generator autocast (slow on CPUs without bf16 units)", OURS + BF16),
        ],
    )


GRIDS = {"default": _grid_default, "gpu": _grid_gpu, "smoke": _grid_smoke, "cpu-amp": _grid_cpu_amp}


def load_grid(name: str) -> Grid:
    """A built-in grid by name, or a YAML/JSON file with ``base``, ``reduced`` and
    ``rows`` (each ``name``, ``label``, ``overrides``, optional ``replace_base``)."""
    if name in GRIDS:
        return GRIDS[name]()
    path = Path(name)
    if not path.is_file():
        raise SystemExit(f"--grid {name!r}: not a built-in grid ({', '.join(GRIDS)}) nor a file")
    import yaml

    spec = yaml.safe_load(path.read_text())
    rows = [Row(**r) for r in spec["rows"]]
    return Grid(name=spec.get("name", path.stem), base=list(spec.get("base", [])),
                reduced=spec.get("reduced", ""), rows=rows)


# --------------------------------------------------------------------------- measuring


@dataclass
class Result:
    row: str
    label: str
    overrides: str
    status: str = "ok"
    """ok | oom | error"""
    error: str = ""
    batch_size: int = 0
    rays_per_patch: int = 0
    samples_per_ray: int = 0
    amp: str = ""
    repeats: int = 0
    warmup: int = 0
    first_iter_s: float = math.nan
    """The first warm-up iteration (includes torch.compile's compilation)."""
    d_ms: float = math.nan
    g_ms: float = math.nan
    iter_ms: float = math.nan
    iter_ms_min: float = math.nan
    iter_ms_max: float = math.nan
    it_per_s: float = math.nan
    rays_per_s: float = math.nan
    points_per_s: float = math.nan
    speedup_vs_ref: float = math.nan
    """it/s of this row / it/s of the reference row."""
    live_d_mb: float = math.nan
    live_g_mb: float = math.nan
    live_peak_mb: float = math.nan
    cuda_alloc_peak_mb: float = math.nan
    cuda_reserved_peak_mb: float = math.nan
    peak_mb: float = math.nan
    """The device's headline peak: CUDA reserved on CUDA, live tensor bytes on CPU."""
    mem_ratio_vs_ref: float = math.nan
    """peak_mb of this row / peak_mb of the reference row."""
    est_live_mb: float = math.nan
    est_alloc_mb: float = math.nan
    est_reserved_mb: float = math.nan
    compiled: bool = False


COLUMNS = [f.name for f in Result.__dataclass_fields__.values()]


def _sync(device: torch.device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _free(device: torch.device) -> None:
    import torch

    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


class RowRunner:
    """One config's models, step and batch; times iterations and measures memory.

    The same code runs on CPU and CUDA; only :func:`_sync` and the CUDA memory
    statistics differ."""

    def __init__(self, cfg, device: torch.device, num_classes: int, result: Result, seed: int = 0,
                 clock=time.perf_counter) -> None:
        import torch

        from grafccsr.memory.estimate import synthetic_batch
        from grafccsr.models import build_models
        from grafccsr.training.compile import compile_field
        from grafccsr.training.step import GanStep

        if device.type == "cuda" and cfg.train.tf32:  # as the training loop does
            torch.backends.cuda.matmul.allow_tf32 = True
            torch.backends.cudnn.allow_tf32 = True
        self.cfg, self.device, self.result, self.clock = cfg, device, result, clock
        torch.manual_seed(seed)
        generator, discriminator = build_models(cfg, num_classes)
        generator.to(device)
        discriminator.to(device)
        if cfg.train.compile:
            result.compiled = compile_field(generator)
        self.step = GanStep(cfg, generator, discriminator, device)
        self.batch = synthetic_batch(cfg, num_classes, device, generator=torch.Generator(device).manual_seed(seed))
        self.iteration = 0
        self.last_s = math.nan
        self.times: List[tuple] = []
        result.batch_size, result.rays_per_patch = cfg.train.batch_size, cfg.model.patch.rays_per_patch
        result.samples_per_ray, result.amp = cfg.model.render.samples_per_ray, cfg.train.amp.policy

    def iterate(self, record: bool = True) -> tuple:
        """One D + G iteration; returns (d, g, total) seconds."""
        step, batch, device = self.step, self.batch, self.device
        clock = self.clock
        _sync(device)
        t0 = clock()
        step.d_step(batch, self.iteration)
        _sync(device)
        t1 = clock()
        step.g_step(batch, self.iteration)
        _sync(device)
        t2 = clock()
        self.iteration += 1
        self.last_s = t2 - t0
        if math.isnan(self.result.first_iter_s):
            self.result.first_iter_s = t2 - t0
        self.result.warmup += 0 if record else 1
        if record:
            self.times.append((t1 - t0, t2 - t1, t2 - t0))
        return t1 - t0, t2 - t1, t2 - t0

    def warm_up(self) -> None:
        """An untimed iteration. A compiled field that fails here (torch.compile compiles
        lazily, on the first call) falls back to eager, like a platform without a compiler."""
        import torch

        try:
            self.iterate(record=False)
        except torch.OutOfMemoryError:
            raise
        except Exception as err:
            field = self.step.generator.field
            if not (self.result.compiled and hasattr(field, "_orig_mod")):
                raise
            print(f"torch.compile failed ({type(err).__name__}: {str(err)[:200]}); running eager", file=sys.stderr)
            self.step.generator.field = field._orig_mod
            self.result.compiled = False
            self.result.error = f"compile failed, eager: {type(err).__name__}"[:300]
            self.iterate(record=False)

    def summarise(self) -> None:
        r, cfg, times = self.result, self.cfg, self.times
        d, g, it = (statistics.median(t[k] for t in times) for k in range(3))
        r.repeats = len(times)
        r.d_ms, r.g_ms, r.iter_ms = 1e3 * d, 1e3 * g, 1e3 * it
        r.iter_ms_min, r.iter_ms_max = 1e3 * min(t[2] for t in times), 1e3 * max(t[2] for t in times)
        r.it_per_s = 1.0 / it
        rays = 2 * cfg.train.batch_size * cfg.model.patch.rays_per_patch  # D-step fakes + G-step fakes
        r.rays_per_s = rays * r.it_per_s
        r.points_per_s = r.rays_per_s * (cfg.model.render.samples_per_ray + cfg.model.render.importance_samples)

    def measure_memory(self) -> None:
        """One more, untimed iteration with the memory tracker. Live-tensor tracking runs
        everywhere except around compiled code (Inductor's buffers bypass the
        dispatcher, and a dispatch mode could trigger a recompile)."""
        from grafccsr.memory.tracker import PhaseMemory

        r, step, batch = self.result, self.step, self.batch
        track_live = not r.compiled
        memory = PhaseMemory(self.device)
        state = step.modules_and_optimizers() + (batch.images, batch.labels)
        with memory.phase("d_step", track_live=track_live, state=state):
            step.d_step(batch, self.iteration)
        with memory.phase("g_step", track_live=track_live, state=state):
            step.g_step(batch, self.iteration)
        _sync(self.device)
        self.iteration += 1
        peaks = memory.summary()
        r.live_d_mb = peaks.get("mem/d_step/peak_live_tensors_mb", math.nan)
        r.live_g_mb = peaks.get("mem/g_step/peak_live_tensors_mb", math.nan)
        r.live_peak_mb = peaks.get("mem/peak_live_tensors_mb", math.nan)
        r.cuda_alloc_peak_mb = peaks.get("mem/peak_allocated_mb", math.nan)
        r.cuda_reserved_peak_mb = peaks.get("mem/peak_reserved_mb", math.nan)
        r.peak_mb = r.cuda_reserved_peak_mb if self.device.type == "cuda" else r.live_peak_mb

    def close(self) -> None:
        del self.step, self.batch


def _budgeted(repeats: int, seconds_per_iteration: float, budget_s: float) -> int:
    return max(1, min(repeats, int(budget_s / max(seconds_per_iteration, 1e-6))))


def run_grid(grid: Grid, device: torch.device, *, repeats: int, warmup: int, row_budget_s: float,
             extra: Sequence[str] = (), rows: Optional[Sequence[str]] = None, estimate: bool = False,
             num_classes: Optional[int] = None, interleave: bool = False, clock: str = "wall",
             log=print) -> List[Result]:
    """Measure every row (the reference first); OOM or errors mark a row and go on.

    ``interleave`` (CPU): set every row up first, then time the rows round-robin,
    one iteration each per round, so that a machine whose load drifts (shared
    CPUs) slows all rows alike. Sequential (CUDA): one row at a time, its memory
    freed (``empty_cache``) before the next. ``clock``: ``wall`` (perf_counter) or
    ``process`` (CPU time of this process: with one thread, time other processes
    take from a shared CPU is not counted; CPU only).
    """
    import torch

    from grafccsr.config import load_config
    from grafccsr.memory.estimate import default_num_classes

    selected = [r for r in grid.rows if rows is None or r.name in rows or r is grid.rows[0]]
    results: List[Result] = []
    runners: List[Optional[RowRunner]] = []

    def guarded(result: Result, fn) -> bool:
        try:
            fn()
            return True
        except torch.OutOfMemoryError as err:
            result.status, result.error = "oom", str(err).splitlines()[0][:300]
        except Exception as err:  # keep the other rows
            result.status, result.error = "error", f"{type(err).__name__}: {err}"[:300]
            traceback.print_exc()
        return False

    def setup(row: Row) -> Optional[RowRunner]:
        overrides = ([] if row.replace_base else list(grid.base)) + list(row.overrides) + list(extra)
        shown = " ".join(overrides)
        overrides += ["tracking=none", f"train.device={device.type}"]
        result = Result(row=row.name, label=row.label, overrides=shown)
        results.append(result)
        holder: List[RowRunner] = []

        def build() -> None:
            cfg = load_config(overrides)
            classes = num_classes or default_num_classes(cfg)
            if estimate:
                from grafccsr.memory.estimate import estimate as run_estimate

                est = run_estimate(cfg, classes, render_phases=False)
                result.est_live_mb, result.est_alloc_mb = est.live_tensor_peak_mb, est.estimated_allocated_mb
                result.est_reserved_mb = est.estimated_reserved_mb
            _free(device)
            holder.append(RowRunner(cfg, device, classes, result,
                                    clock=time.process_time if clock == "process" else time.perf_counter))
            for _ in range(max(1, warmup + row.warmup_extra)):
                holder[0].warm_up()

        return holder[0] if guarded(result, build) and holder else None

    def finish(runner: Optional[RowRunner], result: Result) -> None:
        if runner is not None:
            if result.status == "ok" and guarded(result, runner.summarise):
                guarded(result, runner.measure_memory)
            runner.close()
        _free(device)
        log(f"[bench] {result.row:<22} {result.status:<5} {result.iter_ms:9.1f} ms/it  "
            f"peak {result.peak_mb:9.1f} MiB  ({result.repeats} repeats)")

    if interleave:
        runners = [setup(row) for row in selected]
        live = [(rn, res) for rn, res in zip(runners, results) if rn is not None]
        slowest = max((rn.last_s for rn, _ in live), default=0.0)
        rounds = _budgeted(repeats, slowest, row_budget_s)
        for _ in range(rounds):
            for rn, res in live:
                if res.status == "ok":
                    guarded(res, rn.iterate)
        for rn, res in zip(runners, results):
            finish(rn, res)
    else:
        for row in selected:
            runner = setup(row)
            result = results[-1]
            if runner is not None:
                for _ in range(_budgeted(repeats, runner.last_s, row_budget_s)):
                    if not guarded(result, runner.iterate):
                        break
            finish(runner, result)
    _ratios(results)
    return results


def _ratios(results: List[Result]) -> None:
    ref = results[0] if results else None
    for r in results:
        if ref is None or ref.status != "ok" or r.status != "ok":
            continue
        r.speedup_vs_ref = r.it_per_s / ref.it_per_s
        r.mem_ratio_vs_ref = r.peak_mb / ref.peak_mb if ref.peak_mb > 0 else math.nan


# --------------------------------------------------------------------------- output


def environment(device: torch.device) -> Dict[str, Any]:
    import torch

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
    for factor, suffix in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
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
    ]
    header = (f"{'row':<20}{'B':>3}{'rays':>6}{'S':>4} {'amp':<9}{'D ms':>8}{'G ms':>8}{'it ms':>9}{'it/s':>7}"
              f"{'rays/s':>8}{'pts/s':>8}{'x it/s':>8}{'peak MiB':>10}{'x mem':>7}")
    if estimate:
        header += f"{'est MiB':>9}"
    lines += [header, "-" * len(header)]
    for r in results:
        if r.status != "ok":
            lines.append(f"{r.row:<20}{r.batch_size:>3}{r.rays_per_patch:>6}{r.samples_per_ray:>4} {r.amp:<9}"
                         f"  {r.status.upper()}: {r.error[:80]}")
            continue
        line = (f"{r.row:<20}{r.batch_size:>3}{r.rays_per_patch:>6}{r.samples_per_ray:>4} {r.amp:<9}"
                f"{r.d_ms:>8.0f}{r.g_ms:>8.0f}{r.iter_ms:>9.0f}{r.it_per_s:>7.2f}"
                f"{_si(r.rays_per_s):>8}{_si(r.points_per_s):>8}{_fmt(r.speedup_vs_ref, '>8.2f')}"
                f"{r.peak_mb:>10.1f}{_fmt(r.mem_ratio_vs_ref, '>7.2f')}")
        if estimate:
            est = r.est_reserved_mb if env["device"] == "cuda" else r.est_live_mb
            line += _fmt(est, ">9.1f")
        lines.append(line)
    lines.append("")
    lines += [f"  {r.row:<20}{r.label}" for r in results]
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
    """A parent run for the grid, one child run per row (mlflow imported here only)."""
    from grafccsr.config import TrackingConfig
    from grafccsr.tracking.base import build_tracker

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


# --------------------------------------------------------------------------- CLI


def resolve_device(name: str) -> torch.device:
    import torch

    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: CUDA is not available on this machine (torch.cuda.is_available() is "
                         "False); use --device cpu")
    if device.type not in ("cpu", "cuda"):
        raise SystemExit(f"--device {name}: choose cpu, cuda or cuda:N")
    return device


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m grafccsr.bench",
        description="Time the D step, G step and iteration and measure peak memory per phase for a grid of "
                    "configs, with ratios against the original graf_ccsr preset measured in the same process.",
    )
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
    p.add_argument("overrides", nargs="*", help="Hydra overrides applied to EVERY row (reference included)")
    return p


def main(argv: Optional[List[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    if args.list:
        grid = load_grid(args.grid or ("gpu" if args.device.startswith("cuda") else "default"))
        print(f"grid {grid.name}: {grid.reduced}")
        for row in grid.rows:
            print(f"{row.name:<22}{row.label}\n{'':<22}{' '.join(([] if row.replace_base else grid.base) + row.overrides)}")
        return 0
    import torch

    device = resolve_device(args.device)
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
        raise SystemExit("--clock process is CPU-only (GPU work is not process CPU time)")
    repeats = args.repeats or (10 if is_cuda else 4)
    warmup = args.warmup if args.warmup is not None else (3 if is_cuda else 1)
    estimate = args.estimate if args.estimate is not None else is_cuda
    interleave = args.interleave if args.interleave is not None else not is_cuda
    if interleave and is_cuda:
        raise SystemExit("--interleave is CPU-only: CUDA peak counters need one row at a time")
    rows = set(args.rows.split(",")) if args.rows else None
    from grafccsr.config import PROJECT_ROOT

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
