"""The training loop: one run, top to bottom.

:func:`train` builds a :class:`Trainer` and runs it: set up (device, data, models, resume),
open the tracking run, iterate (batch, D step, G step, statistics, maintenance: logs,
samples, evaluation, checkpoints), finish, and end every run with a status, whatever
stops it. Signal handlers are installed before anything else, so a SIGTERM at any moment
ends the run cleanly.

Only the main process logs, writes files and talks to MLflow (``is_main``).
"""

from __future__ import annotations

import gc
import logging
import math
import signal
import time
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional

import torch

from grafccsr.config import Config, flatten, to_dict, to_yaml
from grafccsr.data import build_dataset, build_loader
from grafccsr.measure import PhaseMemory, process_peak_rss_mb
from grafccsr.metrics import keyed, metric_key
from grafccsr.tracking import Tracker
from grafccsr.tracking.provenance import provenance_tags
from grafccsr.tracking.summary import write_summary
from grafccsr.training.build import build_run, device_name, resolve_device
from grafccsr.training.checkpoint import (
    BEST_NAME,
    CHECKPOINT_NAME,
    SNAPSHOT_DIR,
    first_line,
    load_checkpoint,
    remove_partial_files,
    rng_state,
    save_checkpoint,
    set_rng_state,
)
from grafccsr.training.faults import fault_from_env
from grafccsr.training.outcome import (
    EXIT_ERROR,
    EXIT_INTERRUPTED,
    EXIT_NONFINITE,
    EXIT_OK,
    EXIT_OOM,
    RunResult,
    is_out_of_memory,
)
from grafccsr.training.samples import sample_grid, sample_latents, save_sample_grid
from grafccsr.training.stats import Stats, fmt, throughput
from grafccsr.training.step import Batch, NonFiniteLoss

log = logging.getLogger("grafccsr.train")

TrackerFactory = Callable[..., Tracker]


class StopRequest:
    """SIGINT/SIGTERM set a flag; the loop stops at the next iteration boundary (checkpoint
    written). A second signal interrupts at once."""

    def __init__(self) -> None:
        self.requested: Optional[str] = None
        self._previous: Dict[int, Any] = {}

    def __enter__(self) -> "StopRequest":
        for sig in (signal.SIGINT, signal.SIGTERM):
            try:
                self._previous[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread
                pass
        return self

    def _handle(self, signum, _frame) -> None:
        if self.requested:
            raise KeyboardInterrupt
        self.requested = signal.Signals(signum).name

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


def train(cfg: Config, output_dir: Path, tracker_factory: TrackerFactory, is_main: bool = True,
          run_name: Optional[str] = None, note: str = "") -> RunResult:
    """Train ``cfg`` into ``output_dir``; see :class:`Trainer`."""
    return Trainer(cfg, output_dir, tracker_factory, is_main, run_name=run_name, note=note).run()


class Trainer:
    """One training run. Read :meth:`run` first: everything else is a step it names."""

    def __init__(self, cfg: Config, output_dir: Path, tracker_factory: TrackerFactory, is_main: bool = True,
                 run_name: Optional[str] = None, note: str = "") -> None:
        self.cfg, self.output_dir, self.is_main = cfg, Path(output_dir), is_main
        self.tracker_factory, self.run_name, self.note = tracker_factory, run_name, note
        self.tracker: Tracker = Tracker()
        self.stats = Stats()
        self.iteration = self.start_iter = 0
        self.best: Dict[str, Any] = {"value": math.inf, "iteration": None}
        self.losses: Dict[str, float] = {}
        self.evaluation: Dict[str, Any] = {}
        self.timed = {"iterations": 0, "seconds": 0.0}
        self.train_clock = 0.0
        self.stopped_by_budget = False
        self.status, self.reason, self.exit_code, self.message = "FINISHED", None, EXIT_OK, ""
        self.opened = False
        self.summary: Dict[str, Any] = {}

    # ------------------------------------------------------------------ the run

    def run(self) -> RunResult:
        with StopRequest() as stop:
            # config, data and device errors propagate from here: nothing was opened or written
            self.setup()
            try:
                if stop.requested:
                    raise KeyboardInterrupt
                self.open_tracking()
                self.loop(stop)
                self.finish()
            except NonFiniteLoss as err:
                self.fail("FAILED", "nonfinite", EXIT_NONFINITE, str(err))
            except KeyboardInterrupt:
                self.fail("KILLED", "interrupted", EXIT_INTERRUPTED,
                          f"stopped by {stop.requested or 'SIGINT'} at iteration {self.iteration}")
                if self.iteration > self.start_iter:
                    self.save(CHECKPOINT_NAME)
            except Exception as err:
                if not is_out_of_memory(err):
                    self.fail("FAILED", "error", EXIT_ERROR, f"{type(err).__name__}: {first_line(err)}")
                    raise
                self.fail("FAILED", "oom", EXIT_OOM, first_line(err))
            finally:
                self.close()
        return RunResult(self.status, self.reason, self.exit_code, self.summary if self.is_main else {})

    def setup(self) -> None:
        """Device, data, models and step, resumed state, loader. Nothing is written yet, so a
        config or data error leaves nothing behind."""
        cfg, t = self.cfg, self.cfg.train
        self.device = resolve_device(t.device)
        if self.device.type == "cuda" and t.tf32:
            torch.backends.cuda.matmul.allow_tf32 = True
            torch.backends.cudnn.allow_tf32 = True
        log.info("setting up %s on %s", cfg.exp_name, device_name(self.device))
        self.dataset = build_dataset(cfg.data, cfg.camera)
        self.step = build_run(cfg, self.dataset.num_classes, self.device, seed=t.seed)
        self.run_id = None
        if cfg.resume:
            state = load_checkpoint(cfg.resume)
            self.step.load_state_dict(state["step"])
            set_rng_state(state["rng"])
            self.start_iter = self.iteration = state["iteration"]
            self.run_id, self.best = state.get("mlflow_run_id"), state.get("best", self.best)
            self.train_clock = state.get("train_seconds", 0.0)
        self.loader = iter(build_loader(self.dataset, t.batch_size, cfg.memory, self.device, t.seed,
                                        start_batch=self.start_iter))
        self.memory = PhaseMemory(self.device)
        self.fault = fault_from_env()
        self.sample_z = sample_latents(cfg)
        settings = self.step.render_settings
        self.rays_per_iteration = 2 * t.batch_size * cfg.model.patch.rays_per_patch  # D-step and G-step fakes
        self.points_per_ray = settings.points_per_ray
        self.snapshot_times = [f * t.time_budget_s for f in t.snapshot_fractions] if t.snapshots else []
        g_params = sum(p.numel() for p in self.step.generator.parameters())
        d_params = sum(p.numel() for p in self.step.discriminator.parameters())
        log.info("data: %d images, %d classes, %d px (%s); generator %.3g M, discriminator %.3g M parameters",
                 len(self.dataset), self.dataset.num_classes, self.dataset.image_size, self.dataset.root,
                 g_params / 1e6, d_params / 1e6)

    def open_tracking(self) -> None:
        """The run folder's config and the MLflow run (a resumed run continues its own)."""
        if not self.is_main:
            return
        cfg = self.cfg
        self.opened = True
        self.output_dir.mkdir(parents=True, exist_ok=True)
        remove_partial_files(self.output_dir)
        tags = {"exp": cfg.exp_name, "device": device_name(self.device), "torch": torch.__version__,
                "fid_extractor": cfg.eval.extractor, "output_dir": str(self.output_dir.resolve()),
                "status_detail": "running", **provenance_tags()}
        if self.note:
            tags["mlflow.note.content"] = self.note
        self.tracker = self.tracker_factory(cfg.tracking, run_name=self.run_name or f"{cfg.exp_name}-{self.output_dir.name}",
                                            resume_run_id=self.run_id, tags=tags)
        self.tracker.set_tags({"output_dir": str(self.output_dir.resolve()), "status_detail": "running"})
        self.tracker.log_params(flatten(cfg))
        self.tracker.log_dataset(self.dataset)
        config_path = self.output_dir / "config.yaml"
        config_path.write_text(to_yaml(cfg))
        self.tracker.log_artifact(config_path)
        t = cfg.train
        log.info("run folder %s; %s iterations %d..%d, batch %d, %d^2 patches, %d samples/ray%s",
                 self.output_dir, "resuming" if cfg.resume else "training", self.start_iter, t.max_iters,
                 t.batch_size, cfg.model.patch.side, cfg.model.render.samples_per_ray,
                 f", time budget {t.time_budget_s:.0f} s" if t.time_budget_s else "")
        if self.tracker.run_id:
            log.info("MLflow run %s%s", self.tracker.run_id, f": {self.tracker.url}" if self.tracker.url else "")

    def loop(self, stop: StopRequest) -> None:
        cfg, t, mem = self.cfg, self.cfg.train, self.cfg.memory
        progress = self.progress_bar()
        clock_start = time.perf_counter() - self.train_clock
        try:
            for iteration in range(self.start_iter, t.max_iters):
                self.train_clock = time.perf_counter() - clock_start
                if t.time_budget_s and self.train_clock >= t.time_budget_s:
                    self.stopped_by_budget = True
                    break
                self.iteration = iteration
                with self.stats.timer("timing/data_s"):
                    batch = self.next_batch(iteration)
                track = mem.track_peak_every > 0 and (iteration - self.start_iter < 2
                                                       or iteration % mem.track_peak_every == 0)
                live_state = self.step.modules_and_optimizers() + (batch.images, batch.labels)
                start = time.perf_counter()
                with self.memory.phase("d_step", track_live=track, state=live_state):
                    self.stats.report_all(self.step.d_step(batch, iteration))
                with self.memory.phase("g_step", track_live=track, state=live_state):
                    self.stats.report_all(self.step.g_step(batch, iteration))
                seconds = time.perf_counter() - start
                self.stats.report("timing/step_s", seconds)
                if not track:  # the live-tensor tracker slows the iterations it measures
                    self.stats.report("timing/untracked_step_s", seconds)
                    self.timed["iterations"] += 1
                    self.timed["seconds"] += seconds
                self.iteration = done = iteration + 1
                if progress is not None:
                    progress.update(1)
                with self.stats.timer("timing/maintenance_s"):
                    self.maintenance(done, clock_start)
                if stop.requested:
                    raise KeyboardInterrupt
            self.train_clock = time.perf_counter() - clock_start
        finally:
            if progress is not None:
                progress.close()

    def maintenance(self, done: int, clock_start: float) -> None:
        """What happens between iterations on their cadences."""
        if not self.is_main:
            return
        t = self.cfg.train
        if t.log_every and done % t.log_every == 0:
            self.log_window(done)
        if t.sample_every and done % t.sample_every == 0:
            self.write_samples(done)
        if t.eval_every and done % t.eval_every == 0:
            self.run_eval(done)
        if t.ckpt_every and done % t.ckpt_every == 0:
            self.save(CHECKPOINT_NAME)
            self.release_cache()
        if self.cfg.memory.empty_cache_every and done % self.cfg.memory.empty_cache_every == 0:
            self.release_cache()
        while self.snapshot_times and time.perf_counter() - clock_start >= self.snapshot_times[0]:
            # saving a snapshot is not training: the clock skips it
            saved_at = time.perf_counter()
            index = len(t.snapshot_fractions) - len(self.snapshot_times)
            self.snapshot_times.pop(0)
            self.train_clock = saved_at - clock_start
            self.save(f"{SNAPSHOT_DIR}/{index}.pt")
            log.info("snapshot %d at %.1f s of training (iteration %d)", index, self.train_clock, done)
            clock_start += time.perf_counter() - saved_at

    def finish(self) -> None:
        """After the last iteration: the last window, samples, evaluation and checkpoint."""
        if not self.is_main:
            return
        t, done = self.cfg.train, self.iteration
        if self.stats.count("timing/step_s"):
            self.log_window(done)
        if not (t.sample_every and done % t.sample_every == 0):
            self.write_samples(done)
        if self.cfg.eval.at_end and not (t.eval_every and done % t.eval_every == 0):
            self.run_eval(done)
        self.save(CHECKPOINT_NAME)
        if self.stopped_by_budget:
            self.message = f"time budget of {t.time_budget_s:g} s reached at iteration {done}"

    def fail(self, status: str, reason: str, exit_code: int, message: str) -> None:
        self.status, self.reason, self.exit_code, self.message = status, reason, exit_code, message

    def close(self) -> None:
        """Write ``metrics.json`` and end the tracking run with the run's status (every path)."""
        if not self.is_main:
            return
        level = logging.INFO if self.status == "FINISHED" else logging.ERROR
        log.log(level, "%s%s at iteration %d", self.status, f" ({self.reason}: {self.message})" if self.reason else
                (f" ({self.message})" if self.message else ""), self.iteration)
        if not self.opened:  # stopped before the run was opened: nothing to record
            return
        self.summary = self.make_summary()
        path = write_summary(self.output_dir, self.summary)
        try:
            self.tracker.set_tags({"status_detail": self.reason or "finished", "failure_reason": self.reason or ""})
            # run-level figures as the last value of each metric (perf: the run's average)
            self.tracker.log_metrics({**self.memory.summary(), **self.summary["perf"]}, step=self.iteration)
            self.tracker.log_artifact(path)
        finally:
            self.tracker.end(self.status)

    # ------------------------------------------------------------------ steps of the loop

    def next_batch(self, iteration: int) -> Batch:
        item = next(self.loader)
        non_blocking = self.cfg.memory.non_blocking
        images = item["image"].to(self.device, non_blocking=non_blocking)
        if self.fault is not None:
            images = self.fault.before_iteration(iteration, images)
        return Batch(images, item["label"].to(self.device, non_blocking=non_blocking))

    def log_window(self, done: int) -> None:
        window = self.stats.collect()
        untracked = window.pop("timing/untracked_step_s", None)
        losses = {k: v for k, v in window.items() if k.startswith(("loss/", "d/"))}
        self.losses = losses
        metrics = dict(window)
        if untracked:
            metrics.update(throughput(1, untracked, self.rays_per_iteration, self.points_per_ray))
        metrics.update(self.memory.pop_window())
        metrics["mem/process_peak_rss_mb"] = process_peak_rss_mb()
        metrics["train/lr_g"] = self.step.opt_g.param_groups[0]["lr"]
        metrics["train/global_batch"] = self.cfg.train.batch_size
        self.tracker.log_metrics(metrics, step=done)
        peak = metrics.get("mem/peak_allocated_mb", metrics.get("mem/peak_live_tensors_mb"))
        log.info("it %d/%d  d %s  g %s  r1 %s  logit gap %s  %s it/s%s", done, self.cfg.train.max_iters,
                 fmt(losses.get("loss/d")), fmt(losses.get("loss/g")), fmt(losses.get("loss/r1")),
                 fmt(_gap(losses)), fmt(metrics.get("perf/it_per_s")),
                 f"  peak {peak:.0f} MiB" if peak is not None else "")

    def write_samples(self, done: int) -> None:
        track = self.cfg.memory.track_peak_every > 0  # rare: measured whenever tracking is on
        with self.memory.phase("sample", track_live=track, state=self.step.modules_and_optimizers()):
            images = sample_grid(self.step.sampling_generator, self.cfg, self.dataset.num_classes, self.sample_z,
                                 self.device)
        path = save_sample_grid(images, self.output_dir / "samples" / f"{done:07d}.png", self.cfg,
                                self.dataset.class_names)
        self.tracker.log_image(path, key="samples", step=done)
        self.release_cache()

    def run_eval(self, done: int) -> None:
        from grafccsr.metrics import evaluate_generator  # torch-fidelity: imported when first needed

        cfg = self.cfg
        track = cfg.memory.track_peak_every > 0
        with self.memory.phase("eval", track_live=track, state=self.step.modules_and_optimizers()):
            result = evaluate_generator(self.step.sampling_generator, self.dataset, cfg, self.device, seed=cfg.train.seed)
        self.evaluation = keyed(result)
        names = ("fid", "kid_mean", "kid_std")
        self.tracker.log_metrics({f"eval/{metric_key(n, cfg.eval.extractor)}": result[n] for n in names}, step=done)
        value = result[cfg.eval.best_metric]
        log.info("eval at iteration %d (%s, %d samples): %s %.4g, %s %.4g", done, cfg.eval.extractor,
                 result["num_samples"], metric_key("fid", cfg.eval.extractor), result["fid"],
                 metric_key("kid_mean", cfg.eval.extractor), result["kid_mean"])
        if value < self.best["value"]:
            self.best.update(value=value, iteration=done, metric=metric_key(cfg.eval.best_metric, cfg.eval.extractor))
            self.save(BEST_NAME)
        self.release_cache()

    def save(self, name: str) -> Path:
        path = save_checkpoint({
            "config": to_dict(self.cfg),
            "iteration": self.iteration,
            "train_seconds": self.train_clock,
            "step": self.step.state_dict(),
            "rng": rng_state(),
            "mlflow_run_id": self.tracker.run_id,
            "tracking_uri": self.tracker.uri,
            "num_classes": self.dataset.num_classes,
            "class_names": self.dataset.class_names,
            "best": self.best,
        }, self.output_dir / name)
        if name == CHECKPOINT_NAME or name == BEST_NAME:
            log.info("checkpoint %s (iteration %d)", path, self.iteration)
            if self.cfg.tracking.log_checkpoints:
                self.tracker.log_checkpoint(path, self.iteration)
        return path

    def release_cache(self) -> None:
        if self.cfg.memory.empty_cache_every:
            gc.collect()
            if self.device.type == "cuda":
                torch.cuda.empty_cache()

    def progress_bar(self):
        if not (self.is_main and self.cfg.train.progress):
            return None
        from tqdm import tqdm

        # disable=None: only on a terminal; log files get the per-window lines instead
        return tqdm(total=self.cfg.train.max_iters, initial=self.start_iter, desc=self.cfg.exp_name, unit="it",
                    dynamic_ncols=True, disable=None)

    def make_summary(self) -> Dict[str, Any]:
        cfg, device = self.cfg, self.device
        peaks = self.memory.summary()
        is_cuda = device.type == "cuda"
        peak_key = "mem/train_peak_reserved_mb" if is_cuda else "mem/train_peak_live_tensors_mb"
        evaluation = dict(self.evaluation)
        if self.best.get("iteration") is not None:
            evaluation.update(best_value=self.best["value"], best_iteration=self.best["iteration"],
                              best_metric=self.best.get("metric"))
        return {
            "status": self.status,
            "reason": self.reason,
            "message": self.message,
            "iteration": self.iteration,
            "max_iters": cfg.train.max_iters,
            "train_seconds": self.train_clock,
            "exp_name": cfg.exp_name,
            "mlflow_run_id": self.tracker.run_id,
            "tracking_uri": self.tracker.uri,
            "mlflow_url": self.tracker.url,
            "device": device_name(device),
            "memory": peaks,
            "peak_memory_mb": peaks.get(peak_key),
            "peak_memory_measure": "cuda_peak_reserved" if is_cuda else "peak_live_tensors",
            "peak_memory_scope": "training step (d_step, g_step); see memory for sample/eval",
            "process_peak_rss_mb": process_peak_rss_mb(),
            "perf": throughput(self.timed["iterations"], self.timed["seconds"], self.rays_per_iteration,
                               self.points_per_ray),
            "losses": self.losses,
            "eval": evaluation,
            "fid_extractor": cfg.eval.extractor,
            "output_dir": str(self.output_dir.resolve()),
            "checkpoint": str(self.output_dir.resolve() / CHECKPOINT_NAME),
        }


def _gap(losses: Dict[str, float]) -> Optional[float]:
    """Mean real logit minus mean fake logit: how well D tells them apart."""
    if "d/real_logit" in losses and "d/fake_logit" in losses:
        return losses["d/real_logit"] - losses["d/fake_logit"]
    return None


__all__: List[str] = ["StopRequest", "Trainer", "train"]
