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
import logging
import math
import os
import queue
import re
import threading
import time
from collections import Counter
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple

import numpy as np
from mlflow.entities import Dataset, DatasetInput, InputTag, Metric, Param, RunTag
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient
from PIL import Image

from grafccsr.config import ConfigError, TrackingConfig
from grafccsr.tracking import ui
from grafccsr.tracking.base import Tracker
from grafccsr.tracking.store import (CHECKPOINT_TAG, apply_http_settings, artifact_root_for, http_settings, is_server,
                                     resolve_uri, run_url)

PARAM_MAX_CHARS = 6000
log = logging.getLogger("grafccsr.tracking")
EXPERIMENT_KIND = {"mlflow.experimentKind": "custom_model_development"}
"""Tag that marks an experiment as model training (MLflow 3's UI otherwise opens GenAI views)."""


def get_or_create_experiment(client, name: str, uri: str) -> str:
    """The experiment's id; created (race-free across processes) as a model-training experiment,
    with the saved runs-table view and the description of :mod:`grafccsr.tracking.ui` (given once:
    an experiment from before them gets them on its next run; one a user deleted stays deleted)."""
    experiment = client.get_experiment_by_name(name)
    if experiment is None:
        try:
            experiment_id = client.create_experiment(name, artifact_location=artifact_root_for(uri),
                                                     tags=EXPERIMENT_KIND)
        except MlflowException:  # another process created it meanwhile
            experiment = client.get_experiment_by_name(name)
            if experiment is None:
                raise
        else:
            experiment = client.get_experiment(experiment_id)
    missing = {} if experiment.tags.get(ui.UI_MARKER_TAG) else {
        **ui.results_view_tag(), "mlflow.note.content": ui.experiment_note(experiment.experiment_id),
        ui.UI_MARKER_TAG: "1"}
    if experiment.tags.get("mlflow.experimentKind") is None:
        missing.update(EXPERIMENT_KIND)
    for key, value in missing.items():
        if key == "mlflow.note.content" and experiment.tags.get(key):
            continue  # a description the user wrote
        client.set_experiment_tag(experiment.experiment_id, key, value)
    return experiment.experiment_id


class TrackingUnavailable(ConfigError):
    """The tracking server cannot be reached, or refuses this client, before the run starts."""


def failure_cause(err: BaseException) -> str:
    """A failed MLflow call's cause in a few words: the OS error, a timeout, or the HTTP status."""
    text = str(err)
    errno_text = re.search(r"\[Errno -?\d+\] [^'\")\]]+", text)
    if errno_text:
        return errno_text.group(0).strip()
    if "timed out" in text.lower() or "timeout" in text.lower():
        return "no answer within the request timeout"
    status = http_status(err)
    if status is not None:
        return f"HTTP {status}"
    return text.strip().splitlines()[0][:200] if text.strip() else type(err).__name__


def http_status(err: BaseException) -> Optional[int]:
    """The HTTP status of a failed MLflow call, when the server answered."""
    match = re.search(r"error code (\d{3})|too many (\d{3}) error responses|\b(\d{3}) (?:UNAUTHORIZED|FORBIDDEN)",
                      str(err))
    if match:
        return int(next(g for g in match.groups() if g))
    code = getattr(err, "get_http_status_code", None)
    status = code() if callable(code) else None
    return status if isinstance(status, int) and status != 500 else None


def explain(uri: str, err: BaseException) -> str:
    """What a user does about a tracking server that refused or did not answer."""
    status, cause = http_status(err), failure_cause(err)
    if status == 401:
        return (f"tracking.uri={uri}: the MLflow server asks for credentials (HTTP 401); set "
                "MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD (`python -m grafccsr.services env` prints "
                "them for servers it started)")
    if status == 403:
        return f"tracking.uri={uri}: the MLflow server refused this user (HTTP 403)"
    if status is not None and status < 500:
        return f"tracking.uri={uri}: the MLflow server refused the request ({cause}: {str(err).splitlines()[0][:200]})"
    return (f"tracking.uri={uri}: cannot reach the MLflow server ({cause}); start it (`make services` prints its "
            "URI) or train without it: tracking=none")


def check_server(uri: str, timeout_s: int) -> None:
    """One request, no retries, at most ``timeout_s``: the server answers and accepts this
    client, or :class:`TrackingUnavailable` says why (before anything is created)."""
    if not is_server(uri):
        return
    settings = http_settings(timeout_s, 0)
    saved = {key: os.environ.get(key) for key in settings}
    os.environ.update(settings)
    try:
        MlflowClient(tracking_uri=uri).search_experiments(max_results=1)
    except Exception as err:  # noqa: BLE001 - MLflow wraps connection errors; requests may raise its own
        raise TrackingUnavailable(explain(uri, err)) from None
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


@dataclass
class _Call:
    kind: str
    """params, tags, metrics, image, artifact, checkpoint, dataset, system_metrics, end."""
    send: Callable[[], Any]
    keep: bool = False
    """Kept while the server is lost and sent when it is back (metrics: small, and lost forever
    otherwise); other calls are skipped then (their files stay in the run folder)."""
    force: bool = False
    """Tried even while the server is lost (the run's final status)."""
    step: int = 0
    """The training iteration it was made at."""


class _Outbox:
    """Tracking calls, sent in order on one background thread: training never waits for the
    server. A call that fails for want of a server (no connection, a timeout, a 5xx after
    MLflow's own retries) marks it lost: one warning line, then calls are held (metrics) or
    skipped (images, uploads) until ``retry_s`` has passed, when the next call tries it again;
    the first one that gets through brings it back (one line) and sends the held metrics."""

    MAX_PENDING = 10000
    MAX_KEPT = 20000

    def __init__(self, uri: str, retry_s: float) -> None:
        self.uri, self.retry_s = uri, retry_s
        self.step = 0
        self.queue: "queue.Queue[Optional[_Call]]" = queue.Queue()
        self.kept: List[_Call] = []
        self.skipped: Counter = Counter()
        self.refused = 0
        self.lost_at: Optional[int] = None
        self.next_try = 0.0
        self.history: Dict[str, Any] = {"lost_at_iteration": None, "back_at_iteration": None, "times_lost": 0,
                                        "lost_cause": None}
        self.thread = threading.Thread(target=self._run, name="mlflow-outbox", daemon=True)
        self.thread.start()

    def put(self, call: _Call) -> None:
        call.step = self.step
        if self.queue.qsize() >= self.MAX_PENDING:  # a server slower than training: drop, never block
            self.skipped[call.kind] += 1
            return
        self.queue.put(call)

    def close(self) -> None:
        """Wait for what is queued: each call is bounded by MLflow's HTTP settings, and calls
        after a loss are skipped at once."""
        self.queue.put(None)
        self.thread.join()

    def _run(self) -> None:
        while (call := self.queue.get()) is not None:
            self._send(call)

    def _send(self, call: _Call) -> None:
        if self.lost_at is not None and not call.force and time.monotonic() < self.next_try:
            self._hold(call)
            return
        try:
            call.send()
        except Exception as err:  # noqa: BLE001 - any failure of a tracking call must leave training alone
            self._failed(call, err)
            return
        if self.lost_at is not None:
            self._back(call.step)

    def _hold(self, call: _Call) -> None:
        if call.keep and len(self.kept) < self.MAX_KEPT:
            self.kept.append(call)
        else:
            self.skipped[call.kind] += 1

    def _failed(self, call: _Call, err: BaseException) -> None:
        status = http_status(err)
        if status is not None and 400 <= status < 500 and status not in (408, 429):
            if not self.refused:  # the server is there but rejects this call (permissions, a bad value)
                log.warning("MLflow refused a %s call (%s); training goes on", call.kind, failure_cause(err))
            self.refused += 1
            return
        if self.lost_at is None:
            self.lost_at = call.step
            self.history["times_lost"] += 1
            if self.history["lost_at_iteration"] is None:
                self.history.update(lost_at_iteration=call.step, lost_cause=failure_cause(err))
            log.warning("MLflow server %s lost at iteration %d (%s); training goes on, metrics.json, checkpoints "
                        "and samples keep going to the run folder; trying the server again every %g s", self.uri,
                        call.step, failure_cause(err), self.retry_s)
        self.next_try = time.monotonic() + self.retry_s
        self._hold(call)

    def _back(self, step: int) -> None:
        lost_at, self.lost_at = self.lost_at, None
        self.history["back_at_iteration"] = step
        held, self.kept = self.kept, []
        for i, call in enumerate(held):
            try:
                call.send()
            except Exception as err:  # noqa: BLE001 - lost again: keep the rest
                self._failed(call, err)
                self.kept.extend(held[i + 1:])
                return
        skipped = ", ".join(f"{n} {kind}" for kind, n in sorted(self.skipped.items()))
        log.warning("MLflow server %s back at iteration %d (lost since iteration %d); %d metric batches sent late%s",
                    self.uri, step, lost_at, len(held), f"; not sent meanwhile: {skipped}" if skipped else "")

    def report(self) -> Dict[str, Any]:
        state = "lost" if self.lost_at is not None else ("recovered" if self.history["times_lost"] else "ok")
        return {"uri": self.uri, "state": state, **self.history, "not_sent": dict(self.skipped),
                "metric_batches_not_sent": len(self.kept), "refused_calls": self.refused}


class MlflowTracker(Tracker):
    """One MLflow run. The run is created (or resumed) at once, bounded by MLflow's HTTP
    settings (``tracking.request_timeout_s``, ``tracking.request_retries``): a server that does
    not answer is :class:`TrackingUnavailable`. Every later call goes through an
    :class:`_Outbox`: a server lost mid-run never stops or slows training."""

    def __init__(self, cfg: TrackingConfig, run_name: str, resume_run_id: Optional[str] = None,
                 tags: Optional[Dict[str, str]] = None) -> None:
        apply_http_settings(cfg.request_timeout_s, cfg.request_retries)
        # urllib3 warns once per retry; the loss of the server is one line of ours instead
        logging.getLogger("urllib3.connectionpool").setLevel(logging.ERROR)
        self.uri = resolve_uri(cfg.uri)
        self.client = MlflowClient(tracking_uri=self.uri)
        try:
            run = self._open_run(cfg, run_name, resume_run_id, tags)
        except MlflowException as err:
            raise TrackingUnavailable(explain(self.uri, err)) from None
        self.run_id, self.experiment_id = run.info.run_id, run.info.experiment_id
        self.url = run_url(self.uri, self.experiment_id, self.run_id)
        self.outbox = _Outbox(self.uri, cfg.lost_retry_s)
        self.monitor = None
        if cfg.system_metrics:
            self.monitor = _system_metrics(self.run_id, self.uri, cfg.system_metrics_interval_s, resume=self.resumed)

    def _open_run(self, cfg: TrackingConfig, run_name: str, resume_run_id: Optional[str],
                  tags: Optional[Dict[str, str]]):
        self.resumed = bool(resume_run_id)
        if resume_run_id:
            run = self.client.get_run(resume_run_id)
            self.client.update_run(run.info.run_id, status="RUNNING")
            return run
        experiment_id = get_or_create_experiment(self.client, cfg.experiment, self.uri)
        run_tags = {**cfg.tags, **(tags or {}), "mlflow.runName": cfg.run_name or run_name}
        if cfg.parent_run_id:
            run_tags["mlflow.parentRunId"] = cfg.parent_run_id
        return self.client.create_run(experiment_id, tags=run_tags, run_name=cfg.run_name or run_name)

    def _put(self, kind: str, send: Callable[[], Any], keep: bool = False, force: bool = False) -> None:
        self.outbox.put(_Call(kind, send, keep=keep, force=force))

    def log_params(self, params: Mapping[str, Any]) -> None:
        if self.resumed:  # params are immutable in MLflow; the resumed run keeps its own
            return
        items = [Param(k, str(v)[:PARAM_MAX_CHARS]) for k, v in params.items()]
        for start in range(0, len(items), 100):
            self._put("params", partial(self.client.log_batch, self.run_id, params=items[start:start + 100],
                                        synchronous=True))

    def set_tags(self, tags: Mapping[str, Any]) -> None:
        items = [RunTag(k, str(v)) for k, v in tags.items()]
        self._put("tags", partial(self.client.log_batch, self.run_id, tags=items, synchronous=True))

    def log_metrics(self, metrics: Mapping[str, float], step: int) -> None:
        self.outbox.step = step
        now = int(time.time() * 1000)
        items = [Metric(k, float(v), now, step) for k, v in metrics.items() if v is not None and math.isfinite(float(v))]
        for start in range(0, len(items), 1000):
            self._put("metrics", partial(self.client.log_batch, self.run_id, metrics=items[start:start + 1000],
                                         synchronous=True), keep=True)

    def log_artifact(self, path: Path, artifact_path: Optional[str] = None) -> None:
        self._put("artifact", partial(self.client.log_artifact, self.run_id, str(path), artifact_path))

    def log_image(self, path: Path, key: str, step: int) -> None:
        self.outbox.step = max(self.outbox.step, step)

        def send() -> None:
            with Image.open(path) as image:
                self.client.log_image(self.run_id, np.asarray(image.convert("RGB")), key=key, step=step)

        self._put("image", send)

    def log_dataset(self, dataset: Any) -> None:
        entity = Dataset(
            name=Path(dataset.root).name, digest=dataset.fingerprint, source_type="local",
            source=json.dumps({"uri": str(Path(dataset.root).resolve())}),
            profile=json.dumps({"images": len(dataset), "classes": dataset.num_classes,
                                "image_size": dataset.image_size}),
        )
        inputs = [DatasetInput(entity, tags=[InputTag("mlflow.data.context", "training")])]
        self._put("dataset", partial(self.client.log_inputs, self.run_id, inputs))

    def log_checkpoint(self, path: Path, iteration: int) -> None:
        """Upload under a path never reused (``checkpoints/<iteration>/``), then point
        :data:`CHECKPOINT_TAG` at it: a reader never sees a half-uploaded checkpoint."""
        folder = f"checkpoints/{iteration:08d}"
        self.outbox.step = max(self.outbox.step, iteration)

        def send() -> None:
            self.client.log_artifact(self.run_id, str(path), folder)
            self.client.set_tag(self.run_id, CHECKPOINT_TAG, f"{folder}/{Path(path).name}")

        self._put("checkpoint", send)

    def describe(self, summary: Mapping[str, Any], command: str, files: Sequence[str] = ()) -> None:
        self.set_tags({"mlflow.note.content": ui.run_note(summary, command, self.experiment_id, self.run_id, files)})

    def end(self, status: str) -> None:
        """Send what is queued and the run's status; returns once done or skipped (bounded)."""
        if self.monitor is not None:
            self._put("system_metrics", self.monitor.finish)
        self._put("end", partial(self.client.set_terminated, self.run_id, status=status), force=True)
        self.outbox.close()

    def report(self) -> Dict[str, Any]:
        return self.outbox.report()


def _system_metrics(run_id: str, uri: str, interval_s: float, resume: bool):
    """MLflow's CPU/GPU/memory monitor (``system/*`` metrics) for this run, or None when its
    optional dependencies (psutil; nvidia-ml-py for GPUs) are missing."""
    # its thread warns on every failure to reach the server, which the outbox reports once
    logging.getLogger("mlflow.system_metrics").setLevel(logging.CRITICAL)
    try:
        from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

        monitor = SystemMetricsMonitor(run_id, sampling_interval=interval_s, samples_before_logging=1,
                                       resume_logging=resume, tracking_uri=uri)
    except ImportError:
        return None
    monitor.start()
    return monitor


def log_evaluation(uri: str, training_run_id: str, name: str, iteration: int, values: Mapping[str, float],
                   extractor: Optional[str], files, extractor_tag: str) -> Tuple[str, str]:
    """A child run of the training run holding one evaluation (``values`` under their logged keys
    at the checkpoint's iteration, the extractor as a tag, files as artifacts): the training run's
    own record is never written over. Returns (child run id, its UI link)."""

    client = MlflowClient(tracking_uri=uri)
    parent = client.get_run(training_run_id)
    tags = {"mlflow.parentRunId": training_run_id, "mlflow.runName": name, "evaluation_of": training_run_id,
            "evaluated_iteration": str(iteration)}
    if extractor is not None:
        tags[extractor_tag] = extractor
    run = client.create_run(parent.info.experiment_id, tags=tags, run_name=name)
    run_id = run.info.run_id
    try:
        if values:
            now = int(time.time() * 1000)
            client.log_batch(run_id, metrics=[Metric(k, float(v), now, iteration) for k, v in values.items()],
                             synchronous=True)
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
