"""What MLflow's UI shows first, and why the keys are named as they are.

MLflow 3's run page ("Model metrics" tab) puts a run's charts into collapsible groups named
after the part of the key before its last ``/`` (``mem/d_step/peak_live_tensors_mb`` is in
``mem/d_step``), orders the groups alphabetically and puts keys without a ``/`` (the ``samples``
and ``views`` image grids) last. So the groups are named to sort in the order a researcher
reads them: ``eval/`` (FID/KID and the held-out view scores), ``mem/`` (peak memory) and the
per-phase ``mem/<phase>/``, ``perf/`` (throughput and seconds per iteration), ``train/``
(losses, D's logits, learning rate), the per-class ``view_*/<class>``. Values that do not
change during a run are tags or params, not charts. MLflow 3.17's image card lists every param
of the run above the picture and opens at step 0, so a run's newest grids are also uploaded as
plain files (``samples/<iteration>.png``), which the Artifacts tab previews.

The runs table shows no metric columns until a user picks them; MLflow keeps a picked set of
columns as a *saved view* (an experiment tag, listed under the table's **Views** menu and
opened by a link with ``viewStateShareKey``), so each experiment gets one, :data:`RESULTS_VIEW`.
A finished run's description (``mlflow.note.content``, shown above its metrics and params)
carries its headline numbers and links to the charts, the newest grids, its log and its files
(:func:`run_note`). Light: no mlflow import.
"""

from __future__ import annotations

import json
import time
from typing import Any, Dict, Mapping, Optional, Sequence

SAVED_VIEW_TAG_PREFIX = "mlflow.sharedViewState."
"""MLflow's experiment-tag prefix of a saved runs-table view; the rest of the key is the view's id."""
RESULTS_VIEW = "grafccsr-results"
"""Id of the saved view every training experiment gets (``?viewStateShareKey=grafccsr-results``)."""
RESULTS_VIEW_NAME = "results: FID, memory, speed"
UI_MARKER_TAG = "grafccsr.ui"
"""Set once the experiment got its view and description: a user who deletes the view keeps it deleted."""

RESULTS_COLUMNS = (
    ("metrics", "eval/fid_rf"), ("metrics", "eval/fid"), ("metrics", "eval/view_psnr"),
    ("metrics", "mem/train_peak_reserved_mb"), ("metrics", "mem/train_peak_live_tensors_mb"),
    ("metrics", "mem/process_peak_rss_mb"), ("metrics", "perf/it_per_s"),
    ("params", "train.batch_size"), ("params", "model.render.samples_per_ray"), ("params", "train.amp.policy"),
    ("params", "model.ccsr.mode"), ("params", "eval.num_samples"), ("params", "data.image_size"),
    ("tags", "exp"), ("tags", "device"),
)
"""The view's columns: quality (the two extractors' FIDs never share a column), the training
step's peak memory (CUDA reserved, or live tensors on other devices), speed, and what an FID
or a peak depends on (batch, samples per ray, AMP, CCSR, the evaluation's sample count and
resolution)."""


def column_id(kind: str, key: str) -> str:
    """The runs table's id of a column, as MLflow's UI writes it: ``metrics.`eval/fid_rf```."""
    return f"{kind}.`{key}`"


def results_view_tag(now_ms: Optional[int] = None) -> Dict[str, str]:
    """The experiment tag of :data:`RESULTS_VIEW`: MLflow's saved-view envelope (name, times, and
    the view's state as a JSON string: columns, newest runs first)."""
    now_ms = int(time.time() * 1000) if now_ms is None else now_ms
    state = {"selectedColumns": [column_id(kind, key) for kind, key in RESULTS_COLUMNS],
             "orderByKey": "attributes.start_time", "orderByAsc": False}
    envelope = {"name": RESULTS_VIEW_NAME, "createdAt": now_ms, "updatedAt": now_ms, "state": json.dumps(state)}
    return {SAVED_VIEW_TAG_PREFIX + RESULTS_VIEW: json.dumps(envelope)}


def runs_link(experiment_id: str) -> str:
    """The experiment's runs table in :data:`RESULTS_VIEW`, relative to the UI's root (``#/...``)."""
    return f"#/experiments/{experiment_id}/runs?viewStateShareKey={RESULTS_VIEW}&workflowType=machine_learning"


def experiment_note(experiment_id: str) -> str:
    """The experiment's description (``mlflow.note.content``), shown above its runs table."""
    return (f"grafccsr training runs: the saved view [{RESULTS_VIEW_NAME}]({runs_link(experiment_id)}) "
            "(**Views** menu) adds the columns that matter; a run's description holds its headline numbers.")


def run_page(experiment_id: str, run_id: str, tab: str = "") -> str:
    """A run's page or one of its tabs (``model-metrics``, ``artifacts/train.log``), relative to the UI's root."""
    return f"#/experiments/{experiment_id}/runs/{run_id}" + (f"/{tab}" if tab else "")


def _num(value: Any) -> str:
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        return "-"
    return f"{value:.4g}" if abs(value) < 1000 else f"{value:.0f}"


def run_note(summary: Mapping[str, Any], command: str, experiment_id: str, run_id: str,
             files: Sequence[str] = ()) -> str:
    """A finished (or failed) run's description, in MLflow's Markdown: the status, the quality
    (named by its extractor, with the sample count and resolution it compares at), the training
    step's peak memory and the speed on the first line (the UI shows the first lines folded),
    then links to the charts and to ``files`` (artifact paths; a grid is named by its folder),
    then the command line."""
    status = summary.get("status", "")
    head = f"**{status}**"
    if summary.get("reason"):
        head += f" ({summary['reason']}: {summary.get('message', '')})"
    elif summary.get("message"):
        head += f" ({summary['message']})"
    head += f" at iteration {summary.get('iteration')}/{summary.get('max_iters')}"
    parts = [head]
    ev = summary.get("eval") or {}
    fid_key = next((k for k in ("fid_rf", "fid") if isinstance(ev.get(k), (int, float))), None)
    if fid_key:
        parts.append(f"{fid_key} **{_num(ev[fid_key])}** ({ev.get('num_samples', '?')} fakes at "
                     f"{ev.get('resolution', '?')} px)")
    if isinstance(ev.get("view_psnr"), (int, float)):
        parts.append(f"held-out view PSNR {_num(ev['view_psnr'])} dB")
    peak = summary.get("peak_memory_mb")
    if isinstance(peak, (int, float)):
        measure = {"cuda_peak_reserved": "CUDA reserved", "peak_live_tensors": "live tensors"}.get(
            summary.get("peak_memory_measure"), summary.get("peak_memory_measure", ""))
        parts.append(f"training-step peak **{_num(peak)} MiB** ({measure})")
    rss = summary.get("process_peak_rss_mb")
    if isinstance(rss, (int, float)):
        parts.append(f"process RSS {_num(rss)} MiB")
    speed = (summary.get("perf") or {}).get("perf/it_per_s")
    if isinstance(speed, (int, float)):
        parts.append(f"{_num(speed)} it/s")
    links = [f"[charts]({run_page(experiment_id, run_id, 'model-metrics')})"]
    links += [f"[{path.split('/')[0]}]({run_page(experiment_id, run_id, 'artifacts/' + path)})" for path in files]
    links.append(f"[all runs]({runs_link(experiment_id)})")
    lines = [" · ".join(parts), " · ".join(links)]
    if command:
        lines.append(f"`{command}`")
    return "\n\n".join(lines)
