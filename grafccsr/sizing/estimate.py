"""Estimated CUDA peak memory of a training iteration, without a GPU.

Method
------
The real :class:`~grafccsr.training.step.GanStep` runs two full iterations
(``d_step`` then ``g_step``; the optimisers create their state lazily in the first)
under :class:`torch._subclasses.fake_tensor.FakeTensorMode` on the CPU device:
every operator computes only shapes, dtypes and strides, so a GRAF-sized step at
batch 32 costs seconds and no memory. ``check_finite=False`` keeps the step free of
host syncs. (Fake *CUDA* tensors would be closer to the target, but their backward
needs a CUDA build with a device; fake CPU runs the whole step, autocast and the
optimiser included.)

A :class:`CategorizedLiveBytes` dispatch mode, stacked *inside* the fake mode,
sees every tensor an operator returns and counts its storage once while it is
alive, rounded up to 512 bytes like CUDA's caching allocator rounds every block.
Tensors alive at the start of a phase (parameters, EMA copy, buffers, gradients,
optimiser state, the batch) are registered first. It is the same counting as the
real measurement (:class:`grafccsr.measure.tracker.LiveTensorBytes`), so the
estimate can be validated exactly against a real CPU step, and it adds a
breakdown: whenever a new peak is followed by a free, the live set at that peak
is split into categories (parameters, EMA copy, buffers, gradients, optimiser
state, batch, activations/temporaries).

(``torch.distributed._tools.mem_tracker.MemTracker`` also works under fake mode and
has categories, but it raises ``NotImplementedError`` when a module runs twice in
one tracked region, and ``d_step`` calls the discriminator twice, on reals and
fakes, so it cannot track a GAN step without resetting its module statistics in
the middle of the step.)

From tensor bytes to CUDA numbers (assumptions, see :class:`CudaOverhead`)
---------------------------------------------------------------------------
* ``estimated_allocated`` (compare with ``torch.cuda.max_memory_allocated``) =
  live-tensor peak + a cuBLAS/cuBLASLt workspace that PyTorch allocates through the
  caching allocator. cuDNN convolution workspaces are transient and not modelled.
* ``estimated_reserved`` (compare with ``max_memory_reserved``) = allocated x
  (1 + fragmentation), rounded up to the allocator's 2 MiB segment granularity.
* The CUDA context (~0.5 GB per process, outside PyTorch's statistics, visible in
  ``nvidia-smi``) is reported separately.
None of the constants could be calibrated here (no GPU): run
``python -m grafccsr.memory calibrate --device cuda`` on a GPU, which prints the
fitted constants.

Known differences from a real CUDA run
--------------------------------------
* Autocast cast lists: the fake run uses CPU autocast, whose lower-precision and
  FP32 lists differ slightly from CUDA's (CUDA also forces e.g. ``exp``,
  ``softplus``, ``pow``, ``sum``, ``cumprod`` to FP32; CPU casts a few more ops).
  In this model the renderer's compositing already runs in FP32 and the field is
  Linear+ReLU, so the two agree on what matters (Linear outputs in bf16).
* Device-specific kernels: cuDNN batch norm keeps a reserve buffer, cuDNN/cuBLAS
  may pick algorithms with workspaces; the fake run uses the generic autograd
  formulas (what a real CPU step saves).
* ``train.compile`` is ignored: the estimate is for eager execution (Inductor
  usually saves fewer activations).
* The occupancy grid (``model.occupancy``) and the ball (``model.render.bound_radius``): every
  ray counts (the rays they skip depend on values: an upper bound); the grid's update is a
  phase of its own (``grid_update``, every cell evaluated: the warm-up's, an upper bound after
  it), outside the training-step peak like sampling and evaluation.
"""

from __future__ import annotations

import math
import time
import weakref
from dataclasses import asdict, dataclass, field
from typing import Dict, Iterable, List, Optional, Sequence

import torch

from grafccsr.config import Config, load_config, replace
from grafccsr.measure.tracker import MB, TRAINING_PHASES, LiveTensorBytes, _rounded, state_tensors
from grafccsr.models import RenderSettings, render_views
from grafccsr.sizing.synthetic import default_num_classes, fake_run
from grafccsr.training.distributed import Dist

CATEGORIES = ("parameters", "ema", "buffers", "gradients", "optimizer", "batch", "activations")
"""Breakdown of a peak. ``activations`` = everything created during the phase that is
not a gradient or optimiser state: saved activations, temporaries, rendered patches."""


# --------------------------------------------------------------------------- CUDA model


@dataclass(frozen=True)
class CudaOverhead:
    """How tensor bytes become CUDA allocator numbers. ASSUMPTIONS, not calibrated
    (no GPU was available); ``calibrate --device cuda`` prints fitted values."""

    workspace_mb: float = 32.0
    """cuBLAS + cuBLASLt workspace allocated through the caching allocator on first
    matmul (32 MiB is PyTorch's default on Hopper; 8 MiB on older GPUs)."""
    fragmentation: float = 0.10
    """Reserved exceeds allocated by this fraction (block splitting, freed blocks
    of the wrong size, the large pool's 20 MiB minimum segments)."""
    segment_mb: float = 2.0
    """Granularity of reserved memory (the small pool's segment size)."""
    context_mb: float = 500.0
    """CUDA context + kernel images: outside PyTorch's statistics, in nvidia-smi."""

    def allocated_mb(self, live_tensor_mb: float) -> float:
        return live_tensor_mb + self.workspace_mb

    def reserved_mb(self, allocated_mb: float) -> float:
        raw = allocated_mb * (1.0 + self.fragmentation)
        return math.ceil(raw / self.segment_mb) * self.segment_mb


# --------------------------------------------------------------------------- counting


class CategorizedLiveBytes(LiveTensorBytes):
    """:class:`LiveTensorBytes` that also splits its peak into :data:`CATEGORIES`.

    ``modules`` maps a category (``parameters``, ``ema``) to modules, whose buffers
    count as ``buffers``; gradients and optimiser state are recognised through the
    modules' ``.grad`` and the optimisers' ``state`` (also when created during the
    phase). When a new peak is followed by a free, the weakref callback copies the
    live set (nothing else: touching tensors while one is being freed crashes);
    the copy is split into categories at the next operator or at :meth:`finish`.
    """

    def __init__(self, modules: Dict[str, Iterable[torch.nn.Module]], optimizers: Sequence[torch.optim.Optimizer],
                 batch: Sequence[torch.Tensor]) -> None:
        super().__init__()
        self._sizes: Dict[int, int] = {}
        self._dirty = False
        self._pending: Optional[Dict[int, int]] = None
        self.peak_breakdown: Dict[str, int] = dict.fromkeys(CATEGORIES, 0)
        self._params = [p for mods in modules.values() for m in mods for p in m.parameters()]
        self._fixed: Dict[int, str] = {}
        for category, mods in modules.items():
            for m in mods:
                for p in m.parameters():
                    self._fixed[_key(p)] = category
                for b in m.buffers():
                    self._fixed.setdefault(_key(b), "buffers")
        for t in batch:
            self._fixed[_key(t)] = "batch"
        self._optimizers = list(optimizers)
        self._entry: Dict[int, str] = {}

    # LiveTensorBytes.track's counting, plus the peak bookkeeping
    def track(self, tensor: torch.Tensor) -> None:
        if tensor.is_meta or not hasattr(tensor, "untyped_storage"):
            return
        try:
            storage = tensor.untyped_storage()
        except (RuntimeError, NotImplementedError):
            return
        key = storage._cdata
        if key in self._live:
            return
        self._entry.pop(key, None)  # an address reused by a new storage
        size = _rounded(storage.nbytes())
        self.current += size
        if self.current > self.peak:
            self.peak = self.current
            self._dirty = True

        def _freed(_ref, key=key, size=size) -> None:
            if self._dirty:  # the live set right now is the peak: keep a copy
                self._pending = dict(self._sizes)
                self._dirty = False
            if self._live.pop(key, None) is not None:
                self.current -= size
                self._sizes.pop(key, None)

        self._live[key] = weakref.ref(storage, _freed)
        self._sizes[key] = size

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if self._pending is not None:
            self._split(self._pending)
        return super().__torch_dispatch__(func, types, args, kwargs)

    def register_entry(self, tensors: Iterable[torch.Tensor]) -> None:
        """Track what is alive at entry and remember its category now (an entry
        gradient freed by ``zero_grad(set_to_none=True)`` stays a gradient)."""
        current = self._current_categories()
        for t in tensors:
            self.track(t)
            k = _key(t)
            self._entry[k] = current.get(k, "activations")

    def _current_categories(self) -> Dict[int, str]:
        cats = dict(self._fixed)
        for p in self._params:
            if p.grad is not None:
                cats[_key(p.grad)] = "gradients"
        for opt in self._optimizers:
            for state in opt.state.values():
                for v in state.values():
                    if isinstance(v, torch.Tensor):
                        cats[_key(v)] = "optimizer"
        return cats

    def _split(self, sizes: Dict[int, int]) -> None:
        self._pending = None
        cats = self._current_categories()
        out = dict.fromkeys(CATEGORIES, 0)
        for key, size in sizes.items():
            out[cats.get(key) or self._entry.get(key, "activations")] += size
        self.peak_breakdown = out

    def finish(self) -> None:
        """Split the last peak (call after leaving the mode)."""
        if self._dirty:
            self._pending = dict(self._sizes)
            self._dirty = False
        if self._pending is not None:
            self._split(self._pending)


def _key(t: torch.Tensor) -> int:
    return t.untyped_storage()._cdata


# --------------------------------------------------------------------------- results


@dataclass
class PhaseEstimate:
    name: str
    iteration: int
    peak_mb: float
    """Live-tensor peak (512 B rounding) = ``PhaseMemory``'s ``peak_live_tensors_mb``."""
    breakdown_mb: Dict[str, float]
    """:data:`CATEGORIES` -> MiB at the peak."""


@dataclass
class Estimate:
    """Estimated peaks of one config. ``*_mb`` are MiB (2^20 bytes)."""

    label: str
    batch_size: int
    samples_per_ray: int
    rays_per_patch: int
    amp_policy: str
    phases: List[PhaseEstimate]
    overhead: CudaOverhead
    seconds: float
    notes: List[str] = field(default_factory=list)

    def _peak(self, names: Sequence[str]) -> PhaseEstimate:
        return max((p for p in self.phases if p.name in names), key=lambda p: p.peak_mb)

    @property
    def train_phase(self) -> PhaseEstimate:
        """The phase (and iteration) with the highest training peak."""
        return self._peak(TRAINING_PHASES)

    @property
    def live_tensor_peak_mb(self) -> float:
        """Training-step peak of live tensor bytes (validated against a real CPU step)."""
        return self.train_phase.peak_mb

    @property
    def breakdown_mb(self) -> Dict[str, float]:
        return self.train_phase.breakdown_mb

    @property
    def activations_mb(self) -> float:
        return self.breakdown_mb["activations"]

    @property
    def estimated_allocated_mb(self) -> float:
        return self.overhead.allocated_mb(self.live_tensor_peak_mb)

    @property
    def estimated_reserved_mb(self) -> float:
        return self.overhead.reserved_mb(self.estimated_allocated_mb)

    @property
    def run_live_tensor_peak_mb(self) -> float:
        """Peak over every estimated phase (training + sampling/eval rendering)."""
        return max(p.peak_mb for p in self.phases)

    @property
    def run_estimated_allocated_mb(self) -> float:
        return self.overhead.allocated_mb(self.run_live_tensor_peak_mb)

    @property
    def run_estimated_reserved_mb(self) -> float:
        return self.overhead.reserved_mb(self.run_estimated_allocated_mb)

    @property
    def estimated_process_mb(self) -> float:
        """What nvidia-smi would show for the run: reserved + CUDA context."""
        return self.run_estimated_reserved_mb + self.overhead.context_mb

    def value(self, measure: str = "reserved", phases: str = "all") -> float:
        """One number: ``measure`` live|allocated|reserved, ``phases`` train|all."""
        if phases not in ("train", "all"):
            raise ValueError(f"phases={phases!r} must be 'train' or 'all'")
        live = self.live_tensor_peak_mb if phases == "train" else self.run_live_tensor_peak_mb
        if measure == "live":
            return live
        allocated = self.overhead.allocated_mb(live)
        if measure == "allocated":
            return allocated
        if measure == "reserved":
            return self.overhead.reserved_mb(allocated)
        raise ValueError(f"measure={measure!r} must be live, allocated or reserved")

    def to_dict(self) -> Dict:
        out = asdict(self)
        out.update(
            live_tensor_peak_mb=self.live_tensor_peak_mb,
            peak_phase=f"{self.train_phase.name}@{self.train_phase.iteration}",
            estimated_allocated_mb=self.estimated_allocated_mb,
            estimated_reserved_mb=self.estimated_reserved_mb,
            run_estimated_allocated_mb=self.run_estimated_allocated_mb,
            run_estimated_reserved_mb=self.run_estimated_reserved_mb,
            estimated_process_mb=self.estimated_process_mb,
        )
        return out

    def table(self) -> str:
        """Human-readable breakdown (what ``python -m grafccsr.memory estimate`` prints)."""
        peak = self.train_phase
        lines = [
            f"config: {self.label}",
            f"batch {self.batch_size}, {self.rays_per_patch} rays/patch, {self.samples_per_ray} samples/ray, "
            f"amp={self.amp_policy}  (estimated in {self.seconds:.1f} s under FakeTensorMode)",
            "",
            f"training-step peak: {peak.name}, iteration {peak.iteration}",
            f"  {'category':<34}{'MiB':>11}{'share':>8}",
        ]
        labels = {
            "parameters": "parameters (G + D)",
            "ema": "EMA copy of G",
            "buffers": "buffers",
            "gradients": "gradients",
            "optimizer": "optimiser state",
            "batch": "batch (images, labels)",
            "activations": "activations / temporaries",
        }
        f = ">11.3f" if peak.peak_mb < 100 else ">11.1f"  # small configs: KiB resolution
        for cat in CATEGORIES:
            value = peak.breakdown_mb.get(cat, 0.0)
            lines.append(f"  {labels[cat]:<34}{value:{f}}{value / max(peak.peak_mb, 1e-9):>8.1%}")
        lines += [
            f"  {'= live tensors (512 B rounding)':<34}{peak.peak_mb:{f}}",
            f"  {'+ cuBLAS workspace (assumed)':<34}{self.overhead.workspace_mb:{f}}",
            f"  {'= estimated_allocated':<34}{self.estimated_allocated_mb:{f}}",
            f"  {f'estimated_reserved (x{1 + self.overhead.fragmentation:.2f}, 2 MiB)':<34}"
            f"{self.estimated_reserved_mb:{f}}",
            "",
            "per phase (live-tensor peak, MiB):",
        ]
        for p in self.phases:
            lines.append(f"  {p.name:<10} it {p.iteration}  {p.peak_mb:{f}}")
        lines += [
            f"run peak incl. sampling/eval rendering: estimated_allocated {self.run_estimated_allocated_mb:.1f} MiB, "
            f"estimated_reserved {self.run_estimated_reserved_mb:.1f} MiB, "
            f"+ CUDA context (~{self.overhead.context_mb:.0f} MiB, assumed) = {self.estimated_process_mb:.0f} MiB in nvidia-smi",
        ]
        lines += [f"note: {n}" for n in self.notes]
        return "\n".join(lines)


# --------------------------------------------------------------------------- estimate


def estimate(cfg: Config, num_classes: Optional[int] = None, *, iterations: int = 2,
             render_phases: bool = True, overhead: CudaOverhead = CudaOverhead(),
             label: str = "", world_size: int = 1) -> Estimate:
    """Estimate the peaks of ``cfg`` (see the module docstring for the method).

    ``iterations`` full D+G iterations (2: the first creates the optimiser state);
    ``render_phases`` also estimates the training loop's sample-grid render and one
    evaluation render batch (``no_grad``, FP32, ``eval.batch_size`` images).
    ``world_size`` > 1: the peak of one rank of a torchrun job (``train.batch_size / world_size``
    images per rank, plus the flattened gradient buffer of the all-reduce after each step).
    """

    t0 = time.perf_counter()
    num_classes = num_classes or default_num_classes(cfg)
    notes = []
    if cfg.train.compile:
        notes.append("train.compile=true is ignored: the estimate is for eager execution")
        cfg = replace(cfg, {"train.compile": False})
    if cfg.train.amp.policy != "off":
        notes.append("autocast follows CPU cast lists under the fake run (CUDA's differ slightly, see module docs)")

    dist = Dist(0, world_size, 0, simulated=True) if world_size > 1 else Dist()
    dist.local_batch(cfg.train.batch_size, cfg.train.grad_accum_steps)  # a batch that does not divide fails here, as in training
    step, batch, fake_mode = fake_run(cfg, num_classes, dist)

    phases: List[PhaseEstimate] = []
    with fake_mode:
        modules = {"parameters": [step.generator, step.discriminator]}
        if step.generator_ema is not None:
            modules["ema"] = [step.generator_ema]
        optimizers = [step.opt_g, step.opt_d]

        def run_phase(name: str, iteration: int, fn) -> None:
            mode = CategorizedLiveBytes(modules, optimizers, (batch.images, batch.labels))
            mode.register_entry(state_tensors(*step.modules_and_optimizers(), batch.images, batch.labels))
            with mode:
                fn()
            mode.finish()
            phases.append(PhaseEstimate(name, iteration, mode.peak / MB,
                                        {k: v / MB for k, v in mode.peak_breakdown.items()}))

        for it in range(iterations):
            run_phase("d_step", it, lambda: step.d_step(batch, it, check_finite=False))
            run_phase("g_step", it, lambda: step.g_step(batch, it, check_finite=False))
        if step.generator.occupancy is not None:  # the loop's grid update, priced at every cell (its dearest)
            run_phase("grid_update", iterations, lambda: step.generator.update_occupancy(
                0, step.render_settings, cfg.train.seed, every_cell=True))
        if render_phases:
            for name, count, size in _render_jobs(cfg, num_classes):
                run_phase(name, iterations, lambda: _render(step.sampling_generator, cfg, count, size, num_classes))

    return Estimate(
        label=label, batch_size=cfg.train.batch_size, samples_per_ray=cfg.model.render.samples_per_ray,
        rays_per_patch=cfg.model.patch.rays_per_patch, amp_policy=cfg.train.amp.policy, phases=phases,
        overhead=overhead, seconds=time.perf_counter() - t0, notes=notes,
    )


def _render_jobs(cfg: Config, num_classes: int) -> List[tuple]:
    """(phase, images in one render batch, image side) of the loop's render phases."""
    views = num_classes * cfg.train.num_sample_views  # the loop always writes a final sample grid
    jobs = [("sample", min(cfg.eval.batch_size, views), cfg.data.image_size)]
    if cfg.eval.at_end or cfg.eval.eval_every:
        size = cfg.eval.resolution or cfg.data.image_size
        jobs.append(("eval", min(cfg.eval.batch_size, cfg.eval.num_samples), size))
    return jobs


def _render(generator, cfg: Config, count: int, size: int, num_classes: int) -> None:
    """One render batch as the sample grid / evaluation does it (no_grad, FP32)."""
    was_training = generator.training
    generator.eval()
    try:
        z = torch.randn(count, cfg.model.z_dim)
        class_idx = torch.arange(count) % num_classes
        u = torch.arange(count, dtype=torch.float32) / max(count, 1)
        v = torch.full((count,), cfg.data.elevation_v[0])
        render_views(generator, RenderSettings.from_config(cfg), z, class_idx, u, v, image_size=size,
                     batch_size=count, to_cpu=cfg.memory.eval_to_cpu)
    finally:
        generator.train(was_training)


def estimate_overrides(overrides: Sequence[str], num_classes: Optional[int] = None, **kwargs) -> Estimate:
    """:func:`estimate` for Hydra overrides (``+exp=...`` presets included)."""
    cfg = load_config(list(overrides))
    label = " ".join(overrides) or "(defaults)"
    if kwargs.get("world_size", 1) > 1:
        label += f" (one rank of {kwargs['world_size']})"
    return estimate(cfg, num_classes, label=label, **kwargs)


def estimate_peak_mb(overrides: List[str], *, measure: str = "auto", phases: str = "auto",
                     num_classes: Optional[int] = None) -> float:
    """Estimated peak memory (MiB) of a training run with these Hydra overrides, as the
    run's ``metrics.json`` will report it in ``peak_memory_mb``:

    * on CUDA (``train.device`` cuda, or auto with a GPU present): ``estimated_reserved``
      over the whole run (training steps + the sample/evaluation render batches), like
      the loop's peak of ``max_memory_reserved`` over every phase;
    * on the CPU: the live-tensor peak of the D/G steps (the loop's
      ``peak_live_tensors`` is tracked on training steps only).

    ``measure`` (live|allocated|reserved) and ``phases`` (train|all) override that
    choice. Costs a few seconds on the CPU; no GPU needed.
    """
    cfg = load_config(list(overrides))
    on_cuda = cfg.train.device.startswith("cuda") or (cfg.train.device == "auto" and torch.cuda.is_available())
    if measure == "auto":
        measure = "reserved" if on_cuda else "live"
    if phases == "auto":
        phases = "all" if on_cuda else "train"
    est = estimate_overrides(overrides, num_classes, render_phases=(phases == "all"))
    return est.value(measure, phases)


__all__ = [
    "CATEGORIES", "CategorizedLiveBytes", "CudaOverhead", "Estimate", "PhaseEstimate", "estimate",
    "estimate_overrides", "estimate_peak_mb",
]
