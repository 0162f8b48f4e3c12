"""Plots of runs frames (:mod:`analysis.runs`): matplotlib with the Agg backend, PNG files.

Every figure has a title naming the device(s), axis labels with units and a legend. Memory
measures (CUDA reserved vs live tensor bytes) are never mixed on one axis: such frames are
drawn as one panel per measure. A quality axis shows one column, and a column holds one
feature extractor's numbers (``fid_rf`` or ``fid``, see :mod:`analysis.runs`), named in the
axis label.
"""

from __future__ import annotations

import textwrap

import math
from pathlib import Path
from typing import Mapping, Optional, Sequence

import numpy as np
import pandas as pd

from .pareto import pareto_front
from .runs import MEMORY_MEASURES, MIN_TIMED_ITERATIONS, by_memory_measure, measured_throughput, quality_label

DPI = 110
MIN_CURVE_POINTS = 3
"""A run's metric is drawn as a curve over training only with at least this many values."""
PHASES = ("d_step", "g_step", "sample", "eval")
PHASE_COLOURS = {"d_step": "tab:blue", "g_step": "tab:orange", "sample": "tab:green", "eval": "tab:purple"}
STATUS_STYLE = {
    "dominated": dict(c="tab:blue", marker="o", s=36, alpha=0.7, label="dominated"),
    "front": dict(c="tab:red", marker="o", s=70, zorder=3, label="Pareto front"),
    "infeasible": dict(c="tab:gray", marker="x", s=40, label="infeasible (over budget)"),
    "failed": dict(c="black", marker="X", s=40, label="failed / not finished"),
}


def _plt():
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def devices_text(df: pd.DataFrame) -> str:
    devs = sorted({str(d) for d in df.get("device", pd.Series(dtype=object)).dropna() if str(d)})
    return "device: " + (", ".join(devs) if devs else "unknown")


def memory_label(measure: Optional[str], column: str = "peak_memory_mb") -> str:
    if column in ("peak_allocated_mb", "mem/peak_allocated_mb"):
        measure = "cuda_peak_allocated"
    elif column in ("peak_reserved_mb", "mem/peak_reserved_mb"):
        measure = "cuda_peak_reserved"
    elif column in ("peak_live_tensors_mb", "mem/peak_live_tensors_mb"):
        measure = "peak_live_tensors"
    return f"{MEMORY_MEASURES.get(measure or '', 'peak memory')} (MiB)"


def _save(fig, path: Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=DPI, bbox_inches="tight")  # titles, legends and labels never cut off
    _plt().close(fig)
    return path


def _label(row: pd.Series, label_col: Optional[str]) -> str:
    if label_col and label_col in row and isinstance(row[label_col], str) and row[label_col]:
        return row[label_col]
    if "trial_number" in row and pd.notna(row.get("trial_number")):
        return f"#{int(row['trial_number'])}"
    return str(row.get("run_name") or str(row.get("run_id", ""))[:8])


def _empty(path: Path, title: str, message: str) -> Path:
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6, 3))
    ax.set_axis_off()
    ax.set_title(title)
    ax.text(0.5, 0.5, message, ha="center", va="center", wrap=True)
    return _save(fig, path)


# ----------------------------------------------------------------------------- memory vs quality


def plot_memory_vs_quality(
    df: pd.DataFrame,
    path: Path,
    x: str = "peak_memory_mb",
    y: str = "fid_rf",
    directions: Sequence[str] = ("minimize", "minimize"),
    feasible: Optional[str] = None,
    memory_budget_mb: Optional[float] = None,
    label_col: Optional[str] = None,
    title: str = "Peak memory vs quality",
) -> Path:
    """Scatter of memory against one quality column (``fid_rf``, ``fid``, ...), the Pareto front
    highlighted (red, joined by a step line), dominated/infeasible/failed points styled apart.
    One panel per memory measure."""
    plt = _plt()
    has_y = df[y].notna() if y in df.columns else pd.Series(False, index=df.index)
    groups = by_memory_measure(df[has_y], x)
    n_failed = int((~has_y).sum())
    if not groups:
        return _empty(path, f"{title} — {devices_text(df)}", f"no run has both {x} and {y} ({n_failed} without {y})")
    fig, axes = plt.subplots(1, len(groups), figsize=(6.4 * len(groups), 4.8), squeeze=False)
    for ax, (measure, g) in zip(axes[0], sorted(groups.items())):
        ranked = pareto_front(g, (x, y), directions, feasible=feasible, memory_budget_mb=memory_budget_mb,
                              memory_column=x)
        for status in ("dominated", "infeasible", "failed", "front"):
            pts = ranked[ranked["pareto_status"] == status]
            pts = pts[pts[x].notna() & pts[y].notna()]
            if len(pts):
                ax.scatter(pts[x].astype(float), pts[y].astype(float), **{**STATUS_STYLE[status],
                           "label": f"{STATUS_STYLE[status]['label']} ({len(pts)})"})
        front = ranked[ranked["on_front"]].sort_values(x)
        if len(front) > 1:
            ax.plot(front[x].astype(float), front[y].astype(float), c="tab:red", alpha=0.5,
                    drawstyle="steps-post" if directions[0] == "minimize" else "default")
        for _, row in front.iterrows():
            ax.annotate(_label(row, label_col), (float(row[x]), float(row[y])), textcoords="offset points",
                        xytext=(4, 4), fontsize=8)
        if memory_budget_mb is not None:
            ax.axvline(memory_budget_mb, c="tab:gray", ls="--", lw=1, label=f"budget {memory_budget_mb:g} MiB")
        ax.set_xlabel(memory_label(measure, x))
        ax.set_ylabel(f"{quality_label(y)}{'; lower is better' if directions[1] == 'minimize' else ''}")
        ax.set_title(textwrap.fill(f"{title}", 70) + f"\n{devices_text(g)}", fontsize=10)
        ax.grid(alpha=0.3)
        if n_failed:
            ax.plot([], [], " ", label=f"{n_failed} run(s) without {y} not shown")
        ax.legend(fontsize=8, loc="best")
    return _save(fig, path)


# ----------------------------------------------------------------------------- memory vs batch size


def plot_memory_vs_batch(df: pd.DataFrame, path: Path, y: str = "peak_memory_mb",
                         title: str = "Peak memory vs batch size") -> Path:
    """Memory against batch size: one colour per samples-per-ray, solid = AMP off, dashed = AMP
    on; the median where several runs share a point. Runs that ran out of memory are marked
    ``OOM`` at the top of the panel. One panel per memory measure."""
    plt = _plt()
    data = df[df["batch_size"].notna()]
    groups = by_memory_measure(data, y)
    ooms = data[data["failure_reason"] == "oom"] if "failure_reason" in data.columns else data.iloc[:0]
    if not groups:
        return _empty(path, f"{title} — {devices_text(df)}", f"no run with batch_size and {y}")
    fig, axes = plt.subplots(1, len(groups), figsize=(6.4 * len(groups), 4.6), squeeze=False)
    palette = plt.get_cmap("tab10").colors
    spr_values = sorted({int(v) for v in data["samples_per_ray"].dropna()})
    colours = {s: palette[i % len(palette)] for i, s in enumerate(spr_values)}
    for ax, (measure, g) in zip(axes[0], sorted(groups.items())):
        g = g.copy()
        g["_amp"] = g["amp"].fillna(False).astype(bool)
        for (spr, amp), line in g.groupby(["samples_per_ray", "_amp"], dropna=False):
            pts = line.groupby("batch_size")[y].median().sort_index()
            spr_i = None if pd.isna(spr) else int(spr)
            ax.plot(pts.index.astype(float), pts.values.astype(float), marker="s" if amp else "o",
                    color=colours.get(spr_i, "tab:gray"), ls="--" if amp else "-",
                    label=f"{spr_i} samples/ray, AMP {'on' if amp else 'off'}")
        if len(ooms):
            import matplotlib.transforms as mtrans

            trans = mtrans.blended_transform_factory(ax.transData, ax.transAxes)
            for _, row in ooms.iterrows():
                ax.scatter([float(row["batch_size"])], [0.96], transform=trans, marker="X", c="tab:red", s=50)
            ax.scatter([], [], marker="X", c="tab:red", label=f"out of memory ({len(ooms)})")
        sizes = sorted({float(b) for b in data["batch_size"].dropna()})
        ax.set_xticks(sizes)
        ax.set_xticklabels([f"{b:g}" for b in sizes])
        ax.set_xlabel("batch size (images per optimiser step)")
        ax.set_ylabel(memory_label(measure, y))
        ax.set_title(textwrap.fill(f"{title}", 70) + f"\n{devices_text(g)}", fontsize=10)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    return _save(fig, path)


# ----------------------------------------------------------------------------- throughput vs memory


def plot_throughput_vs_memory(df: pd.DataFrame, path: Path, x: str = "peak_memory_mb",
                              label_col: Optional[str] = None, title: str = "Throughput vs peak memory") -> Path:
    """Training iterations per second against peak memory, AMP on/off in two colours, each
    point labelled with its batch size and samples per ray (or ``label_col``). Runs with fewer
    than :data:`~analysis.runs.MIN_TIMED_ITERATIONS` timed iterations are not drawn (their
    throughput is not measured); the legend counts them."""
    plt = _plt()
    speed = measured_throughput(df)
    data = df.assign(it_per_s=speed)[speed.notna()] if x in df.columns else df.iloc[:0]
    unmeasured = int((speed.isna() & df.get("it_per_s", pd.Series(dtype=float)).notna()).sum())
    note = f"{unmeasured} run(s) with fewer than {MIN_TIMED_ITERATIONS} timed iterations: throughput not measured"
    groups = by_memory_measure(data, x)
    if not groups:
        return _empty(path, f"{title} — {devices_text(df)}",
                      f"no run with {x} and a measured it/s" + (f"\n({note})" if unmeasured else ""))
    fig, axes = plt.subplots(1, len(groups), figsize=(6.4 * len(groups), 4.6), squeeze=False)
    for ax, (measure, g) in zip(axes[0], sorted(groups.items())):
        amp = g["amp"].fillna(False).astype(bool)
        for flag, colour in ((False, "tab:blue"), (True, "tab:orange")):
            pts = g[amp == flag]
            if len(pts):
                ax.scatter(pts[x].astype(float), pts["it_per_s"].astype(float), c=colour, s=40,
                           label=f"AMP {'on' if flag else 'off'} ({len(pts)})")
        for _, row in g.iterrows():
            text = _label(row, label_col) if label_col else \
                f"b{_int(row.get('batch_size'))}/s{_int(row.get('samples_per_ray'))}"
            ax.annotate(text, (float(row[x]), float(row["it_per_s"])), textcoords="offset points", xytext=(4, 3),
                        fontsize=7)
        if unmeasured:
            ax.plot([], [], " ", label=note)
        ax.set_xlabel(memory_label(measure, x))
        ax.set_ylabel("training iterations per second (it/s)")
        ax.set_title(textwrap.fill(f"{title}", 70) + f"\n{devices_text(g)}", fontsize=10)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    return _save(fig, path)


def _int(value) -> str:
    try:
        return str(int(value))
    except (TypeError, ValueError):
        return "?"


# ----------------------------------------------------------------------------- curves


def curve_runs(histories: pd.DataFrame, key: str) -> list:
    """Runs with at least :data:`MIN_CURVE_POINTS` values of ``key`` (fewer make no curve)."""
    h = histories[histories["key"] == key] if len(histories) else histories
    counts = h.groupby("run_id")["step"].nunique() if len(h) else pd.Series(dtype=int)
    return [r for r, n in counts.items() if n >= MIN_CURVE_POINTS]


def plot_curves(histories: pd.DataFrame, path: Path, keys: Sequence[str], runs: Optional[pd.DataFrame] = None,
                labels: Optional[Mapping[str, str]] = None, title: str = "Quality over training") -> Optional[Path]:
    """One panel per metric key (e.g. ``eval/fid_rf``, ``eval/kid_rf_mean``), one line per run,
    x = training iteration. ``histories`` is :func:`analysis.runs.metric_histories`' long
    frame; ``runs`` (the runs frame) names the devices. A run is drawn only with at least
    :data:`MIN_CURVE_POINTS` values; None (no file) when no run has that many."""
    plt = _plt()
    drawn = {key: curve_runs(histories, key) for key in keys}
    keys = [k for k in keys if drawn[k]]
    if not keys:
        return None
    dev = devices_text(runs if runs is not None else pd.DataFrame())
    fig, axes = plt.subplots(1, len(keys), figsize=(5.8 * len(keys), 4.3), squeeze=False)
    for ax, key in zip(axes[0], keys):
        h = histories[(histories["key"] == key) & histories["run_id"].isin(drawn[key])]
        for run_id, line in h.groupby("run_id", sort=False):
            line = line.sort_values("step")
            ax.plot(line["step"], line["value"], marker="o", ms=5, label=(labels or {}).get(run_id, str(run_id)[:8]))
        ax.set_xlabel("training iteration")
        ax.set_ylabel(quality_label(key))
        ax.set_title(f"{title}: {quality_label(key)} (lower is better)\n{dev}", fontsize=10)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    return _save(fig, path)


# ----------------------------------------------------------------------------- per-phase memory


def phase_frame(df: pd.DataFrame, measure: str = "peak_live_tensors_mb") -> pd.DataFrame:
    """Per-phase peaks ``mem/<phase>/<measure>`` as columns named after the phases."""
    cols = {p: f"metrics.mem/{p}/{measure}" for p in PHASES if f"metrics.mem/{p}/{measure}" in df.columns}
    return pd.DataFrame({p: df[c].astype(float) for p, c in cols.items()}, index=df.index)


def plot_memory_per_phase(df: pd.DataFrame, path: Path, measure: Optional[str] = None,
                          label_col: Optional[str] = None, reference: Optional[str] = None,
                          title: str = "Peak memory per training phase") -> Path:
    """Horizontal bars of each run's peak memory per phase (D step, G step, sampling, eval),
    a run's phases side by side.

    ``measure``: ``peak_live_tensors_mb`` / ``peak_allocated_mb`` / ``peak_reserved_mb``
    (default: allocated on CUDA, live tensors otherwise). ``reference``: the label of the row
    whose run peak is drawn as a dashed line (e.g. the baseline)."""
    plt = _plt()
    if measure is None:
        cuda = df["device"].map(lambda d: isinstance(d, str) and d not in ("cpu", "")).any() \
            and any(c.endswith("/peak_allocated_mb") for c in df.columns)
        measure = "peak_allocated_mb" if cuda else "peak_live_tensors_mb"
    phases = phase_frame(df, measure)
    phases = phases.loc[:, phases.notna().any(axis=0)]
    if phases.empty:
        return _empty(path, f"{title} — {devices_text(df)}", f"no per-phase {measure} metrics")
    labels = [_label(row, label_col) for _, row in df.iterrows()]
    n, k = len(df), phases.shape[1]
    fig, ax = plt.subplots(figsize=(8.5, max(2.5, 0.26 * n * k + 1.6)))
    ypos = np.arange(n)[::-1].astype(float)
    height = 0.8 / k
    for j, phase in enumerate(phases.columns):
        offset = (k - 1) / 2 - j
        ax.barh(ypos + offset * height, phases[phase].fillna(0.0).to_numpy(), height, color=PHASE_COLOURS.get(phase),
                label=phase)
    if reference is not None and reference in labels:
        ref = float(np.nanmax(phases.iloc[labels.index(reference)].to_numpy()))
        ax.axvline(ref, c="black", ls="--", lw=1, label=f"{reference} peak ({ref:.1f} MiB)")
    ax.set_yticks(ypos)
    ax.set_yticklabels(labels, fontsize=8)
    ax.set_xlabel(memory_label(None, measure))
    ax.set_title(f"{title}\n{devices_text(df)}", fontsize=10)
    ax.grid(axis="x", alpha=0.3)
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    return _save(fig, path)


# ----------------------------------------------------------------------------- ablation


def _isnum(v) -> bool:
    try:
        return v is not None and not math.isnan(float(v))
    except (TypeError, ValueError):
        return False


def plot_ablation_changes(table: pd.DataFrame, path: Path, column: str, device: str,
                          measure_label: str, title: str = "Memory guide: measured change vs claim",
                          claims: bool = True, lower_is_better: bool = True) -> Path:
    """Per item: a solid bar for the measured change (%; green = better: less memory, or more
    it/s with ``lower_is_better=False``) and, with ``claims``, a hatched bar spanning the guide's
    claimed saving where it gave a number. A grey band around 0 marks the run-to-run variation
    when the table has a ``rerun`` row (the baseline run twice)."""
    plt = _plt()
    has_value = table[column].map(_isnum) if column in table.columns else pd.Series(False, index=table.index)
    has_claim = table["claim_low_pct"].map(_isnum) if claims else pd.Series(False, index=table.index)
    rows = table[(has_value | has_claim) & (table["key"] != "baseline")]
    if not has_value.any():
        return _empty(path, f"{title} — device: {device}", "no measured change (baseline or items missing)")
    fig, ax = plt.subplots(figsize=(9.0, max(2.8, 0.5 * len(rows) + 1.6)))
    ypos = np.arange(len(rows))[::-1].astype(float)
    values = [float(v) if _isnum(v) else math.nan for v in rows[column]]
    claimed_shown = False
    for y, v, (_, row) in zip(ypos, values, rows.iterrows()):
        if not math.isnan(v):
            better = v < 0 if lower_is_better else v > 0
            ax.barh(y + 0.17, v, 0.34, color="tab:green" if better or v == 0 else "tab:red")
            ax.annotate(f"{v:+.1f} %", (v, y + 0.17), textcoords="offset points", xytext=(4 if v >= 0 else -4, -3),
                        ha="left" if v >= 0 else "right", fontsize=8)
        else:
            ax.annotate(str(row.get("status", "not measured")), (0, y + 0.17), textcoords="offset points",
                        xytext=(4, -3), fontsize=8, color="dimgray")
        if claims and _isnum(row.get("claim_low_pct")):
            lo, hi = float(row["claim_low_pct"]), float(row["claim_high_pct"])
            width = max(hi - lo, 0.8)
            ax.barh(y - 0.17, -width, 0.34, left=-lo + (width - (hi - lo)) / 2, color="none", edgecolor="dimgray",
                    hatch="//", label=None if claimed_shown else "guide's claimed saving")
            ax.annotate(f"claimed {row['claim']}", (-hi, y - 0.17), textcoords="offset points", xytext=(-4, -3),
                        ha="right", fontsize=7, color="dimgray")
            claimed_shown = True
    ax.axvline(0, c="black", lw=0.8)
    rerun = table[(table["key"] == "rerun")][column] if column in table.columns else pd.Series(dtype=float)
    if len(rerun) and _isnum(rerun.iloc[0]) and abs(float(rerun.iloc[0])) >= 0.05:
        noise = abs(float(rerun.iloc[0]))
        ax.axvspan(-noise, noise, color="gray", alpha=0.15, label=f"run-to-run variation (±{noise:.1f} %)")
        claimed_shown = True  # a legend is needed
    ax.set_yticks(ypos)
    ax.set_yticklabels([str(r["label"]) for _, r in rows.iterrows()], fontsize=8)
    ax.set_xlabel(f"change in {measure_label} vs baseline (%; "
                  f"{'negative = less memory' if lower_is_better else 'positive = faster'})")
    ax.set_title(f"{title}\ndevice: {device}", fontsize=10)
    ax.grid(axis="x", alpha=0.3)
    finite = [v for v in values if not math.isnan(v)]
    claims = [float(h) for h in rows["claim_high_pct"] if _isnum(h)]
    left = min([0.0, *finite, *(-c for c in claims)])
    right = max([0.0, *finite])
    span = max(right - left, 5.0)
    needs_room = left < 0  # labels of negative bars and claims are written to their left
    ax.set_xlim(left - (0.35 if needs_room else 0.05) * span, right + 0.15 * span)
    if claimed_shown:
        ax.legend(fontsize=8, loc="lower right")
    return _save(fig, path)



__all__ = [
    "MIN_CURVE_POINTS", "plot_memory_vs_quality", "plot_memory_vs_batch", "plot_throughput_vs_memory", "curve_runs",
    "plot_curves", "plot_memory_per_phase", "plot_ablation_changes", "phase_frame", "devices_text", "memory_label",
]
