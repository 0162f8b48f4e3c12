"""MLflow side of a sweep: one parent run per study (found again by its ``sweep_study`` tag, so
a resumed study reuses it), child runs made by the training subprocesses
(``tracking.parent_run_id``), and the Pareto front logged on the parent at the end."""

from __future__ import annotations

import json
import tempfile
import time
from pathlib import Path
from typing import Any, Dict, Optional, Sequence

from grafccsr.paths import default_tracking_uri
from grafccsr.sweeping.pareto import pareto_payload, plot_front, plot_front_html, trial_row
from grafccsr.sweeping.spec import StudySpec
from grafccsr.sweeping.storage import resolve_storage_url

PARENT_ATTR = "mlflow_parent_run_id"
PARENT_URI_ATTR = "mlflow_tracking_uri"


def resolve_tracking_uri(uri: Optional[str]) -> Optional[str]:
    """None for ``none``/``off`` (no MLflow); absolute path for a relative SQLite URI."""
    if uri is not None and uri.lower() in ("none", "off", "false", ""):
        return None
    if uri is None:
        return default_tracking_uri()
    return resolve_storage_url(uri) if uri.startswith("sqlite:///") else uri


class SweepTracker:
    def __init__(self, uri: str, spec: StudySpec, storage_label: str) -> None:
        from mlflow.tracking import MlflowClient

        self.uri = uri
        self.spec = spec
        self.storage_label = storage_label
        self.client = MlflowClient(tracking_uri=uri)
        self.run_id: Optional[str] = None
        self.experiment_id: Optional[str] = None

    # -------------------------------------------------------------- parent run
    def ensure_parent(self, study) -> str:
        """Reuse the study's parent run (study user attr, else tag search), or create it.
        Call under the study lock so that concurrent sweep processes agree on one parent."""
        from grafccsr.tracking.mlflow import get_or_create_experiment

        try:
            self.experiment_id = get_or_create_experiment(self.client, self.spec.experiment_name, self.uri)
        except Exception:  # created concurrently by a training process or another sweep
            self.experiment_id = self.client.get_experiment_by_name(self.spec.experiment_name).experiment_id
        run_id = None
        attrs = study.user_attrs
        if attrs.get(PARENT_URI_ATTR) == self.uri and attrs.get(PARENT_ATTR):
            try:
                run = self.client.get_run(attrs[PARENT_ATTR])
                if run.info.lifecycle_stage == "active":
                    run_id = run.info.run_id
            except Exception:
                run_id = None
        if run_id is None:
            name = self.spec.study_name.replace("'", "")
            found = self.client.search_runs(
                [self.experiment_id], filter_string=f"tags.sweep_study = '{name}' and tags.sweep_role = 'parent'",
                order_by=["attributes.start_time ASC"], max_results=20)
            same_storage = [r for r in found if r.data.tags.get("sweep_storage") == self.storage_label]
            chosen = (same_storage or found or [None])[0]
            run_id = chosen.info.run_id if chosen is not None else None
        if run_id is None:
            run_id = self._create_parent()
        else:
            self.client.update_run(run_id, status="RUNNING")
        study.set_user_attr(PARENT_ATTR, run_id)
        study.set_user_attr(PARENT_URI_ATTR, self.uri)
        self.run_id = run_id
        return run_id

    def _create_parent(self) -> str:
        from mlflow.entities import Param

        spec = self.spec
        tags = {"sweep_study": spec.study_name, "sweep_role": "parent", "sweep_storage": self.storage_label,
                "sweep_sampler": spec.sampler, "mlflow.runName": f"sweep-{spec.study_name}"}
        if spec.source is not None:
            tags["sweep_file"] = str(spec.source)
        run = self.client.create_run(self.experiment_id, tags=tags, run_name=f"sweep-{spec.study_name}")
        params = {
            "study_name": spec.study_name,
            "sampler": spec.sampler,
            "seed": spec.seed,
            "sampler_options": json.dumps(spec.sampler_options, sort_keys=True),
            "search_space": json.dumps(spec.search_space_json(), sort_keys=True),
            "storage": self.storage_label,
            "objectives": json.dumps([{"metric": o.metric, "direction": o.direction} for o in spec.objectives]),
            "memory_budget_mb": spec.memory_budget_mb,
            "base_overrides": json.dumps(spec.base_overrides),
            "n_trials": spec.n_trials,
            "timeout_per_trial_s": spec.timeout_per_trial_s,
        }
        self.client.log_batch(run.info.run_id, params=[Param(k, str(v)[:6000]) for k, v in params.items()],
                              synchronous=True)
        return run.info.run_id

    # -------------------------------------------------------------- child runs
    def annotate_child(self, run_id: str, trial_number: int, state: str, reason: Optional[str],
                       message: str, extra_tags: Optional[Dict[str, Any]] = None) -> None:
        """Tag a training run with its trial and where it ran (``launcher``, ``ranks``,
        ``job_id``, ``host``); make sure a failed/stopped run is not left RUNNING."""
        from mlflow.entities import RunTag

        tags = {"optuna_study": self.spec.study_name, "optuna_trial_number": str(trial_number),
                "optuna_state": state, **{k: str(v) for k, v in (extra_tags or {}).items() if v is not None}}
        if reason:
            tags["failure_reason"] = reason
            tags["failure_message"] = message[:4000]
        self.client.log_batch(run_id, tags=[RunTag(k, v) for k, v in tags.items()], synchronous=True)
        if reason:
            run = self.client.get_run(run_id)
            if run.info.status in ("RUNNING", "SCHEDULED"):
                self.client.set_terminated(run_id, status="KILLED" if reason in ("timeout", "interrupted") else "FAILED")

    def record_unlaunched(self, trial_number: int, params: Dict[str, Any], state: str, reason: str,
                          message: str, extra_tags: Optional[Dict[str, str]] = None) -> str:
        """A child run for a trial that produced none (config error, crash before tracking,
        skipped by the memory estimate), so MLflow lists every trial of the study."""
        from mlflow.entities import Param

        name = f"{self.spec.study_name}-trial-{trial_number}"
        tags = {"mlflow.parentRunId": self.run_id, "mlflow.runName": name, "optuna_study": self.spec.study_name,
                "optuna_trial_number": str(trial_number), "optuna_state": state, "failure_reason": reason,
                "failure_message": message[:4000], **(extra_tags or {})}
        run = self.client.create_run(self.experiment_id, tags=tags, run_name=name)
        if params:
            self.client.log_batch(run.info.run_id, params=[Param(k, str(v)) for k, v in params.items()],
                                  synchronous=True)
        self.client.set_terminated(run.info.run_id, status="KILLED" if state == "PRUNED" else "FAILED")
        return run.info.run_id

    def find_child(self, trial_number: int) -> Optional[str]:
        """The MLflow run a trial's trainer created (tags ``optuna_study``/``optuna_trial_number``
        are passed to every trainer at launch), or None."""
        name = self.spec.study_name.replace("'", "")
        found = self.client.search_runs(
            [self.experiment_id], max_results=5, order_by=["attributes.start_time DESC"],
            filter_string=f"tags.optuna_study = '{name}' and tags.optuna_trial_number = '{int(trial_number)}'")
        for run in found:
            if run.data.tags.get("mlflow.parentRunId") == self.run_id:
                return run.info.run_id
        return found[0].info.run_id if found else None

    def close_lost(self, trial, message: str, extra_tags: Optional[Dict[str, Any]] = None) -> str:
        """A trial whose sweep process died (stale heartbeat): its MLflow run ends FAILED with
        ``failure_reason=worker_lost`` (not left RUNNING, nor KILLED by the trainer's own SIGTERM
        handling); a trial that never got as far as a run gets one, so MLflow lists it too."""
        from mlflow.entities import RunTag

        run_id = trial.user_attrs.get("mlflow_run_id") or self.find_child(trial.number)
        if run_id is None:
            return self.record_unlaunched(trial.number, dict(trial.params), "FAIL", "worker_lost", message,
                                          {k: str(v) for k, v in (extra_tags or {}).items() if v is not None})
        tags = {"optuna_study": self.spec.study_name, "optuna_trial_number": str(trial.number), "optuna_state": "FAIL",
                "failure_reason": "worker_lost", "failure_message": message[:4000], "status_detail": "worker_lost",
                **{k: str(v) for k, v in (extra_tags or {}).items() if v is not None}}
        self.client.log_batch(run_id, tags=[RunTag(k, v) for k, v in tags.items()], synchronous=True)
        if self.client.get_run(run_id).info.status != "FAILED":
            self.client.set_terminated(run_id, status="FAILED")
        return run_id

    # -------------------------------------------------------------- end of sweep
    def log_results(self, study, front: Sequence[Any], status: str = "FINISHED", terminate: bool = True) -> None:
        """Pareto front on the parent run: ``pareto.json`` (latest, overwritten), an MLflow
        table ``pareto_tables/after_<N>_trials.json`` (one per distinct study size: log_table
        appends to an existing file, so it is never re-logged), ``trials.json``, ``pareto.png``
        (and ``pareto.html`` with plotly), and count metrics. ``terminate=False`` (other sweep
        processes still run trials of the study) leaves the parent RUNNING for the last one."""
        import pandas as pd
        from mlflow.entities import Metric
        from optuna.trial import TrialState

        spec, run_id = self.spec, self.run_id
        payload = pareto_payload(study, spec, front)
        trials = study.get_trials(deepcopy=False)
        self.client.log_dict(run_id, payload, "pareto.json")
        self.client.log_dict(run_id, {"trials": [trial_row(t, spec) for t in trials]}, "trials.json")
        finished = [t for t in trials if t.state.is_finished()]
        table_file = f"pareto_tables/after_{len(finished)}_trials.json"
        existing = {f.path for f in self.client.list_artifacts(run_id, "pareto_tables")}
        if front and table_file not in existing:
            rows = []
            for row in payload["pareto"]:
                flat = {k: v for k, v in row.items() if k != "constraints"}
                flat["constraints"] = json.dumps(row["constraints"])
                rows.append(flat)
            self.client.log_table(run_id, data=pd.DataFrame(rows), artifact_file=table_file)
        with tempfile.TemporaryDirectory() as tmp:
            png = plot_front(study, spec, front, Path(tmp) / "pareto.png")
            if png is not None:
                self.client.log_artifact(run_id, str(png))
            html = plot_front_html(study, spec, Path(tmp) / "pareto.html")
            if html is not None:
                self.client.log_artifact(run_id, str(html))
        counts = {s.name.lower(): 0 for s in (TrialState.COMPLETE, TrialState.FAIL, TrialState.PRUNED)}
        for t in trials:
            if t.state.name.lower() in counts:
                counts[t.state.name.lower()] += 1
        now = int(time.time() * 1000)
        metrics = [Metric(f"sweep/n_{k}", float(v), now, len(finished)) for k, v in counts.items()]
        metrics.append(Metric("sweep/n_pareto", float(len(front)), now, len(finished)))
        metrics.append(Metric("sweep/n_infeasible", float(sum(
            1 for t in trials if t.state == TrialState.COMPLETE and any(v > 0 for v in t.constraints.values()))),
            now, len(finished)))
        self.client.log_batch(run_id, metrics=metrics, synchronous=True)
        if terminate:
            self.client.set_terminated(run_id, status=status)
