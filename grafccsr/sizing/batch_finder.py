"""The largest batch size (and optionally samples per ray) that fits a memory budget.

CPU path: the fake-tensor estimator (:mod:`grafccsr.sizing.estimate`) prices each
candidate in seconds; the search brackets the answer and alternates linear
interpolation (memory is close to linear in the batch) with bisection, so it
needs a handful of estimates. Batch sizes stay multiples of
``train.grad_accum_steps``.

GPU path (covered by the ``gpu`` tests, which have not yet run on a GPU): the estimator's answer is then
confirmed by real training iterations on the device, searched the same way; an
out-of-memory error counts as "does not fit" (the models are freed,
``torch.cuda.empty_cache()`` runs, and the search goes lower), and a trial fits
only if ``max_memory_reserved`` stays within the budget.
"""

from __future__ import annotations

import gc
import math
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Sequence

import torch

from grafccsr.config import Config, load_config, replace
from grafccsr.measure import MB
from grafccsr.sizing.estimate import estimate
from grafccsr.sizing.synthetic import default_num_classes, synthetic_run


@dataclass
class SearchResult:
    best: Optional[int]
    """Largest fitting value (None when even the smallest does not fit)."""
    trials: Dict[int, float] = field(default_factory=dict)
    """value -> memory (MiB; inf for an out-of-memory error)."""


def largest_fitting(measure: Callable[[int], float], budget_mb: float, *, step: int = 1, cap: int = 4096,
                    start: Optional[int] = None, max_trials: int = 16) -> SearchResult:
    """Largest multiple of ``step`` in [step, cap] with ``measure(value) <= budget_mb``,
    assuming ``measure`` grows with its argument. ``start``: first value to try."""
    trials: Dict[int, float] = {}

    def fits(value: int) -> bool:
        if value not in trials:
            trials[value] = measure(value)
        return trials[value] <= budget_mb

    def snap(value: float) -> int:
        return int(min(cap, max(step, step * math.floor(value / step))))

    cap = step * (cap // step)
    lo: Optional[int] = None  # largest known to fit
    hi: Optional[int] = None  # smallest known not to fit
    probe = snap(start) if start else step
    for trial in range(max_trials):
        if fits(probe):
            lo = probe
        else:
            hi = probe
        if lo is None:  # nothing fits yet: anchor the search at the smallest value
            if probe == step:
                return SearchResult(None, trials)
            probe = step
            continue
        if lo >= cap or (hi is not None and hi - lo <= step):
            break
        if hi is None:  # extrapolate upwards (at most x4 per trial)
            guess = _interpolate(trials, budget_mb, lo, None)
            probe = snap(min(guess if guess else 2 * lo, 4 * lo, cap))
            if probe <= lo:
                probe = min(lo + step, cap)
        else:
            guess = _interpolate(trials, budget_mb, lo, hi) if trial % 2 == 0 else None
            probe = snap(guess if guess else (lo + hi) / 2)
            probe = min(max(probe, lo + step), hi - step)
    return SearchResult(lo, trials)


def _interpolate(trials: Dict[int, float], budget: float, lo: int, hi: Optional[int]) -> Optional[float]:
    """Where the line through the two nearest finite trials crosses the budget."""
    points = sorted((v, m) for v, m in trials.items() if math.isfinite(m))
    if hi is None:
        points = points[-2:]
    else:
        below = [p for p in points if p[0] <= lo][-1:]
        above = [p for p in points if p[0] >= hi][:1]
        points = below + above
    if len(points) < 2 or points[1][1] <= points[0][1]:
        return None
    (x0, y0), (x1, y1) = points
    return x0 + (budget - y0) * (x1 - x0) / (y1 - y0)


# --------------------------------------------------------------------------- measures


_CACHE: Dict[tuple, object] = {}


def cached_estimate(cfg: Config, num_classes: int, render_phases: bool):
    """:func:`estimate`, memoised per config (searches revisit the same configs)."""
    key = (repr(cfg), num_classes, render_phases)
    if not render_phases and (repr(cfg), num_classes, True) in _CACHE:  # it has the training phases too
        return _CACHE[(repr(cfg), num_classes, True)]
    if key not in _CACHE:
        if len(_CACHE) > 256:
            _CACHE.clear()
        _CACHE[key] = estimate(cfg, num_classes, render_phases=render_phases)
    return _CACHE[key]


def estimated_mb(cfg: Config, num_classes: int, measure: str, phases: str) -> float:
    """The estimator's number for ``cfg`` (see :meth:`Estimate.value`)."""
    return cached_estimate(cfg, num_classes, phases == "all").value(measure, phases)


def measured_cuda_mb(cfg: Config, num_classes: int, device: torch.device, iterations: int = 2) -> float:
    """Peak ``max_memory_reserved`` (MiB) of real iterations on ``device``; inf on OOM."""
    step = batch = None
    try:
        gc.collect()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
        step, batch = synthetic_run(cfg, num_classes, device)
        for it in range(iterations):
            step.d_step(batch, it, check_finite=False)
            step.g_step(batch, it, check_finite=False)
        torch.cuda.synchronize(device)
        return torch.cuda.max_memory_reserved(device) / MB
    except torch.OutOfMemoryError:
        return math.inf  # leaving the except block drops the traceback and the frames that held tensors
    finally:
        step = batch = None
        gc.collect()
        torch.cuda.empty_cache()


# --------------------------------------------------------------------------- finder


@dataclass
class BatchChoice:
    samples_per_ray: int
    batch_size: Optional[int]
    memory_mb: Optional[float]
    source: str
    """``estimate`` or ``cuda`` (confirmed by real iterations)."""
    trials: Dict[int, float] = field(default_factory=dict)


@dataclass
class FinderReport:
    budget_mb: float
    measure: str
    phases: str
    configured_batch: int
    configured_samples: int
    grad_accum_steps: int
    choices: List[BatchChoice]
    chosen: Optional[BatchChoice]
    render_phase_mb: Optional[float] = None
    """Estimated peak of the sample/eval render phases (independent of the batch)."""
    notes: List[str] = field(default_factory=list)

    def override_line(self, base: Sequence[str] = ()) -> str:
        if self.chosen is None or self.chosen.batch_size is None:
            return ""
        parts = [o for o in base if not o.startswith(("train.batch_size=", "model.render.samples_per_ray="))]
        parts.append(f"train.batch_size={self.chosen.batch_size}")
        if self.chosen.samples_per_ray != self.configured_samples:
            parts.append(f"model.render.samples_per_ray={self.chosen.samples_per_ray}")
        return " ".join(parts)


def samples_candidates(configured: int) -> List[int]:
    """The configured samples per ray and 3/4, 1/2, 3/8, 1/4 of it (>= 4, distinct)."""
    values = {configured}
    for f in (0.75, 0.5, 0.375, 0.25):
        values.add(max(4, int(round(configured * f))))
    return sorted(values, reverse=True)


def find_max_batch(overrides: Sequence[str], budget_mb: float, *, measure: str = "reserved", phases: str = "train",
                   search_samples: bool = False, samples: Optional[Sequence[int]] = None,
                   device: str = "cpu", num_classes: Optional[int] = None, cap: int = 1024,
                   log: Callable[[str], None] = lambda _msg: None) -> FinderReport:
    """Largest ``train.batch_size`` under ``budget_mb`` (MiB) for a config.

    ``measure`` (live|allocated|reserved) and ``phases`` (train|all) choose the
    estimated number compared with the budget. ``search_samples``: also try fewer
    samples per ray (``samples`` or :func:`samples_candidates`) and choose the
    largest samples per ray whose largest batch still reaches the configured batch
    (if none does: the largest batch over all candidates). ``device=cuda`` confirms
    the estimator's answer by real iterations (OOM recovery).
    """
    cfg = load_config(list(overrides))
    classes = num_classes or default_num_classes(cfg)
    accum = cfg.train.grad_accum_steps
    report = FinderReport(budget_mb, measure, phases, cfg.train.batch_size, cfg.model.render.samples_per_ray,
                          accum, [], None)
    if phases == "train":  # the render phases do not depend on the batch: check them once
        est = cached_estimate(cfg, classes, True)
        render = [p.peak_mb for p in est.phases if p.name not in ("d_step", "g_step")]
        report.render_phase_mb = max(render)
        render_value = {"live": report.render_phase_mb,
                        "allocated": est.overhead.allocated_mb(report.render_phase_mb),
                        "reserved": est.overhead.reserved_mb(est.overhead.allocated_mb(report.render_phase_mb))}[measure]
        if render_value > budget_mb:
            report.notes.append(
                f"the sample/eval render batch alone needs ~{render_value:.0f} MiB ({measure}) > budget: lower "
                "eval.batch_size or set memory.render_chunk, or the run will fail at its first sample grid")
    candidates = list(samples) if samples else (samples_candidates(cfg.model.render.samples_per_ray)
                                                if search_samples else [cfg.model.render.samples_per_ray])
    previous: Optional[int] = None
    for s in candidates:
        base = replace(cfg, {"model.render.samples_per_ray": s})

        def at_batch(b: int, base=base) -> float:
            value = estimated_mb(replace(base, {"train.batch_size": b}), classes, measure, phases)
            log(f"  estimate: samples/ray {s:>4}  batch {b:>5}  {value:10.1f} MiB")
            return value

        start = previous or cfg.train.batch_size
        result = largest_fitting(at_batch, budget_mb, step=accum, cap=cap, start=start)
        choice = BatchChoice(s, result.best, result.trials.get(result.best) if result.best else None, "estimate",
                             result.trials)
        if device.startswith("cuda") and result.best is not None:
            choice = _confirm_on_cuda(base, classes, torch.device(device), budget_mb, accum, cap, result.best, log)
        report.choices.append(choice)
        previous = choice.batch_size or previous
    fitting = [c for c in report.choices if c.batch_size is not None]
    reach = [c for c in fitting if c.batch_size >= cfg.train.batch_size]
    if reach:
        report.chosen = max(reach, key=lambda c: c.samples_per_ray)
    elif fitting:
        report.chosen = max(fitting, key=lambda c: (c.batch_size, c.samples_per_ray))
    return report


def _confirm_on_cuda(cfg: Config, classes: int, device: torch.device, budget_mb: float, accum: int, cap: int,
                     start: int, log) -> BatchChoice:
    """Binary search with real iterations around the estimator's answer."""
    if not torch.cuda.is_available():
        raise SystemExit("--device cuda: CUDA is not available on this machine")
    total_mb = torch.cuda.get_device_properties(device).total_memory / MB
    if budget_mb > total_mb:
        log(f"  note: budget {budget_mb:.0f} MiB exceeds the device's {total_mb:.0f} MiB")

    def real(b: int) -> float:
        value = measured_cuda_mb(replace(cfg, {"train.batch_size": b}), classes, device)
        log(f"  cuda:     samples/ray {cfg.model.render.samples_per_ray:>4}  batch {b:>5}  {value:10.1f} MiB reserved")
        return value

    result = largest_fitting(real, budget_mb, step=accum, cap=cap, start=start)
    return BatchChoice(cfg.model.render.samples_per_ray, result.best,
                       result.trials.get(result.best) if result.best else None, "cuda", result.trials)
