"""A checkpoint's generator, ready to render: the stored config (with overrides on top),
the EMA generator (else the raw one) on the configured device, and where it came from."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

import torch

from grafccsr.config import Config, ConfigError, apply_overrides
from grafccsr.models import build_models
from grafccsr.training.build import resolve_device
from grafccsr.tracking.store import CHECKPOINT_TAG
from grafccsr.training.checkpoint import BEST_NAME, CHECKPOINT_NAME, CheckpointError, load_checkpoint

EVAL_OVERRIDE_PREFIXES = ("eval.", "memory.", "tracking.", "train.device=", "data.root=")
"""What may change on top of a checkpoint's config: how to evaluate, not what was trained."""


@dataclass
class EvalModel:
    path: Path
    cfg: Config
    generator: torch.nn.Module
    source: str
    """``generator_ema`` or ``generator``."""
    device: torch.device
    num_classes: int
    class_names: List[str]
    iteration: int
    run_id: Optional[str]
    tracking_uri: Optional[str]


def check_eval_overrides(overrides: Sequence[str]) -> None:
    for item in overrides:
        if not item.startswith(EVAL_OVERRIDE_PREFIXES):
            allowed = ", ".join(p + ("*" if p.endswith(".") else "...") for p in EVAL_OVERRIDE_PREFIXES)
            raise ConfigError(f"{item.split('=', 1)[0]} cannot be set here: the model and data config come from the "
                              f"checkpoint; allowed: {allowed}")


def load_eval_model(path: Path, overrides: Sequence[str] = (), state: Optional[Dict[str, Any]] = None) -> EvalModel:
    """The generator stored in checkpoint ``path`` (a file; ``state`` if already loaded)."""
    check_eval_overrides(overrides)
    state = state if state is not None else load_checkpoint(path)
    cfg = apply_overrides(state["config"], overrides)
    num_classes = int(state.get("num_classes") or 0)
    if num_classes <= 0:
        raise CheckpointError(f"{path} does not record num_classes")
    device = resolve_device(cfg.train.device)
    generator, _ = build_models(cfg, num_classes)
    ema = state["step"].get("generator_ema")
    generator.load_state_dict(ema if ema is not None else state["step"]["generator"])
    generator.to(device).eval().requires_grad_(False)
    return EvalModel(
        path=Path(path), cfg=cfg, generator=generator, source="generator_ema" if ema is not None else "generator",
        device=device, num_classes=num_classes,
        class_names=list(state.get("class_names") or [str(k) for k in range(num_classes)]),
        iteration=int(state.get("iteration", 0)), run_id=state.get("mlflow_run_id"),
        tracking_uri=state.get("tracking_uri"),
    )


def checkpoint_in(folder_or_file: str | Path, best: bool = False) -> Path:
    path = Path(folder_or_file).expanduser()
    if path.is_dir():
        path = path / (BEST_NAME if best else CHECKPOINT_NAME)
    if not path.is_file():
        raise CheckpointError(f"no checkpoint at {path}")
    return path


def find_run_checkpoint(run_id: str, uri: str, best: bool = False) -> tuple[Path, Dict[str, Any]]:
    """The checkpoint of an MLflow training run (found through its ``output_dir`` tag), loaded,
    and checked to belong to that run: a folder reused by another run is refused."""
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    try:
        run = MlflowClient(tracking_uri=uri).get_run(run_id)
    except MlflowException as err:
        raise ConfigError(f"--run-id {run_id}: no such run in {uri} ({str(err).splitlines()[0]})") from None
    output_dir = run.data.tags.get("output_dir") or run.data.params.get("output_dir")
    if output_dir and Path(output_dir, BEST_NAME if best else CHECKPOINT_NAME).is_file():
        path = checkpoint_in(output_dir, best)
    elif not best and run.data.tags.get(CHECKPOINT_TAG):  # the run folder is on another machine
        from grafccsr.tracking.mlflow import fetch_checkpoint  # imports mlflow

        path = fetch_checkpoint(run_id, uri, Path("runs") / "resumed" / run_id / "download")
    else:
        raise CheckpointError(f"run {run_id}: no checkpoint in {output_dir or 'its output_dir'} and none uploaded "
                              "to MLflow (tracking.log_checkpoints=true uploads them); pass --ckpt PATH instead")
    state = load_checkpoint(path)
    owner = state.get("mlflow_run_id")
    if owner != run_id:
        raise CheckpointError(f"{path} belongs to MLflow run {owner}, not {run_id} (the run folder was reused or "
                              "moved); pass --ckpt PATH to evaluate it anyway")
    return path, state
