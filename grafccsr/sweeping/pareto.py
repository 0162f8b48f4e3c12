"""The Pareto front of a study: rows for the console, JSON for MLflow, a matplotlib plot."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

from grafccsr.sweeping.spec import StudySpec, short_names

# Columns shown for every trial, whatever the objectives are.
REPORT_METRICS = [("peak_memory_mb", "peak MB"), ("fid_rf", "FID (rf)"), ("kid_rf_mean", "KID (rf)"),
                  ("fid", "FID"), ("kid_mean", "KID"), ("it_per_s", "it/s")]


def is_feasible(trial) -> bool:
    return all(v <= 0.0 for v in trial.constraints.values())


def pareto_trials(study) -> List[Any]:
    """Optuna's front: COMPLETE trials, feasible ones only once any trial carries a constraint."""
    return sorted(study.best_trials, key=lambda t: t.number)


def trial_row(trial, spec: StudySpec) -> Dict[str, Any]:
    attrs = trial.user_attrs
    row: Dict[str, Any] = {"trial": trial.number, "state": trial.state.name}
    row.update({f"param:{k}": v for k, v in trial.params.items()})
    for metric, _ in REPORT_METRICS:
        row[metric] = attrs.get(metric)
    if trial.values is not None:
        for objective, value in zip(spec.objectives, trial.values):
            row[f"objective:{objective.metric}"] = value
    row["feasible"] = is_feasible(trial)
    row["constraints"] = dict(trial.constraints)
    row["failure_reason"] = attrs.get("failure_reason")
    row["mlflow_run_id"] = attrs.get("mlflow_run_id")
    row["run_dir"] = attrs.get("run_dir")
    return row


def pareto_payload(study, spec: StudySpec, front: Sequence[Any]) -> Dict[str, Any]:
    return {
        "study_name": spec.study_name,
        "objectives": [{"metric": o.metric, "direction": o.direction} for o in spec.objectives],
        "memory_budget_mb": spec.memory_budget_mb,
        "n_trials": len(study.get_trials(deepcopy=False)),
        "pareto": [trial_row(t, spec) for t in front],
    }


def _fmt(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        if not math.isfinite(value):
            return str(value)
        if 1000 <= abs(value) < 1e7:
            return f"{value:.0f}"
        return f"{value:.4g}"
    return str(value)


def format_table(front: Sequence[Any], spec: StudySpec) -> str:
    names = short_names(list(spec.search_space))
    metrics = [(m, label) for m, label in REPORT_METRICS if any(t.user_attrs.get(m) is not None for t in front)]
    headers = ["trial", *names.values(), *(label for _, label in metrics), "mlflow run"]
    rows = []
    for trial in front:
        attrs = trial.user_attrs
        rows.append([str(trial.number), *(_fmt(trial.params.get(k)) for k in names),
                     *(_fmt(attrs.get(m)) for m, _ in metrics), attrs.get("mlflow_run_id") or "-"])
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(headers)]
    lines = ["  ".join(h.ljust(w) for h, w in zip(headers, widths)),
             "  ".join("-" * w for w in widths)]
    lines += ["  ".join(c.ljust(w) for c, w in zip(r, widths)) for r in rows]
    return "\n".join(lines)


def plot_front(study, spec: StudySpec, front: Sequence[Any], path: Path) -> Optional[Path]:
    """Scatter of the first objective against each other one (up to three panels): feasible
    trials, infeasible (over the memory budget) trials and the front. None if nothing to plot."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt
    from optuna.trial import TrialState

    complete = [t for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))]
    if not complete:
        return None
    front_numbers = {t.number for t in front}
    objectives = spec.objectives
    if len(objectives) == 1:
        pairs = [(None, 0)]
    else:
        pairs = [(0, j) for j in range(1, min(len(objectives), 4))]
    fig, axes = plt.subplots(1, len(pairs), figsize=(5.5 * len(pairs), 4.5), squeeze=False)
    for ax, (i, j) in zip(axes[0], pairs):
        def xy(trials):
            xs = [t.number if i is None else t.values[i] for t in trials]
            return xs, [t.values[j] for t in trials]

        feasible = [t for t in complete if is_feasible(t) and t.number not in front_numbers]
        infeasible = [t for t in complete if not is_feasible(t)]
        on_front = sorted((t for t in complete if t.number in front_numbers),
                          key=lambda t: (t.number if i is None else t.values[i]))
        if feasible:
            ax.scatter(*xy(feasible), c="tab:blue", alpha=0.6, label="trials")
        if infeasible:
            ax.scatter(*xy(infeasible), c="tab:gray", marker="x", label="over memory budget")
        if on_front:
            ax.scatter(*xy(on_front), c="tab:red", s=60, label="Pareto front", zorder=3)
            if i is not None:
                ax.plot(*xy(on_front), c="tab:red", alpha=0.4, drawstyle="steps-post")
            for t in on_front:
                x, y = xy([t])
                ax.annotate(f"#{t.number}", (x[0], y[0]), textcoords="offset points", xytext=(4, 4), fontsize=8)
        ax.set_xlabel("trial" if i is None else f"{objectives[i].metric} ({objectives[i].direction})")
        ax.set_ylabel(f"{objectives[j].metric} ({objectives[j].direction})")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    n_failed = len(study.get_trials(deepcopy=False, states=(TrialState.FAIL, TrialState.PRUNED)))
    fig.suptitle(f"{spec.study_name}: {len(complete)} complete, {n_failed} failed/skipped trials")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_front_html(study, spec: StudySpec, path: Path) -> Optional[Path]:
    """Optuna's interactive Pareto plot, only if plotly is installed."""
    if len(spec.objectives) < 2:
        return None
    try:
        import plotly  # noqa: F401
        import optuna.visualization as vis
    except ImportError:
        return None
    try:
        fig = vis.plot_pareto_front(study, target_names=spec.metric_names)
        fig.write_html(str(path))
    except Exception:
        return None
    return path
