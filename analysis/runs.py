"""MLflow runs as typed pandas DataFrames.

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
  ``amp_dtype``, ``amp``, ``max_iters``, ``iterations``, ``timed_iterations``,
  ``peak_memory_mb`` with ``peak_memory_measure`` (``cuda_peak_reserved`` on CUDA,
  ``peak_live_tensors`` elsewhere: the same choice as the run's ``metrics.json``),
  ``peak_allocated_mb``, ``peak_reserved_mb``, ``peak_live_tensors_mb``,
  ``process_peak_rss_mb``, ``it_per_s``, ``rays_per_s``, ``points_per_s``, and the quality
  columns below.

Quality columns carry their feature extractor in the name, as the training run logs them
(:func:`grafccsr.metrics.metric_key`): ``fid_rf``, ``kid_rf_mean``, ``kid_rf_std`` (offline
random features, from ``eval/fid_rf`` ...) and ``fid``, ``kid_mean``, ``kid_std``
(torch-fidelity's Inception, from ``eval/fid`` ...). A column never holds two extractors'
numbers, so a plot or table of one column compares like with like. Beside them, the
pose-matched scores on held-out views (``data.holdout``; higher is better): ``view_psnr``,
``view_ssim``, ``view_iou`` (mean over latent codes) and ``view_psnr_best``, ``view_ssim_best``,
``view_iou_best`` (each class's best code), from ``eval/view_*``; per class they stay in
``metrics.view_psnr/<class>`` (``metrics.eval/view_psnr/<class>`` in runs logged before the keys
were grouped for MLflow's UI, :mod:`grafccsr.tracking.ui`).

Every read goes through an ``MlflowClient`` on the tracking URI (a local SQLite file or an
``http(s)://`` tracking server alike); Optuna studies are read by :mod:`analysis.studies`.
"""

from __future__ import annotations

import math
import re
from typing import Any, Dict, Iterable, List, Mapping, Optional, Sequence

import pandas as pd

from grafccsr.metrics import INCEPTION, METRIC_NAMES, RANDOM_FEATURES, metric_key
from grafccsr.metrics.keys import VIEW_COLUMNS
from grafccsr.paths import PROJECT_ROOT, default_tracking_uri
from grafccsr.sweeping.storage import redact, resolve_storage_url

__all__ = [
    "PROJECT_ROOT", "REPORT_TAG", "MEMORY_MEASURES", "EXTRACTOR_NAMES", "QUALITY_COLUMNS", "MIN_TIMED_ITERATIONS",
    "coerce_value", "type_column", "type_params", "resolve_tracking_uri", "client", "tag_filter", "search_runs",
    "all_experiments", "runs_to_frame", "add_derived", "load_runs", "metric_history", "metric_histories",
    "extractor_of", "quality_label", "quality_present", "timed_iterations", "measured_throughput",
    "by_memory_measure", "redact",
]

#: Tag marking the runs that :mod:`analysis.report` creates (never loaded as training runs).
REPORT_TAG = "analysis_report"

MEMORY_MEASURES = {
    "cuda_peak_reserved": "peak CUDA reserved",
    "cuda_peak_allocated": "peak CUDA allocated",
    "peak_live_tensors": "peak live tensors",
}

EXTRACTOR_NAMES = {RANDOM_FEATURES: "random features", INCEPTION: "Inception"}
"""Feature extractor -> the words used in labels."""
QUALITY_COLUMNS: Dict[str, tuple] = {e: tuple(metric_key(n, e) for n in METRIC_NAMES) for e in EXTRACTOR_NAMES}
"""Feature extractor -> its (FID, KID mean, KID std) column names: ``fid_rf``... / ``fid``..."""
_QUALITY_OF = {col: (e, name) for e, cols in QUALITY_COLUMNS.items() for name, col in zip(METRIC_NAMES, cols)}

MIN_TIMED_ITERATIONS = 5
"""Throughput (``it_per_s``) from fewer timed iterations is reported as not measured: a
mean over one or two iterations of a short run says little about the configuration."""

_INT_RE = re.compile(r"^[+-]?\d+$")
_NULLS = {"None", "null", "none", "NULL", ""}
_BOOLS = {"True": True, "False": False, "true": True, "false": False}
_TEXT_COLUMNS = ("exp", "device", "fid_extractor", "amp_policy", "amp_dtype", "ccsr_mode")

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
    "eval_samples": ("params.eval.num_samples",),
    "eval_resolution": ("params.eval.resolution",),
    "image_size": ("params.data.image_size",),
    "ccsr_mode": ("params.model.ccsr.mode",),
    "track_peak_every": ("params.memory.track_peak_every",),
    # the training step's peak (d_step, g_step); runs before that metric existed: the run maximum
    "peak_allocated_mb": ("metrics.mem/train_peak_allocated_mb", "metrics.mem/peak_allocated_mb"),
    "peak_reserved_mb": ("metrics.mem/train_peak_reserved_mb", "metrics.mem/peak_reserved_mb"),
    "peak_live_tensors_mb": ("metrics.mem/train_peak_live_tensors_mb", "metrics.mem/peak_live_tensors_mb"),
    "process_peak_rss_mb": ("metrics.mem/process_peak_rss_mb",),
    **{col: (f"metrics.eval/{col}",) for col in _QUALITY_OF},
    **{col: (f"metrics.eval/{col}",) for col in VIEW_COLUMNS},
    # the loop logs the run's average over all timed iterations as the last value
    "it_per_s": ("metrics.perf/it_per_s",),
    "rays_per_s": ("metrics.perf/rays_per_s",),
    "points_per_s": ("metrics.perf/points_per_s",),
}


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
        return float(s)
    except ValueError:
        return text


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


def resolve_tracking_uri(uri: Optional[str]) -> str:
    """The project's store by default; a relative SQLite path made absolute; anything else
    (``http(s)://`` servers, ``databricks``, ...) as given."""
    if not uri:
        return default_tracking_uri()
    return resolve_storage_url(uri) if uri.startswith("sqlite:///") else uri


def client(uri: Optional[str] = None):
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=resolve_tracking_uri(uri))


def _quote(value: str) -> str:
    return "'" + str(value).replace("'", "\\'") + "'"


def tag_filter(tags: Mapping[str, Any]) -> str:
    """An MLflow filter string requiring every tag to equal its value."""
    return " and ".join(f"tags.`{k}` = {_quote(v)}" for k, v in tags.items())


def search_runs(cl, experiment_ids: Sequence[str], filter_string: str = "") -> List[Any]:
    """Every active run matching the filter, oldest first, all pages."""
    from mlflow.entities import ViewType

    runs: List[Any] = []
    token = None
    while True:
        page = cl.search_runs(list(experiment_ids), filter_string=filter_string, run_view_type=ViewType.ACTIVE_ONLY,
                              max_results=1000, order_by=["attributes.start_time ASC"], page_token=token)
        runs.extend(page)
        token = page.token
        if not token:
            return runs


def all_experiments(cl) -> Dict[str, str]:
    """experiment id -> name of every active experiment, all pages."""
    out: Dict[str, str] = {}
    token = None
    while True:
        page = cl.search_experiments(max_results=1000, page_token=token)
        out.update({e.experiment_id: e.name for e in page})
        token = page.token
        if not token:
            return out


def _experiment_ids(cl, names: Optional[Iterable[str]] = None, ids: Optional[Iterable[str]] = None) -> Dict[str, str]:
    """experiment id -> name, for the named/identified experiments (all of them when neither)."""
    if names is None and ids is None:
        return all_experiments(cl)
    out: Dict[str, str] = {}
    for name in names or ():
        exp = cl.get_experiment_by_name(name)
        if exp is None:
            raise LookupError(f"no MLflow experiment named {name!r} in {redact(cl.tracking_uri)}")
        out[exp.experiment_id] = exp.name
    for eid in ids or ():
        out[str(eid)] = cl.get_experiment(str(eid)).name
    return out


def _last_step(run) -> Optional[int]:
    """The highest step among the run's latest metric values, ``system/*`` left out (MLflow's
    system-metrics monitor counts its samples there, not training iterations). ``_metric_objs``
    holds the latest values with their steps for runs from every store, the REST one included."""
    steps = [int(m.step) for m in getattr(run.data, "_metric_objs", None) or [] if not m.key.startswith("system/")]
    return max(steps) if steps else None


def _data_digest(run) -> Optional[str]:
    """The fingerprint of the dataset the run logged as its input (None before runs logged one)."""
    inputs = getattr(run, "inputs", None)
    for item in getattr(inputs, "dataset_inputs", None) or []:
        digest = getattr(getattr(item, "dataset", None), "digest", None)
        if digest:
            return digest
    return None


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
            "last_step": _last_step(run),
            "data_digest": _data_digest(run),
        }
        row.update({f"params.{k}": v for k, v in data.params.items()})
        row.update({f"metrics.{k}": float(v) for k, v in data.metrics.items()})
        row.update({f"tags.{k}": v for k, v in data.tags.items()})
        rows.append(row)
    base = ["run_id", "run_name", "experiment_id", "experiment", "status", "start_time", "end_time", "parent_run_id",
            "last_step", "data_digest"]
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


def _untyped(name: str, n: int, idx) -> pd.Series:
    if name in _TEXT_COLUMNS:
        return pd.Series([None] * n, index=idx, dtype=object)
    return pd.Series([math.nan] * n, index=idx, dtype="float64")


def _separate_legacy_quality(new: Dict[str, pd.Series]) -> None:
    """Runs logged before metric names carried their extractor wrote random-feature numbers as
    ``eval/fid``/``eval/kid_*``. For a run whose ``fid_extractor`` says random features and that
    has no ``eval/fid_rf``, move them to the ``*_rf`` columns, so ``fid`` stays Inception-only."""
    legacy = (new["fid_extractor"] == RANDOM_FEATURES) & new[QUALITY_COLUMNS[RANDOM_FEATURES][0]].isna()
    for plain, rf in zip(QUALITY_COLUMNS[INCEPTION], QUALITY_COLUMNS[RANDOM_FEATURES]):
        new[rf] = new[rf].where(~legacy, new[plain])
        new[plain] = new[plain].where(~legacy)


def add_derived(df: pd.DataFrame) -> pd.DataFrame:
    """A copy with short columns (``fid_rf``, ``peak_memory_mb``, ``batch_size``, ...) taken from
    params/metrics/tags (missing sources give missing values)."""
    n, idx = len(df), df.index
    new: Dict[str, pd.Series] = {}
    for name, sources in _DERIVED.items():
        col = next((s for s in sources if s in df.columns), name if name in df.columns else None)
        new[name] = df[col] if col is not None else _untyped(name, n, idx)
    for col in (*_QUALITY_OF, *VIEW_COLUMNS):
        new[col] = pd.to_numeric(new[col], errors="coerce").astype("float64")
    _separate_legacy_quality(new)
    resolution = pd.to_numeric(new["eval_resolution"], errors="coerce")  # 0: the data's image size
    new["eval_resolution"] = resolution.where(resolution > 0, pd.to_numeric(new["image_size"], errors="coerce"))
    reason = next((df[c] for c in ("tags.failure_reason", "failure_reason") if c in df.columns),
                  pd.Series([None] * n, index=idx, dtype=object))
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
    new["timed_iterations"] = pd.Series([timed_iterations(i, k) for i, k in zip(new["iterations"],
                                                                               new["track_peak_every"])],
                                        index=idx, dtype="Int64")
    return pd.concat([df.drop(columns=[c for c in new if c in df.columns]), pd.DataFrame(new, index=idx)], axis=1)


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
    runs = search_runs(cl, list(names), " and ".join(clauses)) if names else []
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


# ----------------------------------------------------------------------------- what a column means


def extractor_of(column: str) -> Optional[str]:
    """The feature extractor behind a quality column (``fid_rf`` -> ``random-features``,
    ``kid_mean`` -> ``inception-v3-compat``), None for any other column."""
    found = _QUALITY_OF.get(column.split("/")[-1])
    return found[0] if found else None


def quality_label(column: str) -> str:
    """Axis/table words for a quality column: ``FID (random features)``; the column itself otherwise."""
    found = _QUALITY_OF.get(column.split("/")[-1])
    if found is None:
        return column
    extractor, name = found
    what = {"fid": "FID", "kid_mean": "KID (subset mean)", "kid_std": "KID (subset std)"}[name]
    return f"{what} ({EXTRACTOR_NAMES[extractor]})"


def quality_present(df: pd.DataFrame) -> List[str]:
    """The FID columns (``fid_rf``, ``fid``) that hold a value in some row, in that order."""
    cols = [QUALITY_COLUMNS[e][0] for e in EXTRACTOR_NAMES]
    return [c for c in cols if c in df.columns and df[c].notna().any()]


def timed_iterations(iterations: Any, track_peak_every: Any) -> Any:
    """How many of a run's ``iterations`` the loop timed (``perf/it_per_s``): all but those the
    live-tensor tracker measured, the first two and every ``track_peak_every``-th (iteration
    index 0, k, 2k, ...), as in ``grafccsr/training/loop.py``. A resumed run's first two
    iterations after the resume are tracked too: its count is at most 2 high per resume.
    ``pd.NA`` when either input is missing."""
    if pd.isna(iterations) or pd.isna(track_peak_every):
        return pd.NA
    n, k = int(iterations), int(track_peak_every)
    if k <= 0 or n <= 0:
        return max(n, 0)
    multiples_from_2 = (n - 1) // k - (1 if k == 1 else 0)  # k * j in [2, n - 1]
    return n - min(n, 2) - max(multiples_from_2, 0)


def measured_throughput(df: pd.DataFrame) -> pd.Series:
    """``it_per_s`` where it rests on at least :data:`MIN_TIMED_ITERATIONS` timed iterations,
    missing elsewhere (rows whose count is unknown keep their value)."""
    values = pd.to_numeric(df["it_per_s"], errors="coerce").astype("float64") if "it_per_s" in df.columns \
        else pd.Series(math.nan, index=df.index, dtype="float64")
    if "timed_iterations" not in df.columns:
        return values
    timed = pd.to_numeric(df["timed_iterations"], errors="coerce")
    return values.where(timed.isna() | (timed >= MIN_TIMED_ITERATIONS))


def by_memory_measure(df: pd.DataFrame, column: str = "peak_memory_mb") -> Dict[str, pd.DataFrame]:
    """Rows with a value in ``column``, one frame per memory measure (CUDA reserved and live
    tensor bytes are different quantities and never share an axis)."""
    if column not in df.columns:
        return {}
    rows = df[df[column].notna()]
    if column != "peak_memory_mb":  # a specific measure: one group named after it
        return {column: rows} if len(rows) else {}
    measure = rows["peak_memory_measure"].map(lambda m: m if isinstance(m, str) and m else "unknown")
    return {str(m): g for m, g in rows.groupby(measure, sort=True)}
