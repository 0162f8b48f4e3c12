"""The training loop: one run, top to bottom.

:func:`train` builds a :class:`Trainer` and runs it: set up (device, data, models, resume),
open the tracking run, iterate (batch, D step, G step, statistics, maintenance: logs,
samples, evaluation, checkpoints), finish, and end every run with a status, whatever
stops it. Signal handlers are installed before anything else, so a SIGTERM at any moment
ends the run cleanly.

Under ``torchrun`` every rank runs the same loop; rank 0 alone logs, writes files and talks
to MLflow. The ranks meet in collectives at fixed points only (the status agreement after each
batch, the gradient averages inside the D and G steps, the log and checkpoint gathers, the
end), so any failure or signal on any rank ends every rank with the same status.
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

from grafccsr.config import Config, ConfigError, flatten, to_dict, to_yaml
from grafccsr.data import build_dataset, build_loader
from grafccsr.measure import PhaseMemory, process_peak_rss_mb
from grafccsr.metrics import evaluate_generator, keyed, metric_key
from grafccsr.metrics.keys import logged_view_key
from grafccsr.metrics.views import ViewEvaluation, evaluate_views, save_views_grid
from grafccsr.tracking import Tracker
from grafccsr.tracking.provenance import provenance_tags
from grafccsr.tracking.files import is_write_failure, log_files, writing
from grafccsr.tracking.summary import write_summary
from grafccsr.training.build import build_run, device_name, resolve_device
from grafccsr.training import distributed
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
from grafccsr.training.distributed import BUDGET, ERROR, NONFINITE, OK, OOM, STOP, Dist, RankFailure
from grafccsr.training.faults import fault_from_env
from grafccsr.training.outcome import (
    EXIT_CONFIG,
    EXIT_DISK,
    EXIT_ERROR,
    EXIT_INTERRUPTED,
    EXIT_NONFINITE,
    EXIT_OK,
    EXIT_OOM,
    RunResult,
    is_out_of_memory,
)
from grafccsr.training.samples import sample_grid, sample_latents, save_sample_grid
from grafccsr.training.stats import Stats, fmt, throughput, train_key
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


def train(cfg: Config, output_dir: Path, tracker_factory: TrackerFactory, run_name: Optional[str] = None,
          note: str = "", dist: Optional[Dist] = None) -> RunResult:
    """Train ``cfg`` into ``output_dir``; see :class:`Trainer`. ``dist``: this process's rank
    (default: torchrun's environment, else a single process)."""
    return Trainer(cfg, output_dir, tracker_factory, run_name=run_name, note=note,
                   dist=dist if dist is not None else distributed.from_env()).run()


class Trainer:
    """One training run. Read :meth:`run` first: everything else is a step it names."""

    def __init__(self, cfg: Config, output_dir: Path, tracker_factory: TrackerFactory, run_name: Optional[str] = None,
                 note: str = "", dist: Dist = Dist()) -> None:
        self.cfg, self.output_dir, self.dist, self.is_main = cfg, Path(output_dir), dist, dist.is_main
        self.tracker_factory, self.run_name, self.note = tracker_factory, run_name, note
        self.tracker: Tracker = Tracker()
        self.stats = Stats()
        self.iteration = self.start_iter = self.checkpointed_at = 0
        self.best: Dict[str, Any] = {"value": math.inf, "iteration": None}
        self.losses: Dict[str, float] = {}
        self.evaluation: Dict[str, Any] = {}
        self.timed = {"iterations": 0, "seconds": 0.0}
        self.train_clock = 0.0
        self.stopped_by_budget = False
        self.status, self.reason, self.exit_code, self.message = "FINISHED", None, EXIT_OK, ""
        self.opened = False
        self.in_step = False
        self.summary: Dict[str, Any] = {}
        self.points_sum, self.points_reports = 0.0, 0  # measured field evaluations per ray, over the run
        self.graph_points_sum, self.graph_points_reports = 0.0, 0  # those with autograd (G steps)
        self.last_grids: Dict[str, Path] = {}  # the newest sample and held-out views grids

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
                self.dist.agree(OK)  # the end: every rank finished
            except (NonFiniteLoss, RankFailure, KeyboardInterrupt, Exception) as err:
                self.handle_failure(err, stop)
            finally:
                self.close()
                distributed.shutdown(together=self.status == "FINISHED")
        return RunResult(self.status, self.reason, self.exit_code, self.summary if self.is_main else {})

    def handle_failure(self, err: BaseException, stop: "StopRequest") -> None:
        """Record why the run ended; tell the other ranks when they cannot know yet; keep the
        last state of an interrupted run. Re-raises a bug (after recording it)."""
        status = _status_of(err)
        if isinstance(err, ConfigError) and not self.opened:  # the tracking server refused to start a run
            self.fail("FAILED", "config", EXIT_CONFIG, str(err))
            raise err
        disk = is_write_failure(err)
        if status == STOP:
            self.fail("KILLED", "interrupted", EXIT_INTERRUPTED,
                      f"stopped by {stop.requested or 'SIGINT'} at iteration {self.iteration}")
        elif disk:
            self.fail("FAILED", "disk", EXIT_DISK, _disk_message(err))
        elif status == NONFINITE:
            self.fail("FAILED", "nonfinite", EXIT_NONFINITE, str(err))
        elif status == OOM:
            self.fail("FAILED", "oom", EXIT_OOM, first_line(err))
        else:
            self.fail("FAILED", "error", EXIT_ERROR, f"{type(err).__name__}: {first_line(err)}")
        if self.dist.enabled and not isinstance(err, (RankFailure, NonFiniteLoss)) and not self.in_step:
            # the others wait in the next agreement (a failure inside a step was aborted in place)
            _ignore_dead_peers(lambda: self.dist.agree(status))
        if status == STOP and self.iteration > max(self.start_iter, self.checkpointed_at):
            ranks = _ignore_dead_peers(lambda: self.dist.gather(self.rank_state()))
            try:
                self.save(CHECKPOINT_NAME, ranks)
            except OSError as save_err:
                if not is_write_failure(save_err):
                    raise
                self.fail("FAILED", "disk", EXIT_DISK, _disk_message(save_err))
        if status == ERROR and not disk and not isinstance(err, RankFailure):
            raise err

    def setup(self) -> None:
        """Device, data, models and step, resumed state, loader. Nothing is written yet, so a
        config or data error leaves nothing behind."""
        cfg, t = self.cfg, self.cfg.train
        self.device = distributed.init(self.dist, resolve_device(t.device), t.dist_timeout_s)
        self.local_batch = self.dist.local_batch(t.batch_size, t.grad_accum_steps)
        if not self.is_main:
            log.setLevel(logging.WARNING)  # rank 0 tells the story
        if self.device.type == "cuda" and t.tf32:
            torch.backends.cuda.matmul.allow_tf32 = True
            torch.backends.cudnn.allow_tf32 = True
        ranks = f", {self.dist.world_size} ranks" if self.dist.enabled else ""
        log.info("setting up %s on %s%s", cfg.exp_name, device_name(self.device), ranks)
        self.dataset = build_dataset(cfg.data, cfg.camera)
        self.step = build_run(cfg, self.dataset.num_classes, self.device, seed=t.seed, dist=self.dist)
        self.run_id = None
        if cfg.resume:
            self.resume(load_checkpoint(cfg.resume))
        self.loader = iter(build_loader(self.dataset, self.local_batch, cfg.memory, self.device, t.seed,
                                        start_batch=self.start_iter, rank=self.dist.rank,
                                        world_size=self.dist.world_size))
        self.memory = PhaseMemory(self.device)
        self.fault = fault_from_env(self.dist.rank)
        self.sample_z = sample_latents(cfg)
        settings = self.step.render_settings
        self.rays_per_iteration = 2 * t.batch_size * cfg.model.patch.rays_per_patch  # D-step and G-step fakes
        self.points_per_ray = settings.field_points_per_ray  # field evaluations, the coarse pass included
        self.snapshot_times = [f * t.time_budget_s for f in t.snapshot_fractions] if t.snapshots else []
        g_params = sum(p.numel() for p in self.step.generator.parameters())
        d_params = sum(p.numel() for p in self.step.discriminator.parameters())
        log.info("data: %d images, %d classes, %d px (%s); generator %.3g M, discriminator %.3g M parameters",
                 len(self.dataset), self.dataset.num_classes, self.dataset.image_size, self.dataset.root,
                 g_params / 1e6, d_params / 1e6)
        render = cfg.model.render
        if render.fine_network and render.coarse_loss == "none":
            log.warning("model.render.coarse_loss=none (graf_ccsr upstream): the coarse network enters no loss and "
                        "never trains; a frozen random network places the importance samples "
                        "(model.render.coarse_loss=match_fine trains it)")

    def resume(self, state: Dict[str, Any]) -> None:
        """Models, optimisers, RNG streams and counters of a checkpoint (each rank its own streams)."""
        self.step.load_state_dict(state["step"])
        ranks = state.get("ranks") or []
        mine = ranks[self.dist.rank] if len(ranks) == self.dist.world_size else {"rng": state["rng"]}
        set_rng_state(mine["rng"])
        self.step.load_rank_state(mine.get("step", {}))
        self.start_iter = self.iteration = state["iteration"]
        self.run_id, self.best = state.get("mlflow_run_id"), state.get("best", self.best)
        self.train_clock = state.get("train_seconds", 0.0)

    def open_tracking(self) -> None:
        """The run folder's config and the MLflow run (a resumed run continues its own)."""
        if not self.is_main:
            return
        cfg = self.cfg
        tags = {"exp": cfg.exp_name, "device": device_name(self.device), "torch": torch.__version__,
                "fid_extractor": cfg.eval.extractor, "output_dir": str(self.output_dir.resolve()),
                "status_detail": "running", "world_size": str(self.dist.world_size), **provenance_tags()}
        if self.note:
            tags["mlflow.note.content"] = self.note
        self.tracker = self.tracker_factory(cfg.tracking, run_name=self.run_name or f"{cfg.exp_name}-{self.output_dir.name}",
                                            resume_run_id=self.run_id, tags=tags)
        self.opened = True  # from here on the run ends with a status (an unreachable server stopped it before)
        with writing(self.output_dir):
            self.output_dir.mkdir(parents=True, exist_ok=True)
        remove_partial_files(self.output_dir)
        self.tracker.set_tags({"output_dir": str(self.output_dir.resolve()), "status_detail": "running"})
        self.tracker.log_params(flatten(cfg))
        self.tracker.log_dataset(self.dataset)
        config_path = self.output_dir / "config.yaml"
        with writing(config_path):
            config_path.write_text(to_yaml(cfg))
        self.tracker.log_artifact(config_path)
        t = cfg.train
        log.info("run folder %s; %s iterations %d..%d, batch %d%s, %d^2 patches, %d samples/ray%s",
                 self.output_dir, "resuming" if cfg.resume else "training", self.start_iter, t.max_iters,
                 t.batch_size, f" ({self.local_batch} per rank)" if self.dist.enabled else "",
                 cfg.model.patch.side, cfg.model.render.samples_per_ray,
                 f", time budget {t.time_budget_s:.0f} s" if t.time_budget_s else "")
        if self.tracker.run_id:
            log.info("MLflow run %s%s", self.tracker.run_id, f": {self.tracker.url}" if self.tracker.url else "")

    def loop(self, stop: StopRequest) -> None:
        t, mem = self.cfg.train, self.cfg.memory
        progress = self.progress_bar()
        clock_start = time.perf_counter() - self.train_clock
        try:
            for iteration in range(self.start_iter, t.max_iters):
                self.iteration = iteration
                with self.stats.timer("perf/data_s"):
                    batch = self.next_batch(iteration)
                self.train_clock = time.perf_counter() - clock_start
                # rank 0's clock decides (only it skips snapshot time); the agreement spreads it
                budget_spent = self.is_main and bool(t.time_budget_s) and self.train_clock >= t.time_budget_s
                status = self.dist.agree(STOP if stop.requested else BUDGET if budget_spent else OK)
                if status == BUDGET:
                    self.stopped_by_budget = True
                    break
                if status != OK:
                    raise RankFailure(status, "a rank")
                track = mem.track_peak_every > 0 and (iteration - self.start_iter < 2
                                                       or iteration % mem.track_peak_every == 0)
                start = time.perf_counter()
                self.train_step(batch, iteration, track)
                seconds = time.perf_counter() - start
                self.stats.report("perf/step_s", seconds)
                if not track:  # the live-tensor tracker slows the iterations it measures
                    self.stats.report("perf/untracked_step_s", seconds)
                    self.timed["iterations"] += 1
                    self.timed["seconds"] += seconds
                self.iteration = done = iteration + 1
                if progress is not None:
                    progress.update(1)
                with self.stats.timer("perf/maintenance_s"):
                    clock_start = self.maintenance(done, clock_start)
            self.train_clock = time.perf_counter() - clock_start
        finally:
            if progress is not None:
                progress.close()

    def train_step(self, batch: Batch, iteration: int, track: bool) -> None:
        """One D step and one G step. A failure on this rank inside a step joins that step's
        gradient collective with a failure flag, so the other ranks stop with the same reason."""
        live_state = self.step.modules_and_optimizers() + (batch.images, batch.labels)
        for phase, step in (("d_step", self.step.d_step), ("g_step", self.step.g_step)):
            self.in_step = True
            try:
                with self.memory.phase(phase, track_live=track, state=live_state):
                    sums = step(batch, iteration)
                    self.stats.report_all({train_key(k): v for k, v in sums.items()})
                    self.points_sum, self.points_reports = self.points_sum + sums["perf/points_per_ray"], \
                        self.points_reports + 1
                    if "perf/graph_points_per_ray" in sums:
                        self.graph_points_sum += sums["perf/graph_points_per_ray"]
                        self.graph_points_reports += 1
            except (RankFailure, NonFiniteLoss):
                raise  # every rank raises these alike
            except Exception as err:
                self.step.abort(phase, _status_of(err))
                raise
            finally:
                self.in_step = False
        if self.step.occupancy_due(iteration):  # the grid's cadence, like the EMA's; part of the iteration's time
            with self.stats.timer("perf/grid_update_s"), \
                    self.memory.phase("grid_update", track_live=track, state=self.step.modules_and_optimizers()):
                self.step.update_occupancy(iteration)

    def maintenance(self, done: int, clock_start: float) -> float:
        """What happens between iterations on their cadences: first what every rank takes part
        in (the log window's statistics, the ranks' states for a checkpoint), then rank 0's
        writing. Returns the training clock's start, moved past time spent on snapshots."""
        t = self.cfg.train
        window = self.collect_window() if t.log_every and done % t.log_every == 0 else None
        checkpoint = t.ckpt_every and done % t.ckpt_every == 0
        ranks = self.dist.gather(self.rank_state()) if checkpoint else None
        if checkpoint:
            self.checkpointed_at = done  # on every rank: an interrupt then needs no second one
        if not self.is_main:
            return clock_start
        if window is not None:
            self.log_window(done, window)
        if t.sample_every and done % t.sample_every == 0:
            self.write_samples(done)
        if t.eval_every and done % t.eval_every == 0:
            self.run_eval(done)
        if checkpoint:
            self.save(CHECKPOINT_NAME, ranks)
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
        return clock_start

    def finish(self) -> None:
        """After the last iteration: the last window, samples, evaluation and checkpoint."""
        t, done = self.cfg.train, self.iteration
        window = self.collect_window() if self.stats.count("perf/step_s") else None
        ranks = self.dist.gather(self.rank_state())
        if not self.is_main:
            return
        if window is not None:
            self.log_window(done, window)
        if not (t.sample_every and done % t.sample_every == 0):
            self.write_samples(done)
        if self.cfg.eval.at_end and not (t.eval_every and done % t.eval_every == 0):
            self.run_eval(done)
        self.save(CHECKPOINT_NAME, ranks)
        if self.stopped_by_budget:
            self.message = f"time budget of {t.time_budget_s:g} s reached at iteration {done}"

    def fail(self, status: str, reason: str, exit_code: int, message: str) -> None:
        self.status, self.reason, self.exit_code, self.message = status, reason, exit_code, message

    def close(self) -> None:
        """Write ``metrics.json`` and end the tracking run with the run's status (every path)."""
        if not self.is_main:
            return
        if not self.opened:  # stopped before the run was opened: nothing to record
            if self.reason != "config":  # a refused start is the command line's one error line
                self.log_end()
            return
        self.summary = self.make_summary()
        path = self.write_summary()
        try:
            self.tracker.set_tags({"status_detail": self.reason or "finished", "failure_reason": self.reason or ""})
            # run-level figures as the last value of each metric (perf: the run's average)
            self.tracker.log_metrics({**self.memory.summary(), **self.summary["perf"]}, step=self.iteration)
            if path is not None:
                self.tracker.log_artifact(path)
            files = []  # the newest grids, where the run's description links them
            for folder, grid in self.last_grids.items():
                self.tracker.log_artifact(grid, folder)
                files.append(f"{folder}/{grid.name}")
            files += [f.name for f in log_files()] + (["metrics.json"] if path is not None else []) + ["config.yaml"]
            self.tracker.describe(self.summary, self.note, files)
        finally:
            self.log_end()  # the log's last line, then the log itself (train.log), whatever the end
            for log_file in log_files():
                self.tracker.log_artifact(log_file)
            self.tracker.end(self.status)  # bounded: a lost server is skipped
        if path is not None and self.tracker.report() != self.summary.get("tracking"):  # lost at the very end
            self.summary["tracking"] = self.tracker.report()
            self.write_summary()

    def write_summary(self) -> Optional[Path]:
        """``metrics.json``; on a full or refusing disk the run ends FAILED (disk) and None."""
        try:
            return write_summary(self.output_dir, self.summary)
        except OSError as err:
            if not is_write_failure(err):
                raise
            ended = self.status + (f" ({self.reason})" if self.reason else "")
            self.fail("FAILED", "disk", EXIT_DISK, f"{_disk_message(err)} (the run had ended {ended})")
            self.summary.update(status=self.status, reason=self.reason, message=self.message)
            return None

    def log_end(self) -> None:
        level = logging.INFO if self.status == "FINISHED" else logging.ERROR
        lost = self.summary.get("tracking") or {}
        note = (f"; MLflow tracking lost at iteration {lost['lost_at_iteration']} ({lost['lost_cause']})"
                if lost.get("state") == "lost" else "")
        log.log(level, "%s%s at iteration %d%s", self.status, f" ({self.reason}: {self.message})" if self.reason else
                (f" ({self.message})" if self.message else ""), self.iteration, note)

    # ------------------------------------------------------------------ steps of the loop

    def next_batch(self, iteration: int) -> Batch:
        item = next(self.loader)
        non_blocking = self.cfg.memory.non_blocking
        images = item["image"].to(self.device, non_blocking=non_blocking)
        if self.fault is not None:
            images = self.fault.before_iteration(iteration, images)
        return Batch(images, item["label"].to(self.device, non_blocking=non_blocking))

    def collect_window(self) -> Dict[str, float]:
        """The log window's means (losses are already averaged over the ranks by the steps), its
        throughput, and memory peaks as the maximum over the ranks. Every rank calls this."""
        window = self.stats.collect()
        untracked = window.pop("perf/untracked_step_s", None)
        if untracked:  # the window's mean seconds per untracked iteration
            window.update(throughput(1, untracked, self.rays_per_iteration,
                                     window.get("perf/points_per_ray", self.points_per_ray)))
        window.update(self.dist.max_over_ranks({**self.memory.pop_window(),
                                                "mem/process_peak_rss_mb": process_peak_rss_mb()}))
        return window

    def log_window(self, done: int, metrics: Dict[str, float]) -> None:
        self.losses = {k: v for k, v in metrics.items() if k.startswith("train/")}
        metrics["train/lr_g"] = self.step.opt_g.param_groups[0]["lr"]
        # the training step's peak first: MLflow's compare page plots a run's first logged metric
        self.tracker.log_metrics({**{k: v for k, v in metrics.items() if k.startswith("mem/train_peak")}, **metrics},
                                 step=done)
        losses = self.losses
        peak = metrics.get("mem/train_peak_allocated_mb", metrics.get("mem/train_peak_live_tensors_mb"))
        log.info("it %d/%d  d %s  g %s  r1 %s  logit gap %s  %s it/s%s", done, self.cfg.train.max_iters,
                 fmt(losses.get("train/loss_d")), fmt(losses.get("train/loss_g")), fmt(losses.get("train/loss_r1")),
                 fmt(_gap(losses)), fmt(metrics.get("perf/it_per_s")),
                 f"  peak {peak:.0f} MiB" if peak is not None else "")

    def write_samples(self, done: int) -> None:
        track = self.cfg.memory.track_peak_every > 0  # rare: measured whenever tracking is on
        with self.memory.phase("sample", track_live=track, state=self.step.modules_and_optimizers()):
            images = sample_grid(self.step.sampling_generator, self.cfg, self.dataset.num_classes, self.sample_z,
                                 self.device)
        path = self.output_dir / "samples" / f"{done:07d}.png"
        with writing(path):
            save_sample_grid(images, path, self.cfg, self.dataset.class_names)
        self.tracker.log_image(path, key="samples", step=done)
        self.last_grids["samples"] = path
        self.release_cache()

    def run_eval(self, done: int) -> None:
        cfg = self.cfg
        track = cfg.memory.track_peak_every > 0
        with self.memory.phase("eval", track_live=track, state=self.step.modules_and_optimizers()):
            bar = cfg.train.progress and self.is_main  # the final evaluation of the default job takes minutes
            result = evaluate_generator(self.step.sampling_generator, self.dataset, cfg, self.device, seed=cfg.train.seed,
                                        progress=bar)
            views = evaluate_views(self.step.sampling_generator, self.dataset, cfg, self.device, seed=cfg.train.seed,
                                   progress=bar)
        self.evaluation = keyed(result)
        names = ("fid", "kid_mean", "kid_std")
        self.tracker.log_metrics({f"eval/{metric_key(n, cfg.eval.extractor)}": result[n] for n in names}, step=done)
        value = result[cfg.eval.best_metric]
        log.info("eval at iteration %d (%s, %d samples): %s %.4g, %s %.4g", done, cfg.eval.extractor,
                 result["num_samples"], metric_key("fid", cfg.eval.extractor), result["fid"],
                 metric_key("kid_mean", cfg.eval.extractor), result["kid_mean"])
        if views is not None:
            self.log_views(done, views)
        if value < self.best["value"]:
            self.best.update(value=value, iteration=done, metric=metric_key(cfg.eval.best_metric, cfg.eval.extractor))
            self.save(BEST_NAME)
        self.release_cache()

    def log_views(self, done: int, views: ViewEvaluation) -> None:
        """The pose-matched metrics on the held-out views (``eval/view_*``) and their grid."""
        self.evaluation.update(views.metrics, view_holdout=views.record)
        self.tracker.log_metrics({logged_view_key(k): v for k, v in views.metrics.items()}, step=done)
        path = save_views_grid(views, self.output_dir / "views" / f"{done:07d}.png")
        self.tracker.log_image(path, key="views", step=done)
        self.last_grids["views"] = path
        m = views.metrics
        log.info("held-out views at iteration %d (%d views x %d codes): PSNR %.2f dB (best code %.2f), SSIM %.3f, "
                 "IoU %.3f", done, views.record["views"], views.record["codes"], m["view_psnr"], m["view_psnr_best"],
                 m["view_ssim"], m["view_iou"])

    def rank_state(self) -> Dict[str, Any]:
        """This rank's random streams (gathered into checkpoints, so a resume restores every rank)."""
        return {"rng": rng_state(), "step": self.step.rank_state()}

    def save(self, name: str, ranks: Optional[List[Dict[str, Any]]] = None) -> Optional[Path]:
        """Write a checkpoint (rank 0); ``ranks``: every rank's :meth:`rank_state`."""
        if not self.is_main:
            return None
        path = save_checkpoint({
            "config": to_dict(self.cfg),
            "iteration": self.iteration,
            "train_seconds": self.train_clock,
            "step": self.step.state_dict(),
            "rng": rng_state(),
            "ranks": ranks,
            "world_size": self.dist.world_size,
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

    def run_points_per_ray(self) -> float:
        """Field evaluations per ray measured over the run's D and G steps (the configured count
        before any step: an upper bound with the occupancy grid or early termination)."""
        return float(self.points_sum) / self.points_reports if self.points_reports else float(self.points_per_ray)

    def run_graph_points_per_ray(self) -> Optional[float]:
        """Field evaluations per ray with autograd, over the run's G steps (None before any)."""
        return float(self.graph_points_sum) / self.graph_points_reports if self.graph_points_reports else None

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
            "perf": _with_count(self.timed["iterations"], self.run_points_per_ray(), throughput(
                self.timed["iterations"], self.timed["seconds"], self.rays_per_iteration, self.run_points_per_ray()),
                self.run_graph_points_per_ray()),
            "losses": self.losses,
            "eval": evaluation,
            "fid_extractor": cfg.eval.extractor,
            "tracking": self.tracker.report(),
            "output_dir": str(self.output_dir.resolve()),
            "checkpoint": str(self.output_dir.resolve() / CHECKPOINT_NAME),
        }


def _ignore_dead_peers(collective):
    """Run a collective on a failure path; None when other ranks are already gone."""
    try:
        return collective()
    except RuntimeError as err:  # gloo/nccl: a peer closed the connection or timed out
        log.warning("ranks could not agree (%s)", first_line(err))
        return None


def _disk_message(err: OSError) -> str:
    """One line: the file, the OS error, and what was kept."""
    path = Path(getattr(err, "path", None) or err.filename or "the run folder")
    text = f"could not write {path}: [Errno {err.errno}] {err.strerror}"
    if path.suffix == ".pt":
        text += f"; the partial file was removed{f', the previous {path.name} is intact' if path.is_file() else ''}"
    return text


def _with_count(iterations: int, points_per_ray: float, perf: Dict[str, float],
                graph_points_per_ray: Optional[float] = None) -> Dict[str, float]:
    """The run's throughput with how many timed iterations it rests on and the field evaluations
    per ray it measured, all and (G steps) with autograd (logged once, at the end)."""
    if not perf:
        return perf
    graph = {} if graph_points_per_ray is None else {"perf/graph_points_per_ray": graph_points_per_ray}
    return {"perf/timed_iterations": iterations, "perf/points_per_ray": points_per_ray, **graph, **perf}


def _status_of(err: BaseException) -> int:
    """The status a failure is agreed as."""
    if isinstance(err, RankFailure):
        return err.status
    if isinstance(err, KeyboardInterrupt):
        return STOP
    if isinstance(err, NonFiniteLoss):
        return NONFINITE
    return OOM if is_out_of_memory(err) else ERROR


def _gap(losses: Dict[str, float]) -> Optional[float]:
    """Mean real logit minus mean fake logit: how well D tells them apart."""
    if "train/d_real_logit" in losses and "train/d_fake_logit" in losses:
        return losses["train/d_real_logit"] - losses["train/d_fake_logit"]
    return None


__all__: List[str] = ["StopRequest", "Trainer", "train"]
