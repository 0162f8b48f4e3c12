"""Measuring a grid: build each row as training does, time iterations, measure memory."""

from __future__ import annotations

import gc
import math
import statistics
import sys
import time
import traceback
from dataclasses import dataclass
from typing import List, Optional, Sequence

import torch

from grafccsr.bench.flops import iteration_flops
from grafccsr.bench.grids import Grid, Row
from grafccsr.config import load_config
from grafccsr.measure import PhaseMemory
from grafccsr.sizing.synthetic import default_num_classes, synthetic_batch
from grafccsr.training.build import build_run
from grafccsr.training.compile import is_compiled, uncompile

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
    changes_maths: bool = False
    """The row computes another function than the reference (fewer samples, clipped rays, ...)."""
    flops: float = math.nan
    """FLOPs of one D + G iteration (torch's FlopCounterMode: matmuls and convolutions only),
    counted over one more, untimed iteration."""
    flop_ratio_vs_ref: float = math.nan
    """flops of this row / flops of the reference row: below 1, less arithmetic; a speed-up
    beyond 1 / this ratio is execution."""


COLUMNS = [f.name for f in Result.__dataclass_fields__.values()]


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _free(device: torch.device) -> None:
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
        if device.type == "cuda" and cfg.train.tf32:  # as the training loop does
            torch.backends.cuda.matmul.allow_tf32 = True
            torch.backends.cudnn.allow_tf32 = True
        self.cfg, self.device, self.result, self.clock = cfg, device, result, clock
        self.step = build_run(cfg, num_classes, device, seed=seed)
        result.compiled = is_compiled(self.step.generator)
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
        try:
            self.iterate(record=False)
        except torch.OutOfMemoryError:
            raise
        except Exception as err:
            if not (self.result.compiled and is_compiled(self.step.generator)):
                raise
            print(f"torch.compile failed ({type(err).__name__}: {str(err)[:200]}); running eager", file=sys.stderr)
            uncompile(self.step.generator)
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
        # field evaluations: a hierarchical pass evaluates its coarse samples twice; early
        # termination's savings are not subtracted (they show in the FLOP count)
        r.points_per_s = r.rays_per_s * self.step.render_settings.field_points_per_ray

    def measure_memory(self) -> None:
        """One more, untimed iteration with the memory tracker. Live-tensor tracking runs
        everywhere except around compiled code (Inductor's buffers bypass the
        dispatcher, and a dispatch mode could trigger a recompile)."""
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

    def measure_flops(self) -> None:
        """FLOPs of one more, untimed D + G iteration (real tensors, so early termination's
        data-dependent savings count)."""
        self.result.flops = float(iteration_flops(self.step, self.batch, self.iteration))
        _sync(self.device)
        self.iteration += 1

    def close(self) -> None:
        del self.step, self.batch


def _budgeted(repeats: int, seconds_per_iteration: float, budget_s: float) -> int:
    return max(1, min(repeats, int(budget_s / max(seconds_per_iteration, 1e-6))))


def run_grid(grid: Grid, device: torch.device, *, repeats: int, warmup: int, row_budget_s: float,
             extra: Sequence[str] = (), rows: Optional[Sequence[str]] = None, estimate: bool = False,
             num_classes: Optional[int] = None, interleave: bool = False, clock: str = "wall",
             flops: bool = True, log=print) -> List[Result]:
    """Measure every row (the reference first); OOM or errors mark a row and go on.

    ``interleave`` (CPU): set every row up first, then time the rows round-robin,
    one iteration each per round, so that a machine whose load drifts (shared
    CPUs) slows all rows alike. Sequential (CUDA): one row at a time, its memory
    freed (``empty_cache``) before the next. ``clock``: ``wall`` (perf_counter) or
    ``process`` (CPU time of this process: with one thread, time other processes
    take from a shared CPU is not counted; CPU only). ``flops``: count each row's FLOPs over
    one more untimed iteration (after the memory iteration).
    """
    selected = [r for r in grid.rows if rows is None or r.name in rows or r is grid.rows[0]]
    results: List[Result] = []
    runners: List[Optional[RowRunner]] = []

    def setup(row: Row) -> Optional[RowRunner]:
        overrides = ([] if row.replace_base else list(grid.base)) + list(row.overrides) + list(extra)
        shown = " ".join(overrides)
        overrides += ["tracking=none", f"train.device={device.type}"]
        result = Result(row=row.name, label=row.label, overrides=shown, changes_maths=row.changes_maths)
        results.append(result)
        holder: List[RowRunner] = []

        def build() -> None:
            cfg = load_config(overrides)
            classes = num_classes or default_num_classes(cfg)
            if estimate:
                from grafccsr.sizing.estimate import estimate as run_estimate

                est = run_estimate(cfg, classes, render_phases=False)
                result.est_live_mb, result.est_alloc_mb = est.live_tensor_peak_mb, est.estimated_allocated_mb
                result.est_reserved_mb = est.estimated_reserved_mb
            _free(device)
            holder.append(RowRunner(cfg, device, classes, result,
                                    clock=time.process_time if clock == "process" else time.perf_counter))
            for _ in range(max(1, warmup + row.warmup_extra)):
                holder[0].warm_up()

        return holder[0] if _guarded(result, build) and holder else None

    def finish(runner: Optional[RowRunner], result: Result) -> None:
        _finish(runner, result, device, flops, log)

    if interleave:
        runners = [setup(row) for row in selected]
        live = [(rn, res) for rn, res in zip(runners, results) if rn is not None]
        slowest = max((rn.last_s for rn, _ in live), default=0.0)
        rounds = _budgeted(repeats, slowest, row_budget_s)
        for _ in range(rounds):
            for rn, res in live:
                if res.status == "ok":
                    _guarded(res, rn.iterate)
        for rn, res in zip(runners, results):
            finish(rn, res)
    else:
        for row in selected:
            runner = setup(row)
            result = results[-1]
            if runner is not None:
                for _ in range(_budgeted(repeats, runner.last_s, row_budget_s)):
                    if not _guarded(result, runner.iterate):
                        break
            finish(runner, result)
    _ratios(results)
    return results


def _guarded(result: Result, fn) -> bool:
    """Run ``fn``; an OOM or any error marks ``result`` (and the grid goes on). True if it ran."""
    try:
        fn()
        return True
    except torch.OutOfMemoryError as err:
        result.status, result.error = "oom", str(err).splitlines()[0][:300]
    except Exception as err:  # keep the other rows
        result.status, result.error = "error", f"{type(err).__name__}: {err}"[:300]
        traceback.print_exc()
    return False


def _finish(runner: Optional[RowRunner], result: Result, device: torch.device, flops: bool, log) -> None:
    """Summarise a row's timings, then its memory and FLOP iterations; free it and log a line."""
    if runner is not None:
        if result.status == "ok" and _guarded(result, runner.summarise):
            if _guarded(result, runner.measure_memory) and flops:
                _guarded(result, runner.measure_flops)
        runner.close()
    _free(device)
    log(f"[bench] {result.row:<22} {result.status:<5} {result.iter_ms:9.1f} ms/it  "
        f"peak {result.peak_mb:9.1f} MiB  {result.flops / 1e9:10.2f} GFLOP/it  ({result.repeats} repeats)")


def _ratios(results: List[Result]) -> None:
    ref = results[0] if results else None
    for r in results:
        if ref is None or ref.status != "ok" or r.status != "ok":
            continue
        r.speedup_vs_ref = r.it_per_s / ref.it_per_s
        r.mem_ratio_vs_ref = r.peak_mb / ref.peak_mb if ref.peak_mb > 0 else math.nan
        r.flop_ratio_vs_ref = r.flops / ref.flops if ref.flops > 0 else math.nan
