"""A Hydra callback that groups a multirun (``python -m grafccsr.train -m a=1,2``) under one
MLflow parent run: the jobs become its children (``tracking.parent_run_id``, passed through
:data:`PARENT_ENV` to jobs launched in this process or its children)."""

from __future__ import annotations

import os
from typing import Any, Optional

from hydra.experimental.callback import Callback
from omegaconf import DictConfig

from grafccsr.tracking.store import resolve_uri

PARENT_ENV = "GRAFCCSR_PARENT_RUN_ID"


class MultirunParent(Callback):
    def __init__(self) -> None:
        self.run_id: Optional[str] = None
        self.uri: Optional[str] = None
        self.failed = 0

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        if config.tracking.backend != "mlflow" or config.tracking.parent_run_id:
            return
        from mlflow.tracking import MlflowClient

        from grafccsr.tracking.mlflow import get_or_create_experiment  # imports mlflow

        self.uri = resolve_uri(config.tracking.uri)
        client = MlflowClient(tracking_uri=self.uri)
        experiment = get_or_create_experiment(client, config.tracking.experiment, self.uri)
        overrides = " ".join(config.hydra.overrides.task)
        name = f"multirun {config.exp_name} {overrides}"[:250]
        run = client.create_run(experiment, run_name=name,
                                tags={"kind": "multirun", "sweep_dir": str(config.hydra.sweep.dir),
                                      "mlflow.note.content": f"python -m grafccsr.train -m {overrides}"})
        self.run_id = run.info.run_id
        os.environ[PARENT_ENV] = self.run_id

    def on_job_end(self, config: DictConfig, job_return: Any, **kwargs: Any) -> None:
        status = getattr(job_return, "status", None)
        return_value = getattr(job_return, "_return_value", None)
        if status is not None and (status.name == "FAILED" or return_value not in (None, 0)):
            self.failed += 1

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        if self.run_id is None:
            return
        from mlflow.tracking import MlflowClient

        os.environ.pop(PARENT_ENV, None)
        MlflowClient(tracking_uri=self.uri).set_terminated(self.run_id, status="FAILED" if self.failed else "FINISHED")
