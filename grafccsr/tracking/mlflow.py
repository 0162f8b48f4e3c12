"""MLflow run lifecycle through ``MlflowClient`` (no global active run, so the training step
and loop stay free of global state).

This module imports mlflow (seconds): the rest of the package imports it only when MLflow is
used. Default store: ``sqlite:///<project>/mlflow.db`` with artifacts beside it in ``mlartifacts/``,
so ``mlflow ui`` at the project root shows every run. Experiments are created as model
training experiments (``mlflow.experimentKind``), and printed links open the UI's model
training view (``?workflowType=machine_learning``), not its GenAI view.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Any, Dict, Mapping, Optional, Tuple

import numpy as np
from mlflow.entities import Dataset, DatasetInput, InputTag, Metric, Param, RunTag
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient
from PIL import Image

from grafccsr.config import ConfigError, TrackingConfig
from grafccsr.tracking.base import Tracker
from grafccsr.tracking.store import CHECKPOINT_TAG, artifact_root_for, resolve_uri, run_url

PARAM_MAX_CHARS = 6000
EXPERIMENT_KIND = {"mlflow.experimentKind": "custom_model_development"}
"""Tag that marks an experiment as model training (MLflow 3's UI otherwise opens GenAI views)."""


def get_or_create_experiment(client, name: str, uri: str) -> str:
    """The experiment's id; created (race-free across processes) as a model-training experiment."""
    experiment = client.get_experiment_by_name(name)
    if experiment is None:
        try:
            return client.create_experiment(name, artifact_location=artifact_root_for(uri), tags=EXPERIMENT_KIND)
        except MlflowException:  # another process created it meanwhile
            experiment = client.get_experiment_by_name(name)
            if experiment is None:
                raise
    if experiment.tags.get("mlflow.experimentKind") is None:
        client.set_experiment_tag(experiment.experiment_id, *next(iter(EXPERIMENT_KIND.items())))
    return experiment.experiment_id


class MlflowTracker(Tracker):
    def __init__(self, cfg: TrackingConfig, run_name: str, resume_run_id: Optional[str] = None,
                 tags: Optional[Dict[str, str]] = None) -> None:
        self.uri = resolve_uri(cfg.uri)
        self.client = MlflowClient(tracking_uri=self.uri)
        if resume_run_id:
            run = self.client.get_run(resume_run_id)
            self.run_id = run.info.run_id
            self.client.update_run(self.run_id, status="RUNNING")
            self.resumed = True
        else:
            experiment_id = get_or_create_experiment(self.client, cfg.experiment, self.uri)
            run_tags = {**cfg.tags, **(tags or {}), "mlflow.runName": cfg.run_name or run_name}
            if cfg.parent_run_id:
                run_tags["mlflow.parentRunId"] = cfg.parent_run_id
            run = self.client.create_run(experiment_id, tags=run_tags, run_name=cfg.run_name or run_name)
            self.run_id = run.info.run_id
            self.resumed = False
        self.url = run_url(self.uri, run.info.experiment_id, self.run_id)
        self.pending: list = []
        self.monitor = None
        if cfg.system_metrics:
            self.monitor = _system_metrics(self.run_id, self.uri, cfg.system_metrics_interval_s, resume=self.resumed)

    def log_params(self, params: Mapping[str, Any]) -> None:
        if self.resumed:  # params are immutable in MLflow; the resumed run keeps its own
            return
        items = [Param(k, str(v)[:PARAM_MAX_CHARS]) for k, v in params.items()]
        for start in range(0, len(items), 100):
            self.client.log_batch(self.run_id, params=items[start:start + 100], synchronous=True)

    def set_tags(self, tags: Mapping[str, Any]) -> None:
        self.client.log_batch(self.run_id, tags=[RunTag(k, str(v)) for k, v in tags.items()], synchronous=True)

    def log_metrics(self, metrics: Mapping[str, float], step: int) -> None:
        """Asynchronous: the step does not wait for the store (a server round trip is ~10 ms,
        too much for fast steps logged often); :meth:`end` waits for every pending write."""
        now = int(time.time() * 1000)
        items = [Metric(k, float(v), now, step) for k, v in metrics.items() if v is not None and math.isfinite(float(v))]
        for start in range(0, len(items), 1000):
            self.pending.append(self.client.log_batch(self.run_id, metrics=items[start:start + 1000],
                                                      synchronous=False))

    def log_artifact(self, path: Path, artifact_path: Optional[str] = None) -> None:
        self.client.log_artifact(self.run_id, str(path), artifact_path)

    def log_image(self, path: Path, key: str, step: int) -> None:
        with Image.open(path) as image:
            self.client.log_image(self.run_id, np.asarray(image.convert("RGB")), key=key, step=step)

    def log_dataset(self, dataset: Any) -> None:
        entity = Dataset(
            name=Path(dataset.root).name, digest=dataset.fingerprint, source_type="local",
            source=json.dumps({"uri": str(Path(dataset.root).resolve())}),
            profile=json.dumps({"images": len(dataset), "classes": dataset.num_classes,
                                "image_size": dataset.image_size}),
        )
        self.client.log_inputs(self.run_id, [DatasetInput(entity, tags=[InputTag("mlflow.data.context", "training")])])

    def log_checkpoint(self, path: Path, iteration: int) -> None:
        """Upload under a path never reused (``checkpoints/<iteration>/``), then point
        :data:`CHECKPOINT_TAG` at it: a reader never sees a half-uploaded checkpoint."""
        folder = f"checkpoints/{iteration:08d}"
        self.client.log_artifact(self.run_id, str(path), folder)
        self.client.set_tag(self.run_id, CHECKPOINT_TAG, f"{folder}/{Path(path).name}")

    def end(self, status: str) -> None:
        if self.monitor is not None:
            self.monitor.finish()
        for operation in self.pending:  # every metric written before the run is closed
            operation.wait()
        self.pending.clear()
        self.client.set_terminated(self.run_id, status=status)


def _system_metrics(run_id: str, uri: str, interval_s: float, resume: bool):
    """MLflow's CPU/GPU/memory monitor (``system/*`` metrics) for this run, or None when its
    optional dependencies (psutil; nvidia-ml-py for GPUs) are missing."""
    try:
        from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

        monitor = SystemMetricsMonitor(run_id, sampling_interval=interval_s, samples_before_logging=1,
                                       resume_logging=resume, tracking_uri=uri)
    except ImportError:
        return None
    monitor.start()
    return monitor


def log_evaluation(uri: str, training_run_id: str, name: str, iteration: int, metrics: Optional[Mapping[str, Any]],
                   files, extractor_tag: str) -> Tuple[str, str]:
    """A child run of the training run holding one evaluation (metrics at the checkpoint's
    iteration, files as artifacts): the training run's own record is never written over.
    Returns (child run id, its UI link)."""

    client = MlflowClient(tracking_uri=uri)
    parent = client.get_run(training_run_id)
    tags = {"mlflow.parentRunId": training_run_id, "mlflow.runName": name, "evaluation_of": training_run_id,
            "evaluated_iteration": str(iteration)}
    if metrics is not None:
        tags[extractor_tag] = metrics["extractor"]
    run = client.create_run(parent.info.experiment_id, tags=tags, run_name=name)
    run_id = run.info.run_id
    try:
        if metrics is not None:
            now = int(time.time() * 1000)
            values = [Metric(f"eval/{k}", float(v), now, iteration) for k, v in metrics.items()
                      if k.startswith(("fid", "kid")) and isinstance(v, (int, float)) and math.isfinite(float(v))]
            client.log_batch(run_id, metrics=values, synchronous=True)
        for path in files:
            client.log_artifact(run_id, str(path))
    except Exception:
        client.set_terminated(run_id, status="FAILED")
        raise
    client.set_terminated(run_id, status="FINISHED")
    return run_id, run_url(uri, parent.info.experiment_id, run_id)


def fetch_checkpoint(run_id: str, uri: str, dest: Path) -> Path:
    """Download the newest completely uploaded checkpoint of a run (``tracking.log_checkpoints``)
    into ``dest``; for evaluation or resume on a machine without the run folder."""

    client = MlflowClient(tracking_uri=uri)
    try:
        run = client.get_run(run_id)
    except MlflowException as err:
        raise ConfigError(f"MLflow run {run_id}: not found in {uri} ({str(err).splitlines()[0]})") from None
    artifact = run.data.tags.get(CHECKPOINT_TAG)
    if not artifact:
        raise ConfigError(f"MLflow run {run_id} has no uploaded checkpoint (train with tracking.log_checkpoints=true)")
    dest.mkdir(parents=True, exist_ok=True)
    return Path(client.download_artifacts(run_id, artifact, str(dest)))
