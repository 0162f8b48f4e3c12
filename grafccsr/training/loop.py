"""The training loop: cadence, memory statistics, samples, evaluation,
checkpoints, resume and failure handling. Reads top to bottom as one run.

Logging, samples and checkpoints happen only on the main process
(``is_main``), so a DDP launcher can wrap this later without changes here.
"""

from __future__ import annotations

import gc
import math
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, Optional

import torch
from omegaconf import OmegaConf

from grafccsr.config import Config, flatten
from grafccsr.data import build_dataset, build_loader
from grafccsr.memory.tracker import PhaseMemory, process_peak_rss_mb
from grafccsr.models import build_models
from grafccsr.models.views import render_views
from grafccsr.tracking.base import Tracker
from grafccsr.tracking.summary import write_summary
from grafccsr.training.checkpoint import (
    CHECKPOINT_NAME,
    load_checkpoint,
    rng_state,
    save_checkpoint,
    set_rng_state,
)
from grafccsr.training.compile import compile_field
from grafccsr.training.images import save_image_grid
from grafccsr.training.step import Batch, GanStep, NonFiniteLoss

EXIT_OK, EXIT_ERROR, EXIT_OOM, EXIT_NONFINITE, EXIT_INTERRUPTED = 0, 1, 3, 4, 130
BEST_NAME = "best.pt"


@dataclass
class RunResult:
    status: str  # FINISHED | FAILED | KILLED
    reason: Optional[str]  # None | oom | nonfinite | interrupted | error
    exit_code: int
    summary: Dict[str, Any] = field(default_factory=dict)


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(f"train.device={name!r} but CUDA is not available on this machine; use train.device=cpu")
    return device


def device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"


class _StopRequest:
    """SIGINT/SIGTERM set a flag; the loop checkpoints at the next iteration
    boundary. A second signal interrupts at once."""

    def __init__(self) -> None:
        self.requested: Optional[str] = None
        self._previous: Dict[int, Any] = {}

    def __enter__(self) -> "_StopRequest":
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


def _to_float(values: Dict[str, torch.Tensor]) -> Dict[str, float]:
    return {k: float(v) for k, v in values.items()}


def train(cfg: Config, output_dir: Path, tracker_factory: Callable[..., Tracker], is_main: bool = True) -> RunResult:
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    t_cfg, mem_cfg = cfg.train, cfg.memory
    device = resolve_device(t_cfg.device)
    if device.type == "cuda" and t_cfg.tf32:
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    torch.manual_seed(t_cfg.seed)

    # ------------------------------------------------------------ data, models, state
    dataset = build_dataset(cfg.data)
    generator, discriminator = build_models(cfg, dataset.num_classes)
    generator.to(device)
    discriminator.to(device)
    if t_cfg.compile:
        compile_field(generator)
    step = GanStep(cfg, generator, discriminator, device)

    start_iter, run_id, best = 0, None, {"value": math.inf, "iteration": None}
    if cfg.resume:
        ckpt = load_checkpoint(cfg.resume)
        step.load_state_dict(ckpt["step"])
        set_rng_state(ckpt["rng"])
        start_iter, run_id = ckpt["iteration"], ckpt.get("mlflow_run_id")
        best = ckpt.get("best", best)

    tags = {
        "exp": cfg.exp_name,
        "device": device_name(device),
        "torch": torch.__version__,
        "fid_extractor": cfg.eval.extractor,
        "output_dir": str(output_dir.resolve()),
        **_git_tags(),
    }
    tracker = tracker_factory(cfg.tracking, run_name=f"{cfg.exp_name}-{output_dir.name}", resume_run_id=run_id, tags=tags) \
        if is_main else Tracker()
    tracker.set_tags({"output_dir": str(output_dir.resolve()), "status_detail": "running"})
    tracker.log_params(flatten(cfg))
    config_path = output_dir / "config.yaml"
    config_path.write_text(OmegaConf.to_yaml(OmegaConf.structured(cfg)))
    tracker.log_artifact(config_path)

    loader = build_loader(dataset, t_cfg.batch_size, mem_cfg, device, t_cfg.seed, start_batch=start_iter)
    data_iter = iter(loader)
    memory = PhaseMemory(device)
    side = cfg.model.patch.side
    rays_per_iter = 2 * t_cfg.batch_size * side * side  # D fakes + G fakes
    points_per_ray = cfg.model.render.samples_per_ray + cfg.model.render.importance_samples
    track_other_phases = mem_cfg.track_peak_every > 0  # sample/eval are rare: always measured
    sample_z = torch.randn(t_cfg.num_sample_views, cfg.model.z_dim, generator=torch.Generator().manual_seed(1234))

    state = {"iteration": start_iter, "losses": {}, "eval": {}, "perf": {}}
    window = {"sums": {}, "count": 0, "seconds": 0.0, "timed": 0}
    timing = {"seconds": 0.0, "iterations": 0}
    status, reason, exit_code, message = "FINISHED", None, EXIT_OK, ""

    def checkpoint(path: Path) -> None:
        save_checkpoint(
            {
                "config": OmegaConf.to_container(OmegaConf.structured(cfg), resolve=True),
                "iteration": state["iteration"],
                "step": step.state_dict(),
                "rng": rng_state(),
                "mlflow_run_id": tracker.run_id,
                "tracking_uri": getattr(tracker, "uri", None),
                "num_classes": dataset.num_classes,
                "class_names": dataset.class_names,
                "best": best,
            },
            path,
        )

    def write_samples(iteration: int) -> None:
        with memory.phase("sample", track_live=track_other_phases, state=step.modules_and_optimizers()):
            images = sample_grid(step.sampling_generator, cfg, dataset, sample_z, device)
        path = save_image_grid(images, output_dir / "samples" / f"{iteration:07d}.png", nrow=t_cfg.num_sample_views)
        tracker.log_artifact(path, "samples")
        release_cache()

    def release_cache() -> None:
        if mem_cfg.empty_cache_every:
            gc.collect()
            if device.type == "cuda":
                torch.cuda.empty_cache()

    def run_eval(iteration: int) -> None:
        from grafccsr.metrics import evaluate_generator

        with memory.phase("eval", track_live=track_other_phases, state=step.modules_and_optimizers()):
            result = evaluate_generator(step.sampling_generator, dataset, cfg, device, seed=t_cfg.seed)
        state["eval"] = result
        tracker.log_metrics({f"eval/{k}": result[k] for k in ("fid", "kid_mean", "kid_std")}, step=iteration)
        value = result[cfg.eval.best_metric]
        if value < best["value"]:
            best.update(value=value, iteration=iteration, metric=cfg.eval.best_metric)
            checkpoint(output_dir / BEST_NAME)
        release_cache()

    def log_window(iteration: int) -> None:
        count = max(window["count"], 1)
        losses = {k: v / count for k, v in _to_float(window["sums"]).items()}
        state["losses"] = losses
        metrics = dict(losses)
        if window["timed"]:
            it_per_s = window["timed"] / window["seconds"]
            metrics.update({"perf/it_per_s": it_per_s, "perf/rays_per_s": it_per_s * rays_per_iter,
                            "perf/points_per_s": it_per_s * rays_per_iter * points_per_ray})
        metrics.update(memory.pop_window())
        metrics["mem/process_peak_rss_mb"] = process_peak_rss_mb()
        metrics["train/lr_g"] = step.opt_g.param_groups[0]["lr"]
        tracker.log_metrics(metrics, step=iteration)
        if progress is not None:
            shown = {k.split("/")[-1]: f"{v:.3g}" for k, v in losses.items() if k in ("loss/d", "loss/g")}
            peak = metrics.get("mem/peak_allocated_mb", metrics.get("mem/peak_live_tensors_mb"))
            if peak is not None:
                shown["mem_mb"] = f"{peak:.0f}"
            progress.set_postfix(shown, refresh=False)
        window.update(sums={}, count=0, seconds=0.0, timed=0)

    progress = None
    if is_main and t_cfg.progress:
        from tqdm import tqdm

        progress = tqdm(total=t_cfg.max_iters, initial=start_iter, desc=cfg.exp_name, unit="it", dynamic_ncols=True)

    with _StopRequest() as stop:
        try:
            for iteration in range(start_iter, t_cfg.max_iters):
                state["iteration"] = iteration
                images, labels = _next_batch(data_iter, device, mem_cfg.non_blocking)
                batch = Batch(images, labels)
                every = mem_cfg.track_peak_every
                track = every > 0 and (iteration - start_iter < 2 or iteration % every == 0)
                live_state = step.modules_and_optimizers() + (images, labels)
                t0 = time.perf_counter()
                with memory.phase("d_step", track_live=track, state=live_state):
                    d_losses = step.d_step(batch, iteration)
                with memory.phase("g_step", track_live=track, state=live_state):
                    g_losses = step.g_step(batch, iteration)
                seconds = time.perf_counter() - t0
                if not track:  # the live-tensor tracker slows tracked iterations
                    window["seconds"] += seconds
                    window["timed"] += 1
                    timing["seconds"] += seconds
                    timing["iterations"] += 1
                for k, v in {**d_losses, **g_losses}.items():
                    window["sums"][k] = window["sums"].get(k, 0.0) + v.detach()
                window["count"] += 1
                done = iteration + 1
                state["iteration"] = done
                if progress is not None:
                    progress.update(1)
                if not is_main:
                    continue
                if t_cfg.log_every and done % t_cfg.log_every == 0:
                    log_window(done)
                if t_cfg.sample_every and done % t_cfg.sample_every == 0:
                    write_samples(done)
                if t_cfg.eval_every and done % t_cfg.eval_every == 0:
                    run_eval(done)
                if t_cfg.ckpt_every and done % t_cfg.ckpt_every == 0:
                    checkpoint(output_dir / CHECKPOINT_NAME)
                    release_cache()
                if mem_cfg.empty_cache_every and done % mem_cfg.empty_cache_every == 0:
                    release_cache()
                if stop.requested:
                    raise KeyboardInterrupt
            if is_main:
                if window["count"]:
                    log_window(state["iteration"])
                if not (t_cfg.sample_every and state["iteration"] % t_cfg.sample_every == 0):
                    write_samples(state["iteration"])
                if cfg.eval.at_end and not (t_cfg.eval_every and state["iteration"] % t_cfg.eval_every == 0):
                    run_eval(state["iteration"])
                checkpoint(output_dir / CHECKPOINT_NAME)
        except torch.OutOfMemoryError as err:
            status, reason, exit_code, message = "FAILED", "oom", EXIT_OOM, str(err).splitlines()[0]
        except NonFiniteLoss as err:
            status, reason, exit_code, message = "FAILED", "nonfinite", EXIT_NONFINITE, str(err)
        except KeyboardInterrupt:
            status, reason, exit_code = "KILLED", "interrupted", EXIT_INTERRUPTED
            message = f"stopped by {stop.requested or 'SIGINT'} at iteration {state['iteration']}"
            if is_main:
                checkpoint(output_dir / CHECKPOINT_NAME)
        except Exception as err:
            status, reason, exit_code, message = "FAILED", "error", EXIT_ERROR, f"{type(err).__name__}: {err}"
            raise
        finally:
            if progress is not None:
                progress.close()
            if is_main:
                summary = _summary(cfg, state, memory, timing, tracker, output_dir, device, best,
                                   status, reason, message, rays_per_iter, points_per_ray)
                path = write_summary(output_dir, summary)
                try:
                    tracker.set_tags({"status_detail": reason or "finished", "failure_reason": reason or ""})
                    # run-level figures as the last value of each metric (perf: the run's average)
                    tracker.log_metrics({**memory.summary(), **summary["perf"]}, step=state["iteration"])
                    tracker.log_artifact(path)
                finally:
                    tracker.end(status)
    return RunResult(status, reason, exit_code, summary if is_main else {})


def _next_batch(data_iter, device: torch.device, non_blocking: bool):
    item = next(data_iter)
    return (item["image"].to(device, non_blocking=non_blocking),
            item["label"].to(device, non_blocking=non_blocking))


def sample_grid(generator, cfg: Config, dataset, z: torch.Tensor, device: torch.device) -> torch.Tensor:
    """One row per class, ``num_sample_views`` azimuths at the first elevation, a fixed z per view."""
    views = z.shape[0]
    classes = dataset.num_classes
    u = torch.arange(views, dtype=torch.float32) / views
    u = u.repeat(classes)
    v = torch.full_like(u, cfg.data.elevation_v[0])
    class_idx = torch.arange(classes).repeat_interleave(views)
    z_all = z[:1].expand(classes * views, -1)  # same object, rotating: shows 3D consistency
    was_training = generator.training
    generator.eval()
    try:
        return render_views(
            generator, z_all.to(device), class_idx.to(device), u.to(device), v.to(device),
            radius=cfg.data.camera.radius, image_size=cfg.data.image_size,
            ccsr_mode=cfg.model.ccsr.mode, ccsr_scale=cfg.model.ccsr.scale,
            batch_size=cfg.eval.batch_size, render_chunk=cfg.memory.render_chunk,
            no_grad_segment_points=cfg.memory.no_grad_segment_points,
            to_cpu=cfg.memory.eval_to_cpu,
        )
    finally:
        generator.train(was_training)


def _git_tags() -> Dict[str, str]:
    import subprocess

    from grafccsr.config import PROJECT_ROOT

    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=PROJECT_ROOT, capture_output=True, text=True,
                                timeout=5).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=PROJECT_ROOT,
                               capture_output=True, text=True, timeout=5).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return {}
    return {"git_commit": commit or "none", "git_dirty": str(bool(dirty)).lower()}


def _summary(cfg, state, memory, timing, tracker, output_dir, device, best, status, reason, message,
             rays_per_iter, points_per_ray) -> Dict[str, Any]:
    peaks = memory.summary()
    is_cuda = device.type == "cuda"
    peak_key = "mem/train_peak_reserved_mb" if is_cuda else "mem/train_peak_live_tensors_mb"
    it_per_s = timing["iterations"] / timing["seconds"] if timing["seconds"] > 0 else None
    evaluation = dict(state["eval"])
    if best.get("iteration") is not None:
        evaluation.update(best_value=best["value"], best_iteration=best["iteration"], best_metric=best.get("metric"))
    return {
        "status": status,
        "reason": reason,
        "message": message,
        "iteration": state["iteration"],
        "max_iters": cfg.train.max_iters,
        "exp_name": cfg.exp_name,
        "mlflow_run_id": tracker.run_id,
        "tracking_uri": getattr(tracker, "uri", None),
        "device": device_name(device),
        "memory": peaks,
        "peak_memory_mb": peaks.get(peak_key),
        "peak_memory_measure": "cuda_peak_reserved" if is_cuda else "peak_live_tensors",
        "peak_memory_scope": "training step (d_step, g_step); see memory for sample/eval",
        "process_peak_rss_mb": process_peak_rss_mb(),
        "perf": {} if it_per_s is None else {
            "perf/it_per_s": it_per_s,
            "perf/rays_per_s": it_per_s * rays_per_iter,
            "perf/points_per_s": it_per_s * rays_per_iter * points_per_ray,
        },
        "losses": state["losses"],
        "eval": evaluation,
        "fid_extractor": cfg.eval.extractor,
        "output_dir": str(Path(output_dir).resolve()),
        "checkpoint": str(Path(output_dir).resolve() / CHECKPOINT_NAME),
    }
