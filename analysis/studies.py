"""Optuna studies of a sweep and their MLflow runs, joined into one typed frame.

The storage URL is any that the sweep driver accepts: ``sqlite:///<file>``,
``journal:<file>`` or a database server (``postgresql+psycopg2://USER:PASS@HOST/DB``,
``mysql+pymysql://...``). Reading never creates anything: a missing local file is "no
studies", and a server database is opened without creating Optuna's tables.
"""

from __future__ import annotations

import functools
import json
from typing import Any, Dict, List, Optional

import pandas as pd

from .runs import (QUALITY_COLUMNS, all_experiments, client, load_runs, redact, resolve_tracking_uri,
                           runs_to_frame, search_runs, tag_filter)
from grafccsr.sweeping.storage import JOURNAL_PREFIX, local_file, resolve_storage_url

__all__ = ["open_storage", "study_names", "load_study", "trials_frame", "find_sweep_parent", "load_sweep"]

# Trial user attributes (set by the sweep driver from metrics.json) that fill a run's missing
# value, e.g. for a trial that never reached MLflow.
_ATTR_COLUMNS = (*(c for cols in QUALITY_COLUMNS.values() for c in cols), "it_per_s", "peak_memory_mb",
                 "peak_memory_measure", "fid_extractor", "device")
_STATUS_OF_STATE = {"COMPLETE": "FINISHED", "FAIL": "FAILED", "PRUNED": "KILLED", "RUNNING": "RUNNING",
                    "WAITING": "SCHEDULED"}


def open_storage(url: Optional[str] = None):
    """An Optuna storage for ``url`` (default: the project's ``sweeps/optuna.db``), or None when
    it is a local file that does not exist. Cached per URL (one connection pool per process)."""
    url = resolve_storage_url(url)
    path = local_file(url)
    if path is not None and not path.exists():
        return None
    return _open_storage(url)


@functools.lru_cache(maxsize=8)
def _open_storage(url: str):
    import optuna

    if url.startswith(JOURNAL_PREFIX):
        from optuna.storages.journal import JournalFileBackend

        return optuna.storages.JournalStorage(JournalFileBackend(str(local_file(url))))
    engine_kwargs = {} if url.startswith("sqlite") else {"pool_pre_ping": True}
    try:
        return optuna.storages.RDBStorage(url, engine_kwargs=engine_kwargs, skip_table_creation=True)
    except ImportError as err:  # e.g. psycopg2 for postgresql+psycopg2://
        driver = getattr(err.__cause__, "name", None) or getattr(err, "name", None) or "its database driver"
        raise ImportError(f"reading the Optuna storage {redact(url)} needs the module {driver!r} "
                          "(postgresql+psycopg2://: pip install psycopg2-binary)") from err


def study_names(storage: Optional[str] = None) -> List[str]:
    store = open_storage(storage)
    if store is None:
        return []
    return [s.study_name for s in store.get_all_studies()]


def load_study(name: str, storage: Optional[str] = None):
    """The Optuna study, or None when the storage or the study does not exist."""
    store = open_storage(storage)
    if store is None:
        return None
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    try:
        return optuna.load_study(study_name=name, storage=store)
    except KeyError:  # no study of that name
        return None


def _objective_names(study) -> List[str]:
    objs = study.user_attrs.get("objectives")
    if isinstance(objs, list):
        return [o.get("metric", str(i)) if isinstance(o, dict) else str(o) for i, o in enumerate(objs)]
    names = study.metric_names
    return list(names) if names else []


def trials_frame(study) -> pd.DataFrame:
    """One row per trial: ``trial_number``, ``trial_state``, ``trial_feasible``,
    ``objective.<metric>`` (named by the study's metric names, else ``objective.0``...),
    ``trial_params.<k>``, ``trial_attrs.<k>`` and ``mlflow_run_id``."""
    objectives = _objective_names(study)
    rows = []
    for t in study.get_trials(deepcopy=False):
        row: Dict[str, Any] = {"trial_number": t.number, "trial_state": t.state.name,
                               "trial_feasible": all(v <= 0 for v in t.constraints.values())}
        for i, value in enumerate(t.values or []):
            row[f"objective.{objectives[i] if i < len(objectives) else i}"] = value
        row.update({f"trial_params.{k}": v for k, v in t.params.items()})
        row.update({f"trial_attrs.{k}": v for k, v in t.user_attrs.items()
                    if isinstance(v, (str, int, float, bool)) or v is None})
        row["mlflow_run_id"] = t.user_attrs.get("mlflow_run_id")
        rows.append(row)
    return pd.DataFrame(rows)


def find_sweep_parent(name: str, uri: Optional[str] = None, study=None) -> Optional[Any]:
    """The MLflow parent run of a sweep: the study's ``mlflow_parent_run_id`` attr, else the
    latest run tagged ``sweep_study=<name>`` and ``sweep_role=parent`` in any experiment."""
    from mlflow.exceptions import MlflowException

    cl = client(uri)
    if study is not None and study.user_attrs.get("mlflow_parent_run_id"):
        try:
            run = cl.get_run(study.user_attrs["mlflow_parent_run_id"])
            if run.info.lifecycle_stage == "active":
                return run
        except MlflowException:  # recorded in another tracking store
            pass
    ids = list(all_experiments(cl))
    found = search_runs(cl, ids, tag_filter({"sweep_study": name, "sweep_role": "parent"})) if ids else []
    return found[-1] if found else None


def _join_trials(runs: pd.DataFrame, trials: pd.DataFrame) -> pd.DataFrame:
    """Outer join of runs and trials on the trial's ``mlflow_run_id`` (a trial without a run keeps
    a row, its ``status`` from the trial state); trial attributes fill values the run lacks."""
    if len(runs) and "tags.optuna_trial_number" in runs.columns:
        # runs whose trial lost its mlflow_run_id attr still join through their tag
        by_tag = dict(zip(pd.to_numeric(runs["tags.optuna_trial_number"], errors="coerce"), runs["run_id"]))
        trials["mlflow_run_id"] = [rid if isinstance(rid, str) and rid else by_tag.get(num)
                                   for rid, num in zip(trials["mlflow_run_id"], trials["trial_number"])]
    out = runs.merge(trials, how="outer", left_on="run_id", right_on="mlflow_run_id")
    out["run_id"] = out["run_id"].where(out["run_id"].notna(), out["mlflow_run_id"])
    missing = out["status"].isna()
    out.loc[missing, "status"] = out.loc[missing, "trial_state"].map(_STATUS_OF_STATE)
    for col in ("failure_reason", *_ATTR_COLUMNS):
        attr = f"trial_attrs.{col}"
        if attr in out.columns:
            out[col] = out[col].where(out[col].notna(), out[attr])
    return out.sort_values("trial_number", na_position="last").reset_index(drop=True)


def load_sweep(name: str, uri: Optional[str] = None, storage: Optional[str] = None) -> pd.DataFrame:
    """The child runs of a sweep joined with its Optuna trials (see :func:`_join_trials`).

    The frame's ``attrs`` hold ``study_name``, ``parent_run_id``, ``experiment_id``,
    ``objectives`` ([{metric, direction}]) and ``memory_budget_mb``. Raises LookupError when
    neither the study nor a parent run exists."""
    study = load_study(name, storage)
    parent = find_sweep_parent(name, uri, study)
    if study is None and parent is None:
        raise LookupError(f"no Optuna study {name!r} in {redact(resolve_storage_url(storage))} and no MLflow run "
                          f"tagged sweep_study={name!r} in {redact(resolve_tracking_uri(uri))}")
    runs = load_runs(uri, experiment_ids=[parent.info.experiment_id], parent_run_id=parent.info.run_id) \
        if parent is not None else runs_to_frame([])
    trials = trials_frame(study) if study is not None else pd.DataFrame()
    if len(trials):
        runs = _join_trials(runs, trials)
    budget = study.user_attrs.get("memory_budget_mb") if study is not None else None
    runs.attrs.update(study_name=name, parent_run_id=parent.info.run_id if parent is not None else None,
                      experiment_id=parent.info.experiment_id if parent is not None else None,
                      objectives=_objectives(study, parent),
                      memory_budget_mb=float(budget) if budget is not None else None)
    return runs


def _objectives(study, parent) -> List[Dict[str, str]]:
    """[{metric, direction}] from the parent run's ``objectives`` param, else the study; empty
    when neither says (the report then picks memory against the FID present)."""
    if parent is not None and "objectives" in parent.data.params:
        try:
            return [dict(o) for o in json.loads(parent.data.params["objectives"])]
        except (ValueError, TypeError):
            pass
    if study is not None:
        names = _objective_names(study) or [f"objective.{i}" for i in range(len(study.directions))]
        return [{"metric": n, "direction": d.name.lower()} for n, d in zip(names, study.directions)]
    return []

