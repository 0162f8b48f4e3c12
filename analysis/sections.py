"""What a report says, by kind: an ablation (the memory guide's table, measured) or a sweep /
experiment (Pareto fronts, memory against batch size, throughput, quality curves, memory per
phase). Every sentence in the findings is generated from measured numbers.

Each front, plot and table compares one feature extractor's numbers only: a quality column
(``fid_rf`` or ``fid``) holds one extractor's values and is labelled with it."""

from __future__ import annotations

from typing import Dict, List, Optional, Sequence, Tuple

import pandas as pd

from . import plots
from .ablation.table import (MEASURES, ablation_table, findings as ablation_findings, headline_measure,
                                     load_ablation, select_batch, table_header, table_markdown)
from .pareto import pareto_front
from .render import Report, fmt, frame_markdown, frame_text
from .runs import (MIN_TIMED_ITERATIONS, QUALITY_COLUMNS, extractor_of, load_runs, measured_throughput,
                           metric_histories, quality_label, quality_present)

QUALITY_OF = {col for cols in QUALITY_COLUMNS.values() for col in cols}
from .studies import load_sweep

CURVE_RUNS = 8
"""At most this many runs per quality-curve plot."""

THROUGHPUT_TEXT = (f"Iterations per second: each run's average over its timed iterations (those the live-tensor "
                   f"tracker did not measure). A run with fewer than {MIN_TIMED_ITERATIONS} timed iterations "
                   f"has its throughput reported as not measured")


def status_counts(df: pd.DataFrame) -> str:
    if df.empty or "status" not in df.columns:
        return "no runs"
    counts = df["status"].fillna("unknown").value_counts()
    return ", ".join(f"{n} {s}" for s, n in counts.items())


def devices(df: pd.DataFrame) -> str:
    return plots.devices_text(df).replace("device: ", "")


def _label(column: str) -> str:
    return {"peak_memory_mb": "peak memory (MiB)", "it_per_s": "iterations/s"}.get(column) or quality_label(column)


def _unmeasured(df: pd.DataFrame) -> int:
    raw = df["it_per_s"] if "it_per_s" in df.columns else pd.Series(dtype=float)
    return int((raw.notna() & measured_throughput(df).isna()).sum())


# ----------------------------------------------------------------------------- ablation


def build_ablation(report: Report, uri: Optional[str], batch: Optional[str]) -> None:
    df = load_ablation(report.name, uri)
    if df.empty:
        raise LookupError(f"experiment {report.name!r} has no runs tagged ablation_item")
    runs = select_batch(df, batch)
    table = ablation_table(df, batch)
    device = table.attrs.get("device") or devices(runs)
    measure = headline_measure(table)
    report.meta.update(device=device, batch=table.attrs.get("batch"), runs=status_counts(runs))
    out = report.out_dir
    table.to_csv(out / "ablation_table.csv", index=False)
    report.headline = table_markdown(table)
    report.add("The memory guide's table, measured", table_header(table), md_table=report.headline)
    images = [plots.plot_ablation_changes(table, out / "ablation_changes.png", f"{measure}_change_pct", device,
                                          MEASURES[measure])]
    if measure == "peak_allocated_mb":
        images.append(plots.plot_ablation_changes(table, out / "ablation_changes_reserved.png",
                                                  "peak_reserved_mb_change_pct", device, "peak CUDA reserved",
                                                  title="Memory guide: measured change in reserved memory vs claim"))
    report.add("Measured change per item", "Bars: measured change against the baseline; hatched: the guide's "
               "claimed saving where it gave a number.", images=images)
    order = {row.key: i for i, row in enumerate(table.itertuples())}
    labelled = runs.assign(label=runs["tags.ablation_item"].map(dict(zip(table["key"], table["label"]))))
    labelled = labelled.sort_values("tags.ablation_item", key=lambda s: s.map(order))
    report.add("Memory per phase", "Peak memory of each phase of each run (D step, G step, and on CUDA sampling "
               "and evaluation); the dashed line is the baseline's peak.",
               images=[plots.plot_memory_per_phase(labelled, out / "memory_per_phase.png", measure=measure,
                                                   label_col="label", reference="baseline")])
    report.add("Throughput", f"{THROUGHPUT_TEXT}. Bars: change against the baseline; the grey band is the difference "
               "between two runs of the baseline (run-to-run variation).", images=[
        plots.plot_ablation_changes(table, out / "throughput_changes.png", "it_per_s_change_pct", device,
                                    "iterations/s", title="Memory guide: measured change in training speed",
                                    claims=False, lower_is_better=False)])
    report.findings = ablation_findings(table)


# ----------------------------------------------------------------------------- fronts

Objectives = Tuple[List[str], List[str]]
"""(metric columns, directions) of one Pareto front."""


def _objective_sets(df: pd.DataFrame, objectives: Sequence[Dict[str, str]]) -> List[Objectives]:
    """The study's objectives when the frame has them; otherwise peak memory against each FID
    column with values (one front per extractor)."""
    if objectives and all(o["metric"] in df.columns for o in objectives):
        return [([o["metric"] for o in objectives], [o["direction"] for o in objectives])]
    return [(["peak_memory_mb", q], ["minimize", "minimize"]) for q in quality_present(df)]


def _front_columns(df: pd.DataFrame, metrics: Sequence[str]) -> List[str]:
    base = ["trial_number"] if "trial_number" in df.columns else ["run_name"]
    searched = [c for c in df.columns if c.startswith("trial_params.")] or \
        [c for c in ("batch_size", "samples_per_ray", "rays_per_patch", "amp_policy") if c in df.columns]
    fids = {cols[0]: cols[1] for cols in QUALITY_COLUMNS.values()}  # FID column -> its KID mean column
    kids = [fids[m] for m in metrics if m in fids]
    shown = [c for c in dict.fromkeys([*metrics, "peak_memory_mb", *kids, "it_per_s"]) if c in df.columns]
    return [*base, *searched, *shown, "pareto_status", "run_id"]


COMPARABLE = ("data_digest", "eval_resolution", "eval_samples")
"""FIDs and KIDs compare only between runs scored on the same data (its fingerprint), at the same
image size and with the same number of fakes; each such group gets fronts of its own."""


def comparable_groups(df: pd.DataFrame, metrics: Sequence[str]) -> List[Tuple[str, pd.DataFrame]]:
    """(label, runs) of each group of runs whose ``metrics`` can share a front: one group when no
    quality metric is among them, else one per (data fingerprint, evaluated size, fakes) with a
    run that has every metric. Runs lacking a column's value form a group of their own."""
    keys = [k for k in COMPARABLE if k in df.columns]
    scored = [m for m in metrics if m in QUALITY_OF or m.startswith("view_")]
    if not keys or not scored or df.empty:
        return [("", df)]
    values = df[keys].astype(object).where(df[keys].notna(), None)
    groups = []
    for key, sub in df.groupby([values[k].map(str) for k in keys], sort=False):
        if not sub[list(metrics)].notna().all(axis=1).any():
            continue
        digest, size, fakes = (dict(zip(keys, key)).get(k, "None") for k in COMPARABLE)
        groups.append((f"data {digest[:10] if digest != 'None' else 'unknown'}, {_num(size)} px, "
                       f"{_num(fakes)} fakes", sub))
    return groups or [("", df)]


def _num(text: str) -> str:
    try:
        return f"{float(text):g}"
    except ValueError:
        return "?"


def _front_section(report: Report, df: pd.DataFrame, objectives: Objectives, suffix: str,
                   feasible: Optional[str], budget: Optional[float], group: str = "") -> pd.DataFrame:
    """One Pareto front: CSV, table and plot; returns the front's rows (columns renamed)."""
    metrics, directions = objectives
    ranked = pareto_front(df, metrics, directions, feasible=feasible, memory_budget_mb=budget)
    cols = [c for c in _front_columns(ranked, metrics) if c in ranked.columns]
    front = ranked[ranked["on_front"]][cols].rename(
        columns=lambda c: c.replace("trial_params.", "").replace("trial_number", "trial"))
    if len(front):
        front.to_csv(report.out_dir / f"pareto_front{suffix}.csv", index=False)
    n_failed = int(((df["status"] != "FINISHED") | df[metrics].isna().any(axis=1)).sum()) if len(df) else 0
    labels = [_label(m) for m in metrics]
    text = (f"Objectives: {', '.join(f'{label} ({d})' for label, d in zip(labels, directions))}. Front computed "
            f"among finished, feasible runs with every objective measured; {n_failed} run(s) failed or lack an "
            f"objective.")
    where = f" ({group})" if group else ""
    if group:
        text += f" Only runs scored on the same data, image size and number of fakes share a front: {group}."
    plot = plots.plot_memory_vs_quality(df, report.out_dir / f"pareto{suffix}.png", x=metrics[0], y=metrics[1],
                                        directions=directions[:2], feasible=feasible, memory_budget_mb=budget,
                                        label_col="label", title=f"{report.name}: {labels[0]} vs {labels[1]}{where}")
    report.add(f"Pareto front: {labels[0]} vs {labels[1]}{where}", text,
               md_table=frame_markdown(front) if len(front) else "_(empty front)_", images=[plot])
    return front


def _curve_sections(report: Report, candidates: pd.DataFrame, uri: Optional[str]) -> None:
    """FID and KID over training, one plot per extractor, runs with >= MIN_CURVE_POINTS
    evaluations only."""
    for fid in quality_present(candidates):
        fid_col, kid_col = QUALITY_COLUMNS[extractor_of(fid)][:2]
        runs = candidates[candidates[fid].notna()].head(CURVE_RUNS)
        keys = [f"eval/{fid_col}", f"eval/{kid_col}"]
        hist = metric_histories(runs["run_id"], keys, uri)
        labels = dict(zip(runs["run_id"], runs["label"]))
        image = plots.plot_curves(hist, report.out_dir / f"curves_{fid_col}.png", keys, runs=runs, labels=labels,
                                  title=f"{report.name}: quality over training")
        drawn = len(plots.curve_runs(hist, keys[0]))
        rule = f"a run is drawn only when it was evaluated at {plots.MIN_CURVE_POINTS} or more iterations"
        text = (f"{drawn} of {len(runs)} run(s) drawn ({rule}; `train.eval_every` sets how often)." if image else
                f"Not drawn: none of the {len(runs)} run(s) was evaluated at {plots.MIN_CURVE_POINTS} or more "
                f"iterations (`train.eval_every` sets how often); their final values are in the tables.")
        report.add(f"{quality_label(fid_col)} over training", text, images=[image])


def build_frontier(report: Report, df: pd.DataFrame, objectives: Sequence[Dict[str, str]], uri: Optional[str],
                   feasible: Optional[str] = None, memory_budget_mb: Optional[float] = None) -> None:
    """The sections of a sweep or an experiment: fronts, memory vs batch size, throughput,
    quality curves and memory per phase, then the findings."""
    out = report.out_dir
    label = df["trial_number"].map(lambda n: f"#{int(n)}" if pd.notna(n) else None) \
        if "trial_number" in df.columns else df["run_name"]
    raw = df.assign(label=label)
    df = raw.assign(it_per_s=measured_throughput(raw))  # tables and fronts show measured throughput only
    sets = _objective_sets(df, objectives)
    report.meta.update(device=devices(df), runs=status_counts(df), objectives="; ".join(
        ", ".join(f"{m} ({d})" for m, d in zip(*s)) for s in sets))
    fronts = []
    for s in sets:
        groups = comparable_groups(df, s[0])
        for k, (group, sub) in enumerate(groups):
            suffix = ("" if len(sets) == 1 else f"_{s[0][1]}") + ("" if len(groups) == 1 else f"_{k + 1}")
            fronts.append((s, _front_section(report, sub, s, suffix, feasible, memory_budget_mb, group)))
    if not sets:
        report.add("Pareto front", "No run has an FID (neither `fid_rf` nor `fid`): no quality front.")
    report.headline = "\n\n".join(f"{' vs '.join(s[0])}:\n" + (frame_text(f) if len(f) else "(empty front)")
                                  for s, f in fronts) or "(no front)"
    report.add("Peak memory vs batch size", "One line per samples per ray; dashed: AMP on.",
               images=[plots.plot_memory_vs_batch(df, out / "memory_vs_batch.png")])
    finished = raw[raw["status"] == "FINISHED"]
    report.add("Throughput vs memory", f"{THROUGHPUT_TEXT}: {_unmeasured(finished)} finished run(s) left out.",
               images=[plots.plot_throughput_vs_memory(finished, out / "throughput_vs_memory.png")])
    on_front = [r for _, f in fronts for r in f["run_id"].dropna()]
    chosen = df[df["run_id"].isin(on_front)] if on_front else df[df["status"] == "FINISHED"]
    _curve_sections(report, chosen, uri)
    phase_runs = chosen.head(12)
    if len(phase_runs):
        report.add("Memory per phase", "Runs on the front(s), or the first finished runs.", images=[
            plots.plot_memory_per_phase(phase_runs, out / "memory_per_phase.png", label_col="label")])
    report.findings = frontier_findings(df, fronts)


def frontier_findings(df: pd.DataFrame, fronts: Sequence[Tuple[Objectives, pd.DataFrame]]) -> List[str]:
    out = [f"{len(df)} run(s): {status_counts(df)}; device(s): {devices(df)}."]
    reasons = df["failure_reason"].dropna().value_counts() if "failure_reason" in df.columns else pd.Series(dtype=int)
    if len(reasons):
        out.append("Failures by reason: " + ", ".join(f"{r} ×{n}" for r, n in reasons.items()) + ".")
    for (metrics, directions), front in fronts:
        m0, q = metrics[0], metrics[1]
        what = f"{_label(m0)} vs {_label(q)}"
        if front.empty:
            out.append(f"No run has both {m0} and {q} measured: the front ({what}) is empty.")
            continue
        ident = "trial" if "trial" in front.columns else "run_name"
        lo = front.sort_values(m0, ascending=directions[0] == "minimize").iloc[0]
        best = front.sort_values(q, ascending=directions[1] == "minimize").iloc[0]
        out.append(f"The Pareto front ({what}) has {len(front)} point(s). Best {m0} on it: {fmt(lo[m0])} with "
                   f"{q} {fmt(lo[q])} ({ident} {fmt(lo.get(ident))}); best {q}: {fmt(best[q])} at {m0} "
                   f"{fmt(best[m0])} ({ident} {fmt(best.get(ident))}).")
    return out


def build_sweep(report: Report, uri: Optional[str], storage: Optional[str]) -> None:
    df = load_sweep(report.name, uri, storage)
    report.meta.update(parent_run_id=df.attrs.get("parent_run_id"))
    feasible = "trial_feasible" if "trial_feasible" in df.columns else None
    if feasible:
        df["trial_feasible"] = df["trial_feasible"].astype("boolean").fillna(True).astype(bool)
    build_frontier(report, df, df.attrs.get("objectives") or [], uri, feasible=feasible,
                   memory_budget_mb=df.attrs.get("memory_budget_mb"))


def build_experiment(report: Report, uri: Optional[str]) -> None:
    df = load_runs(uri, experiments=[report.name])
    if df.empty:
        raise LookupError(f"experiment {report.name!r} has no runs")
    build_frontier(report, df, [], uri)
