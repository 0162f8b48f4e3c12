"""MLflow runs (and the Optuna trials of a sweep) as typed pandas DataFrames.

One row per run. Columns:

* run info: ``run_id``, ``run_name``, ``experiment_id``, ``experiment``, ``status``,
  ``start_time``, ``end_time`` (UTC timestamps), ``duration_s``, ``parent_run_id``;
* ``params.<key>``: the flattened config, typed per column (MLflow stores strings:
  ``"8"`` -> Int64, ``"0.0006"`` -> float64, ``"True"`` -> boolean, ``"None"`` -> missing;
  columns that mix kinds stay strings);
* ``metrics.<key>``: the latest value of each metric (float64);
* ``tags.<key>``: tags as strings;
* short derived columns used by tables and plots: ``exp``, ``device``, ``fid_extractor``,
  ``failure_reason``, ``batch_size``, ``samples_per_ray``, ``rays_per_patch``, ``amp_policy``,
  ``amp_dtype``, ``amp``, ``max_iters``, ``iterations``, ``peak_memory_mb`` with
  ``peak_memory_measure`` (``cuda_peak_reserved`` on CUDA, ``peak_live_tensors`` elsewhere:
  the same choice as the run's ``metrics.json``), ``peak_allocated_mb``, ``peak_reserved_mb``,
  ``peak_live_tensors_mb``, ``process_peak_rss_mb``, ``fid``, ``kid_mean``, ``kid_std``,
  ``it_per_s``, ``rays_per_s``, ``points_per_s``.

Quality numbers (FID/KID) from different feature extractors are different scales: use
:func:`require_one_extractor` / :func:`split_by_extractor` / :func:`quality` before putting
them on one axis.
"""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Any, Dict, Iterable, List, Mapping, Optional, Sequence

import pandas as pd

PROJECT_ROOT = Path(__file__).resolve().parent.parent

#: Tag marking the runs that :mod:`analysis.report` creates (never loaded as training runs).
REPORT_TAG = "analysis_report"

QUALITY_COLUMNS = ("fid", "kid_mean", "kid_std")
MEMORY_MEASURES = {
    "cuda_peak_reserved": "peak CUDA reserved",
    "cuda_peak_allocated": "peak CUDA allocated",
    "peak_live_tensors": "peak live tensors",
}

_INT_RE = re.compile(r"^[+-]?\d+$")
_NULLS = {"None", "null", "none", "NULL", ""}
_BOOLS = {"True": True, "False": False, "true": True, "false": False}

# derived column -> source column (first present wins)
_DERIVED = {
    "exp": ("tags.exp", "params.exp_name"),
    "device": ("tags.device",),
    "fid_extractor": ("tags.fid_extractor", "params.eval.extractor"),
    "batch_size": ("params.train.batch_size",),
    "grad_accum_steps": ("params.train.grad_accum_steps",),
    "samples_per_ray": ("params.model.render.samples_per_ray",),
    "rays_per_patch": ("params.model.patch.rays_per_patch",),
    "amp_policy": ("params.train.amp.policy",),
    "amp_dtype": ("params.train.amp.dtype",),
    "max_iters": ("params.train.max_iters",),
    "ccsr_mode": ("params.model.ccsr.mode",),
    # the training step's peak (d_step, g_step); runs before that metric existed: the run maximum
    "peak_allocated_mb": ("metrics.mem/train_peak_allocated_mb", "metrics.mem/peak_allocated_mb"),
    "peak_reserved_mb": ("metrics.mem/train_peak_reserved_mb", "metrics.mem/peak_reserved_mb"),
    "peak_live_tensors_mb": ("metrics.mem/train_peak_live_tensors_mb", "metrics.mem/peak_live_tensors_mb"),
    "process_peak_rss_mb": ("metrics.mem/process_peak_rss_mb",),
    "fid": ("metrics.eval/fid",),
    "kid_mean": ("metrics.eval/kid_mean",),
    "kid_std": ("metrics.eval/kid_std",),
    "it_per_s": ("metrics.perf/it_per_s",),
    "rays_per_s": ("metrics.perf/rays_per_s",),
    "points_per_s": ("metrics.perf/points_per_s",),
}


class MixedExtractorsError(ValueError):
    """FID/KID values from different feature extractors were asked for on one axis."""


# ----------------------------------------------------------------------------- typing


def coerce_value(text: Any) -> Any:
    """One MLflow param string as a Python value (bool, int, float, None or the string)."""
    if not isinstance(text, str):
        return text
    s = text.strip()
    if s in _NULLS:
        return None
    if s in _BOOLS:
        return _BOOLS[s]
    if _INT_RE.match(s):
        return int(s)
    try:
        value = float(s)
    except ValueError:
        return text
    return value


def _kind(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "bool"
    if isinstance(value, int):
        return "int"
    if isinstance(value, float):
        return "float"
    return "str"


def type_column(values: pd.Series) -> pd.Series:
    """A column of MLflow param strings with one dtype: Int64, float64, boolean or strings.

    The dtype is decided per column, so ``"8"`` next to ``"0.5"`` gives float64, and a column
    that mixes kinds (``"off"`` next to ``"1"``) stays strings (missing values as None)."""
    parsed = [coerce_value(v) if not (isinstance(v, float) and math.isnan(v)) else None for v in values]
    kinds = {_kind(v) for v in parsed} - {"null"}
    if not kinds:
        return pd.Series([None] * len(parsed), index=values.index, dtype=object, name=values.name)
    if kinds == {"bool"}:
        return pd.Series(parsed, index=values.index, dtype="boolean", name=values.name)
    if kinds == {"int"}:
        return pd.Series(parsed, index=values.index, dtype="Int64", name=values.name)
    if kinds <= {"int", "float"}:
        return pd.Series([math.nan if v is None else float(v) for v in parsed], index=values.index,
                         dtype="float64", name=values.name)
    strings = [None if (isinstance(v, float) and math.isnan(v)) or v is None else str(v) for v in values]
    strings = [None if s is not None and s.strip() in _NULLS else s for s in strings]
    return pd.Series(strings, index=values.index, dtype=object, name=values.name)


def type_params(df: pd.DataFrame, prefix: str = "params.") -> pd.DataFrame:
    """A copy of the frame with every ``params.*`` column typed (see :func:`type_column`)."""
    cols = [c for c in df.columns if c.startswith(prefix)]
    if not cols:
        return df
    typed = pd.DataFrame({c: type_column(df[c]) for c in cols}, index=df.index)
    return pd.concat([df.drop(columns=cols), typed], axis=1)[list(df.columns)]


# ----------------------------------------------------------------------------- MLflow


def default_tracking_uri() -> str:
    return f"sqlite:///{PROJECT_ROOT / 'mlflow.db'}"


def resolve_tracking_uri(uri: Optional[str]) -> str:
    """The project's store by default; relative SQLite paths made absolute."""
    if not uri:
        return default_tracking_uri()
    if uri.startswith("sqlite:///") and not uri.startswith("sqlite:////") and uri != "sqlite:///:memory:":
        return f"sqlite:///{Path(uri[len('sqlite:///'):]).expanduser().resolve()}"
    return uri


def client(uri: Optional[str] = None):
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=resolve_tracking_uri(uri))


def _quote(value: str) -> str:
    return "'" + str(value).replace("'", "\\'") + "'"


def tag_filter(tags: Mapping[str, Any]) -> str:
    """An MLflow filter string requiring every tag to equal its value."""
    return " and ".join(f"tags.`{k}` = {_quote(v)}" for k, v in tags.items())


def _search(cl, experiment_ids: Sequence[str], filter_string: str = "", run_view_type: Optional[int] = None) -> List[Any]:
    from mlflow.entities import ViewType

    runs: List[Any] = []
    token = None
    while True:
        page = cl.search_runs(list(experiment_ids), filter_string=filter_string,
                              run_view_type=run_view_type or ViewType.ACTIVE_ONLY, max_results=1000,
                              order_by=["attributes.start_time ASC"], page_token=token)
        runs.extend(page)
        token = page.token
        if not token:
            return runs


def _experiment_ids(cl, names: Optional[Iterable[str]] = None, ids: Optional[Iterable[str]] = None) -> Dict[str, str]:
    """experiment id -> name, for the named/identified experiments (all of them when neither)."""
    out: Dict[str, str] = {}
    for name in names or ():
        exp = cl.get_experiment_by_name(name)
        if exp is None:
            raise LookupError(f"no MLflow experiment named {name!r} in {cl.tracking_uri}")
        out[exp.experiment_id] = exp.name
    for eid in ids or ():
        out[str(eid)] = cl.get_experiment(str(eid)).name
    if names is None and ids is None:
        out = {e.experiment_id: e.name for e in cl.search_experiments()}
    return out


def runs_to_frame(runs: Sequence[Any], experiment_names: Optional[Mapping[str, str]] = None) -> pd.DataFrame:
    """MLflow ``Run`` objects as a typed DataFrame (see the module docstring for columns)."""
    rows = []
    for run in runs:
        info, data = run.info, run.data
        row: Dict[str, Any] = {
            "run_id": info.run_id,
            "run_name": info.run_name or data.tags.get("mlflow.runName"),
            "experiment_id": info.experiment_id,
            "experiment": (experiment_names or {}).get(info.experiment_id),
            "status": info.status,
            "start_time": info.start_time,
            "end_time": info.end_time,
            "parent_run_id": data.tags.get("mlflow.parentRunId"),
        }
        steps = [int(m.step) for m in getattr(data, "_metric_objs", None) or []]
        row["last_step"] = max(steps) if steps else None
        row.update({f"params.{k}": v for k, v in data.params.items()})
        row.update({f"metrics.{k}": float(v) for k, v in data.metrics.items()})
        row.update({f"tags.{k}": v for k, v in data.tags.items()})
        rows.append(row)
    base = ["run_id", "run_name", "experiment_id", "experiment", "status", "start_time", "end_time", "parent_run_id",
            "last_step"]
    df = pd.DataFrame(rows, columns=None if rows else base)
    for col in ("start_time", "end_time"):
        df[col] = pd.to_datetime(df[col], unit="ms", utc=True) if len(df) else pd.Series(dtype="datetime64[ns, UTC]")
    df["duration_s"] = (df["end_time"] - df["start_time"]).dt.total_seconds() if len(df) else pd.Series(dtype=float)
    df = type_params(df)
    metric_cols = [c for c in df.columns if c.startswith("metrics.")]
    if metric_cols:
        df[metric_cols] = df[metric_cols].astype("float64")
    tag_cols = [c for c in df.columns if c.startswith("tags.")]
    if tag_cols:
        df[tag_cols] = df[tag_cols].astype(object).where(df[tag_cols].notna(), None)
    return add_derived(df)


def add_derived(df: pd.DataFrame) -> pd.DataFrame:
    """A copy with short columns (``fid``, ``peak_memory_mb``, ``batch_size``, ...) taken from
    params/metrics/tags (missing sources give missing values)."""
    n, idx = len(df), df.index
    new: Dict[str, pd.Series] = {}
    for name, sources in _DERIVED.items():
        col = next((s for s in sources if s in df.columns), None)
        if col is not None:
            new[name] = df[col]
        elif name in df.columns:
            new[name] = df[name]
        elif name in ("exp", "device", "fid_extractor", "amp_policy", "amp_dtype", "ccsr_mode"):
            new[name] = pd.Series([None] * n, index=idx, dtype=object)
        else:
            new[name] = pd.Series([math.nan] * n, index=idx, dtype="float64")
    reason = df["tags.failure_reason"] if "tags.failure_reason" in df.columns else \
        df["failure_reason"] if "failure_reason" in df.columns else pd.Series([None] * n, index=idx, dtype=object)
    new["failure_reason"] = reason.astype(object).where(reason.notna() & (reason != ""), None)
    new["amp"] = new["amp_policy"].map(lambda p: None if not isinstance(p, str) else p != "off").astype("boolean")
    is_cuda = new["device"].map(lambda d: isinstance(d, str) and d not in ("cpu", ""))
    reserved = pd.to_numeric(new["peak_reserved_mb"], errors="coerce").astype("float64")
    live = pd.to_numeric(new["peak_live_tensors_mb"], errors="coerce").astype("float64")
    use_reserved = (is_cuda & reserved.notna()).astype(bool)
    new["peak_memory_mb"] = reserved.where(use_reserved, live)
    measure = pd.Series([None] * n, index=idx, dtype=object)
    measure[use_reserved] = "cuda_peak_reserved"
    measure[~use_reserved & live.notna()] = "peak_live_tensors"
    new["peak_memory_measure"] = measure
    # the loop logs its final metrics at the last iteration it reached
    last = df["last_step"] if "last_step" in df.columns else pd.Series([None] * n, index=idx)
    new["iterations"] = pd.to_numeric(last, errors="coerce").astype("Int64")
    out = pd.concat([df.drop(columns=[c for c in new if c in df.columns]), pd.DataFrame(new, index=idx)], axis=1)
    return out


def load_runs(
    uri: Optional[str] = None,
    experiments: Optional[Sequence[str]] = None,
    experiment_ids: Optional[Sequence[str]] = None,
    tags: Optional[Mapping[str, Any]] = None,
    filter_string: str = "",
    parent_run_id: Optional[str] = None,
    include_reports: bool = False,
    include_parents: bool = False,
) -> pd.DataFrame:
    """Runs of the named experiments (all experiments when none is named), optionally only
    those with the given tags / MLflow filter / parent run. Sweep parent runs
    (``sweep_role=parent``) and report runs are left out unless asked for."""
    cl = client(uri)
    if isinstance(experiments, str):
        experiments = [experiments]
    names = _experiment_ids(cl, experiments, experiment_ids)
    clauses = [c for c in (filter_string, tag_filter(tags or {}),
                           tag_filter({"mlflow.parentRunId": parent_run_id}) if parent_run_id else "") if c]
    runs = _search(cl, list(names), " and ".join(clauses)) if names else []
    df = runs_to_frame(runs, names)
    if not include_reports and f"tags.{REPORT_TAG}" in df.columns:
        df = df[df[f"tags.{REPORT_TAG}"].isna()]
    if not include_parents and "tags.sweep_role" in df.columns:
        df = df[df["tags.sweep_role"] != "parent"]
    return df.reset_index(drop=True)


def metric_history(run_id: str, key: str, uri: Optional[str] = None, cl=None) -> pd.DataFrame:
    """Every logged value of one metric of one run: columns ``step``, ``value``, ``timestamp``."""
    cl = cl or client(uri)
    points = cl.get_metric_history(run_id, key)
    df = pd.DataFrame({"step": [int(m.step) for m in points], "value": [float(m.value) for m in points],
                       "timestamp": pd.to_datetime([m.timestamp for m in points], unit="ms", utc=True)})
    return df.sort_values(["step", "timestamp"]).reset_index(drop=True)


def metric_histories(run_ids: Iterable[str], keys: Iterable[str], uri: Optional[str] = None) -> pd.DataFrame:
    """Long frame ``run_id, key, step, value, timestamp`` for several runs and metrics (curves)."""
    cl = client(uri)
    frames = []
    for run_id in run_ids:
        for key in keys:
            h = metric_history(run_id, key, cl=cl)
            if len(h):
                frames.append(h.assign(run_id=run_id, key=key))
    if not frames:
        return pd.DataFrame(columns=["run_id", "key", "step", "value", "timestamp"])
    return pd.concat(frames, ignore_index=True)[["run_id", "key", "step", "value", "timestamp"]]


# ----------------------------------------------------------------------------- extractors


def _quality_rows(df: pd.DataFrame, column: str) -> pd.DataFrame:
    if column not in df.columns:
        raise KeyError(f"no column {column!r}")
    return df[df[column].notna()]


def extractors(df: pd.DataFrame, column: str = "fid") -> List[str]:
    """Distinct feature extractors among the rows that have a value in ``column``
    (``"unknown"`` for rows without a ``fid_extractor`` tag)."""
    rows = _quality_rows(df, column)
    return sorted({str(e) if isinstance(e, str) and e else "unknown" for e in rows["fid_extractor"]})


def require_one_extractor(df: pd.DataFrame, column: str = "fid") -> Optional[str]:
    """The single extractor behind ``column``'s values; raises :class:`MixedExtractorsError` if
    the rows mix extractors (None when no row has a value)."""
    found = extractors(df, column)
    if len(found) > 1:
        raise MixedExtractorsError(
            f"{column} values come from different feature extractors {found}; they are different scales and "
            "must not share an axis: use split_by_extractor() or pick one with quality(df, extractor=...)")
    return found[0] if found else None


def split_by_extractor(df: pd.DataFrame, column: str = "fid") -> Dict[str, pd.DataFrame]:
    """Rows with a value in ``column``, one frame per feature extractor."""
    rows = _quality_rows(df, column)
    key = rows["fid_extractor"].map(lambda e: str(e) if isinstance(e, str) and e else "unknown")
    return {name: group.copy() for name, group in rows.groupby(key, sort=True)}


def quality(df: pd.DataFrame, column: str = "fid", extractor: Optional[str] = None) -> pd.Series:
    """``column`` for one extractor: the named one (other rows dropped) or the only one present
    (raises :class:`MixedExtractorsError` when several are present and none is named)."""
    rows = _quality_rows(df, column)
    if extractor is None:
        require_one_extractor(rows, column)
        return rows[column]
    return rows.loc[rows["fid_extractor"] == extractor, column]


def comparable_groups(df: pd.DataFrame, quality_column: Optional[str] = "fid",
                      memory_column: Optional[str] = "peak_memory_mb") -> Dict[tuple, pd.DataFrame]:
    """Rows split so that each group shares one memory measure and one FID extractor:
    ``{(memory_measure, extractor): frame}`` (rows lacking one of the values go to a group
    whose key holds None there)."""
    measure = df["peak_memory_measure"] if memory_column else pd.Series([None] * len(df), index=df.index)
    if quality_column:
        extractor = df.apply(lambda r: (str(r["fid_extractor"]) if isinstance(r["fid_extractor"], str)
                                        and r["fid_extractor"] else "unknown")
                             if pd.notna(r[quality_column]) else None, axis=1) if len(df) else measure
    else:
        extractor = pd.Series([None] * len(df), index=df.index)
    def clean(values: pd.Series) -> List[Any]:
        return [None if v is None or (not isinstance(v, str) and pd.isna(v)) else v for v in values]

    keys = list(zip(clean(measure), clean(extractor)))
    groups: Dict[tuple, List[int]] = {}
    for idx, key in zip(df.index, keys):
        groups.setdefault(key, []).append(idx)
    return {key: df.loc[idx] for key, idx in groups.items()}


# ----------------------------------------------------------------------------- Optuna


def default_storage_url() -> str:
    return f"sqlite:///{PROJECT_ROOT / 'sweeps' / 'optuna.db'}"


def _storage(url: Optional[str]):
    """An Optuna storage for ``url`` (SQLite/RDB URL or ``journal:<file>``); None when it is a
    local file that does not exist (so that looking never creates a database)."""
    url = url or default_storage_url()
    if url.startswith("journal:"):
        path = Path(url[len("journal:"):]).expanduser()
        if not path.exists():
            return None
        import optuna
        from optuna.storages.journal import JournalFileBackend

        return optuna.storages.JournalStorage(JournalFileBackend(str(path)))
    if url.startswith("sqlite:///") and url != "sqlite:///:memory:":
        path = Path(url[len("sqlite:///"):]).expanduser()
        if not path.exists():
            return None
        return f"sqlite:///{path.resolve()}"
    return url


def study_names(storage: Optional[str] = None) -> List[str]:
    store = _storage(storage)
    if store is None:
        return []
    import optuna

    try:
        return [s.study_name for s in optuna.get_all_study_summaries(store, include_best_trial=False)]
    except Exception:  # noqa: BLE001 - an unreadable storage has no studies for us
        return []


def load_study(name: str, storage: Optional[str] = None):
    """The Optuna study, or None when the storage or the study does not exist."""
    store = _storage(storage)
    if store is None:
        return None
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    try:
        return optuna.load_study(study_name=name, storage=store)
    except KeyError:
        return None


def trials_frame(study) -> pd.DataFrame:
    """One row per trial: ``trial_number``, ``trial_state``, ``trial_feasible``,
    ``objective.<metric>`` (when the study records its objectives as the sweep driver's
    ``objectives`` attr or in order ``objective.0``...), ``trial_params.<k>``,
    ``trial_attrs.<k>`` and ``mlflow_run_id``."""
    objectives = _objective_names(study)
    rows = []
    for t in study.get_trials(deepcopy=False):
        row: Dict[str, Any] = {"trial_number": t.number, "trial_state": t.state.name,
                               "trial_feasible": all(v <= 0 for v in (t.constraints or {}).values())
                               if hasattr(t, "constraints") else True}
        values = t.values or []
        for i, value in enumerate(values):
            row[f"objective.{objectives[i] if i < len(objectives) else i}"] = value
        row.update({f"trial_params.{k}": v for k, v in t.params.items()})
        row.update({f"trial_attrs.{k}": v for k, v in t.user_attrs.items()
                    if isinstance(v, (str, int, float, bool)) or v is None})
        row["mlflow_run_id"] = t.user_attrs.get("mlflow_run_id")
        rows.append(row)
    return pd.DataFrame(rows)


def _objective_names(study) -> List[str]:
    attrs = study.user_attrs
    objs = attrs.get("objectives")
    if isinstance(objs, list):
        return [o.get("metric", str(i)) if isinstance(o, dict) else str(o) for i, o in enumerate(objs)]
    names = getattr(study, "metric_names", None)
    return list(names) if names else []


def find_sweep_parent(name: str, uri: Optional[str] = None, study=None) -> Optional[Any]:
    """The MLflow parent run of a sweep: the study's ``mlflow_parent_run_id`` attr, else the
    latest run tagged ``sweep_study=<name>`` and ``sweep_role=parent`` in any experiment."""
    cl = client(uri)
    if study is not None and study.user_attrs.get("mlflow_parent_run_id"):
        try:
            run = cl.get_run(study.user_attrs["mlflow_parent_run_id"])
            if run.info.lifecycle_stage == "active":
                return run
        except Exception:  # noqa: BLE001 - another tracking store
            pass
    ids = [e.experiment_id for e in cl.search_experiments()]
    if not ids:
        return None
    found = _search(cl, ids, tag_filter({"sweep_study": name, "sweep_role": "parent"}))
    return found[-1] if found else None


def load_sweep(name: str, uri: Optional[str] = None, storage: Optional[str] = None) -> pd.DataFrame:
    """The child runs of a sweep joined with its Optuna trials (outer join on the trial's
    ``mlflow_run_id``; a trial without a run keeps a row, with ``status`` from the trial).

    The frame's ``attrs`` hold ``study_name``, ``parent_run_id`` and ``objectives``.
    Raises LookupError when neither the study nor a parent run exists."""
    study = load_study(name, storage)
    parent = find_sweep_parent(name, uri, study)
    if study is None and parent is None:
        raise LookupError(f"no Optuna study {name!r} in {storage or default_storage_url()} and no MLflow run "
                          f"tagged sweep_study={name!r} in {resolve_tracking_uri(uri)}")
    runs = load_runs(uri, experiment_ids=[parent.info.experiment_id], parent_run_id=parent.info.run_id) \
        if parent is not None else runs_to_frame([])
    if study is not None:
        trials = trials_frame(study)
        if len(trials):
            if len(runs) and "tags.optuna_trial_number" in runs.columns:
                # runs whose trial lost its mlflow_run_id attr still join through their tag
                by_tag = dict(zip(pd.to_numeric(runs["tags.optuna_trial_number"], errors="coerce"), runs["run_id"]))
                trials["mlflow_run_id"] = [rid if isinstance(rid, str) and rid else by_tag.get(num)
                                           for rid, num in zip(trials["mlflow_run_id"], trials["trial_number"])]
            runs = runs.merge(trials, how="outer", left_on="run_id", right_on="mlflow_run_id")
            runs["run_id"] = runs["run_id"].where(runs["run_id"].notna(), runs["mlflow_run_id"])
            missing = runs["status"].isna()
            runs.loc[missing, "status"] = runs.loc[missing, "trial_state"].map(
                {"COMPLETE": "FINISHED", "FAIL": "FAILED", "PRUNED": "KILLED", "RUNNING": "RUNNING",
                 "WAITING": "SCHEDULED"})
            attr_reason = runs.get("trial_attrs.failure_reason")
            if attr_reason is not None:
                runs["failure_reason"] = runs["failure_reason"].where(runs["failure_reason"].notna(), attr_reason)
            # trial attrs fill what the run lacks (e.g. a trial that never reached MLflow)
            for col in ("fid", "kid_mean", "kid_std", "it_per_s", "peak_memory_mb", "peak_memory_measure",
                        "fid_extractor", "device"):
                attr = f"trial_attrs.{col}"
                if attr in runs.columns:
                    runs[col] = runs[col].where(runs[col].notna(), runs[attr])
            runs = runs.sort_values("trial_number", na_position="last").reset_index(drop=True)
    runs.attrs.update(study_name=name, parent_run_id=parent.info.run_id if parent is not None else None,
                      experiment_id=parent.info.experiment_id if parent is not None else None,
                      objectives=_objectives_with_directions(study, parent))
    return runs


def _objectives_with_directions(study, parent) -> List[Dict[str, str]]:
    """[{metric, direction}] from the parent run's ``objectives`` param, else the study."""
    import json

    if parent is not None and "objectives" in parent.data.params:
        try:
            return [dict(o) for o in json.loads(parent.data.params["objectives"])]
        except (ValueError, TypeError):
            pass
    if study is not None:
        names = _objective_names(study) or [f"objective.{i}" for i in range(len(study.directions))]
        return [{"metric": n, "direction": d.name.lower()} for n, d in zip(names, study.directions)]
    return [{"metric": "peak_memory_mb", "direction": "minimize"}, {"metric": "fid", "direction": "minimize"}]


def experiment_exists(name: str, uri: Optional[str] = None) -> bool:
    return client(uri).get_experiment_by_name(name) is not None
