"""Reports from MLflow runs: ``reports/<name>/report.md`` + ``report.html`` + PNGs + CSV.

``python -m analysis.report [--name EXPERIMENT_OR_STUDY] [--tracking-uri URI] [--storage URL]
[--out reports/] [--kind auto|ablation|sweep|experiment] [--batch ID] [--no-log]``

What ``--name`` means is found out in this order: an Optuna study of that name in the storage
(or an MLflow parent run tagged ``sweep_study=<name>``) is a **sweep** (Pareto plot and front
table, trials joined with their runs); an MLflow experiment whose runs carry ``ablation_item``
tags is an **ablation** (the memory guide's claims next to the measured changes, memory per
phase); any other experiment gets the generic report (memory vs FID with its front, memory vs
batch size, throughput vs memory, quality curves, memory per phase).

The report is logged to MLflow: under ``report/`` of the sweep's parent run, or as a new run
tagged ``analysis_report=true`` in the experiment (the loaders skip such runs). Every sentence
in "Findings" is generated from the measured numbers.
"""

from __future__ import annotations

import argparse
import base64
import html
import math
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

import pandas as pd

from analysis import plots
from analysis.ablation import (ablation_table, findings as ablation_findings, headline_measure, load_ablation,
                               select_batch, table_header, table_markdown, MEASURES)
from analysis.pareto import pareto_front
from analysis.runs import (REPORT_TAG, client, default_storage_url, find_sweep_parent, load_runs, load_study,
                           load_sweep, metric_histories, resolve_tracking_uri, split_by_extractor, study_names)

KINDS = ("auto", "ablation", "sweep", "experiment")


@dataclass
class Report:
    name: str
    kind: str
    out_dir: Path
    sections: List[tuple] = field(default_factory=list)  # (title, markdown, html, [png paths])
    headline: str = ""
    findings: List[str] = field(default_factory=list)
    images: List[Path] = field(default_factory=list)
    files: List[Path] = field(default_factory=list)
    meta: Dict[str, Any] = field(default_factory=dict)

    def add(self, title: str, text: str = "", table: Optional[pd.DataFrame] = None, md_table: Optional[str] = None,
            images: Sequence[Path] = ()) -> None:
        self.sections.append((title, text, table, md_table, list(images)))
        self.images.extend(images)


# ----------------------------------------------------------------------------- helpers


def _fmt(v: Any, digits: int = 4) -> str:
    if v is None:
        return "—"
    if isinstance(v, (bool,)):
        return str(v)
    if isinstance(v, float):
        if math.isnan(v):
            return "—"
        return f"{v:.{digits}g}"
    try:
        if pd.isna(v):
            return "—"
    except (TypeError, ValueError):
        pass
    return str(v)


def frame_markdown(df: pd.DataFrame) -> str:
    if df.empty:
        return "_(no rows)_"
    cols = list(df.columns)
    lines = ["| " + " | ".join(str(c) for c in cols) + " |", "|" + "|".join("---" for _ in cols) + "|"]
    for _, r in df.iterrows():
        lines.append("| " + " | ".join(_fmt(r[c]).replace("|", "\\|") for c in cols) + " |")
    return "\n".join(lines)


def frame_text(df: pd.DataFrame) -> str:
    """A plain aligned table for the terminal."""
    if df.empty:
        return "(no rows)"
    cells = [[str(c) for c in df.columns]] + [[_fmt(r[c]) for c in df.columns] for _, r in df.iterrows()]
    widths = [max(len(row[i]) for row in cells) for i in range(len(cells[0]))]
    lines = ["  ".join(v.ljust(w) for v, w in zip(row, widths)) for row in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def _status_counts(df: pd.DataFrame) -> str:
    if df.empty or "status" not in df.columns:
        return "no runs"
    counts = df["status"].fillna("unknown").value_counts()
    return ", ".join(f"{n} {s}" for s, n in counts.items())


def _devices(df: pd.DataFrame) -> str:
    return plots.devices_text(df).replace("device: ", "")


# ----------------------------------------------------------------------------- kinds


def detect_kind(name: str, uri: Optional[str] = None, storage: Optional[str] = None) -> str:
    if name in study_names(storage):
        return "sweep"
    cl = client(uri)
    exp = cl.get_experiment_by_name(name)
    if exp is not None:
        found = cl.search_runs([exp.experiment_id], filter_string="tags.ablation_item != ''", max_results=1)
        return "ablation" if len(found) else "experiment"
    if find_sweep_parent(name, uri) is not None:
        return "sweep"
    experiments = sorted(e.name for e in cl.search_experiments())
    raise LookupError(f"{name!r} is neither an Optuna study in {storage or default_storage_url()} "
                      f"(studies: {study_names(storage) or 'none'}) nor an MLflow experiment in "
                      f"{resolve_tracking_uri(uri)} (experiments: {experiments or 'none'})")


# ----------------------------------------------------------------------------- ablation


def build_ablation(report: Report, uri: Optional[str], batch: Optional[str]) -> None:
    df = load_ablation(report.name, uri)
    if df.empty:
        raise LookupError(f"experiment {report.name!r} has no runs tagged ablation_item")
    runs = select_batch(df, batch)
    table = ablation_table(df, batch)
    device = table.attrs.get("device") or _devices(runs)
    measure = headline_measure(table)
    report.meta.update(device=device, batch=table.attrs.get("batch"), runs=_status_counts(runs))
    out = report.out_dir
    table.to_csv(out / "ablation_table.csv", index=False)
    report.files.append(out / "ablation_table.csv")
    md = table_markdown(table)
    report.headline = md
    report.add("The memory guide's table, measured", table_header(table), md_table=md)
    chart = plots.plot_ablation_changes(table, out / "ablation_changes.png", f"{measure}_change_pct", device,
                                        MEASURES[measure])
    images = [chart]
    if measure == "peak_allocated_mb":
        images.append(plots.plot_ablation_changes(table, out / "ablation_changes_reserved.png",
                                                  "peak_reserved_mb_change_pct", device, "peak CUDA reserved",
                                                  title="Memory guide: measured change in reserved memory vs claim"))
    report.add("Measured change per item", "Bars: measured change against the baseline; hatched: the guide's "
               "claimed saving where it gave a number.", images=images)
    labelled = runs.copy()
    labels = {row.key: row.label for row in table.itertuples()}
    labelled["label"] = labelled["tags.ablation_item"].map(labels)
    order = {row.key: i for i, row in enumerate(table.itertuples())}
    labelled = labelled.sort_values("tags.ablation_item", key=lambda s: s.map(order))
    phase_measure = "peak_allocated_mb" if measure == "peak_allocated_mb" else "peak_live_tensors_mb"
    report.add("Memory per phase", "Peak memory of each phase of each run (D step, G step, and on CUDA sampling "
               "and evaluation); the dashed line is the baseline's peak.",
               images=[plots.plot_memory_per_phase(labelled, out / "memory_per_phase.png", measure=phase_measure,
                                                   label_col="label", reference="baseline")])
    report.add("Throughput", "Change in training iterations per second against the baseline; the grey band is "
               "the difference between two runs of the baseline (run-to-run variation).", images=[
        plots.plot_ablation_changes(table, out / "throughput_changes.png", "it_per_s_change_pct", device,
                                    "iterations/s", title="Memory guide: measured change in training speed",
                                    claims=False, lower_is_better=False)])
    report.findings = ablation_findings(table)


# ----------------------------------------------------------------------------- sweep / experiment


def _front_columns(df: pd.DataFrame, objectives: Sequence[str]) -> List[str]:
    searched = [c for c in df.columns if c.startswith("trial_params.")]
    base = ["trial_number"] if "trial_number" in df.columns else ["run_name"]
    if not searched:
        searched = [c for c in ("batch_size", "samples_per_ray", "rays_per_patch", "amp_policy") if c in df.columns]
    metrics = [c for c in ("peak_memory_mb", "fid", "kid_mean", "it_per_s") if c in df.columns]
    metrics += [o for o in objectives if o not in metrics and o in df.columns]
    return [*base, *searched, *metrics, "pareto_status", "run_id"]


def _rename(df: pd.DataFrame) -> pd.DataFrame:
    return df.rename(columns=lambda c: c.replace("trial_params.", "").replace("trial_number", "trial"))


def build_frontier(report: Report, df: pd.DataFrame, objectives: List[Dict[str, str]], uri: Optional[str],
                   feasible: Optional[str] = None, memory_budget_mb: Optional[float] = None) -> None:
    out = report.out_dir
    metrics = [o["metric"] for o in objectives]
    directions = [o["direction"] for o in objectives]
    missing = [m for m in metrics if m not in df.columns]
    if missing:  # objectives the frame has no column for: fall back to memory vs FID
        metrics, directions = ["peak_memory_mb", "fid"], ["minimize", "minimize"]
    report.meta.update(device=_devices(df), runs=_status_counts(df), objectives=", ".join(
        f"{m} ({d})" for m, d in zip(metrics, directions)))
    label_col = None
    if "trial_number" in df.columns:
        df = df.assign(label=df["trial_number"].map(lambda n: f"#{int(n)}" if pd.notna(n) else None))
        label_col = "label"
    quality = metrics[1] if len(metrics) > 1 else "fid"
    groups = split_by_extractor(df, quality) if quality in ("fid", "kid_mean", "kid_std") else {"": df}
    if not groups:
        groups = {"": df}
    fronts = []
    for extractor, g in groups.items():
        ranked = pareto_front(g, metrics, directions, feasible=feasible, memory_budget_mb=memory_budget_mb)
        cols = [c for c in _front_columns(ranked, metrics) if c in ranked.columns]
        front = _rename(ranked[ranked["on_front"]][cols])
        if len(front):
            front.insert(0, "fid_extractor", extractor)
        fronts.append(front)
    front = pd.concat(fronts, ignore_index=True) if fronts else pd.DataFrame()
    if len(front):
        front.to_csv(out / "pareto_front.csv", index=False)
        report.files.append(out / "pareto_front.csv")
    n_failed = int(((df["status"] != "FINISHED") | df[metrics].isna().any(axis=1)).sum()) if len(df) else 0
    desc = (f"Objectives: {report.meta['objectives']}. Front computed among finished, feasible runs with both "
            f"values; {n_failed} run(s) failed or lack an objective. FID values of different extractors are "
            "never compared (one front per extractor).")
    report.headline = frame_text(front) if len(front) else "(empty Pareto front)"
    report.add("Pareto front", desc, md_table=frame_markdown(front) if len(front) else "_(empty front)_",
               images=[plots.plot_memory_vs_quality(df, out / "pareto.png", x=metrics[0], y=quality,
                                                    directions=directions[:2], feasible=feasible,
                                                    memory_budget_mb=memory_budget_mb, label_col=label_col,
                                                    title=f"{report.name}: peak memory vs {quality.upper() if quality == 'fid' else quality}")])
    report.add("Peak memory vs batch size", "One line per samples per ray; dashed: AMP on.",
               images=[plots.plot_memory_vs_batch(df, out / "memory_vs_batch.png")])
    report.add("Throughput vs memory", "", images=[
        plots.plot_throughput_vs_memory(df[df["status"] == "FINISHED"], out / "throughput_vs_memory.png")])
    finished_front = front["run_id"].dropna().tolist() if len(front) else []
    curve_runs = df[df["run_id"].isin(finished_front)] if finished_front else df[df["status"] == "FINISHED"].head(6)
    curve_images = []
    for extractor, g in (split_by_extractor(curve_runs, "fid") or {}).items():
        ids = g["run_id"].tolist()[:8]
        hist = metric_histories(ids, ["eval/fid", "eval/kid_mean"], uri)
        labels = {r.run_id: (f"#{int(r.trial_number)}" if "trial_number" in g.columns and pd.notna(r.trial_number)
                             else str(r.run_name)) for r in g.itertuples()}
        curve_images.append(plots.plot_curves(hist, out / f"curves_{_slug(extractor)}.png", runs=g, labels=labels,
                                              title=f"{report.name}: quality over training"))
    if curve_images:
        report.add("FID/KID over training", "Runs on the front (or the first finished runs).", images=curve_images)
    phase_runs = df[df["run_id"].isin(finished_front)] if finished_front else df[df["status"] == "FINISHED"].head(12)
    if len(phase_runs):
        report.add("Memory per phase", "", images=[plots.plot_memory_per_phase(
            phase_runs.assign(label=phase_runs.get("label", phase_runs["run_name"])), out / "memory_per_phase.png",
            label_col="label")])
    report.findings = frontier_findings(df, front, metrics, directions)


def _slug(text: str) -> str:
    return "".join(ch if ch.isalnum() or ch in "-_" else "-" for ch in str(text) or "all") or "all"


def frontier_findings(df: pd.DataFrame, front: pd.DataFrame, metrics: Sequence[str], directions: Sequence[str]) -> List[str]:
    out = [f"{len(df)} run(s): {_status_counts(df)}; device(s): {_devices(df)}."]
    reasons = df["failure_reason"].dropna().value_counts() if "failure_reason" in df.columns else pd.Series(dtype=int)
    if len(reasons):
        out.append("Failures by reason: " + ", ".join(f"{r} ×{n}" for r, n in reasons.items()) + ".")
    if front.empty:
        out.append("No run has every objective measured: the front is empty.")
        return out
    m0 = metrics[0]
    q = metrics[1] if len(metrics) > 1 else None
    for extractor, g in front.groupby("fid_extractor") if "fid_extractor" in front.columns else [("", front)]:
        label = f" ({extractor} features)" if extractor else ""
        out.append(f"The Pareto front{label} has {len(g)} point(s).")
        if q and q in g.columns and m0 in g.columns and len(g) > 0:
            lo = g.sort_values(m0).iloc[0]
            best = g.sort_values(q, ascending=directions[1] == "minimize").iloc[0]
            ident = "trial" if "trial" in g.columns else "run_name"
            out.append(f"Lowest {m0} on the front: {_fmt(lo[m0])} with {q} {_fmt(lo[q])} "
                       f"({ident} {_fmt(lo.get(ident))}); best {q}: {_fmt(best[q])} at {m0} {_fmt(best[m0])} "
                       f"({ident} {_fmt(best.get(ident))}).")
    return out


def build_sweep(report: Report, uri: Optional[str], storage: Optional[str]) -> None:
    df = load_sweep(report.name, uri, storage)
    report.meta.update(parent_run_id=df.attrs.get("parent_run_id"))
    budget = None
    study = load_study(report.name, storage)
    if study is not None:
        budget = study.user_attrs.get("memory_budget_mb")
    feasible = "trial_feasible" if "trial_feasible" in df.columns else None
    if feasible:
        df["trial_feasible"] = df["trial_feasible"].astype("boolean").fillna(True).astype(bool)
    build_frontier(report, df, df.attrs.get("objectives") or [], uri, feasible=feasible,
                   memory_budget_mb=float(budget) if budget is not None else None)


def build_experiment(report: Report, uri: Optional[str]) -> None:
    df = load_runs(uri, experiments=[report.name])
    if df.empty:
        raise LookupError(f"experiment {report.name!r} has no runs")
    build_frontier(report, df, [{"metric": "peak_memory_mb", "direction": "minimize"},
                                {"metric": "fid", "direction": "minimize"}], uri)


# ----------------------------------------------------------------------------- writing


def render_markdown(report: Report) -> str:
    lines = [f"# Report: {report.name}", "",
             f"Kind: {report.kind} · generated {time.strftime('%Y-%m-%d %H:%M:%S')} · "
             + " · ".join(f"{k.replace('_', ' ')}: {v}" for k, v in report.meta.items() if v not in (None, "")), ""]
    for title, text, table, md_table, images in report.sections:
        lines += [f"## {title}", ""]
        if text:
            lines += [text, ""]
        if md_table:
            lines += [md_table, ""]
        if table is not None:
            lines += [frame_markdown(table), ""]
        for img in images:
            lines += [f"![{Path(img).stem}]({Path(img).name})", ""]
    lines += ["## Findings (measured)", ""]
    lines += [f"- {f}" for f in report.findings] or ["- (none)"]
    return "\n".join(lines) + "\n"


def _md_table_to_html(md: str) -> str:
    rows = [r.strip() for r in md.strip().splitlines() if r.strip().startswith("|")]
    if len(rows) < 2:
        return f"<p>{html.escape(md)}</p>"

    def cells(r: str) -> List[str]:
        parts, cur, esc = [], "", False
        for ch in r.strip()[1:-1]:
            if esc:
                cur += ch
                esc = False
            elif ch == "\\":
                esc = True
            elif ch == "|":
                parts.append(cur.strip())
                cur = ""
            else:
                cur += ch
        parts.append(cur.strip())
        return parts

    head = "".join(f"<th>{html.escape(c)}</th>" for c in cells(rows[0]))
    body = "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in cells(r)) + "</tr>" for r in rows[2:])
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def render_html(report: Report) -> str:
    def inline(text: str) -> str:
        out = html.escape(text)
        out = out.replace("**", "")
        return out

    parts = [f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(report.name)}</title>",
             "<style>body{font-family:sans-serif;max-width:1200px;margin:auto;padding:1em}"
             "table{border-collapse:collapse;font-size:13px;margin:1em 0}td,th{border:1px solid #ccc;padding:3px 6px}"
             "th{background:#eee}img{max-width:100%;border:1px solid #ddd;margin:0.5em 0}</style></head><body>",
             f"<h1>Report: {html.escape(report.name)}</h1>",
             "<p>" + html.escape(f"Kind: {report.kind} · " + " · ".join(
                 f"{k.replace('_', ' ')}: {v}" for k, v in report.meta.items() if v not in (None, ""))) + "</p>"]
    for title, text, table, md_table, images in report.sections:
        parts.append(f"<h2>{html.escape(title)}</h2>")
        if text:
            parts.append(f"<p>{inline(text)}</p>")
        if md_table:
            parts.append(_md_table_to_html(md_table))
        if table is not None:
            parts.append(table.to_html(index=False, na_rep="—"))
        for img in images:
            data = base64.b64encode(Path(img).read_bytes()).decode()
            parts.append(f"<p><a href='{html.escape(Path(img).name)}'><img alt='{html.escape(Path(img).stem)}' "
                         f"src='data:image/png;base64,{data}'></a></p>")
    parts.append("<h2>Findings (measured)</h2><ul>")
    parts += [f"<li>{inline(f)}</li>" for f in report.findings]
    parts.append("</ul></body></html>")
    return "\n".join(parts)


def log_to_mlflow(report: Report, uri: Optional[str]) -> Optional[str]:
    """Sweep: artifacts under ``report/`` of the parent run. Otherwise a new FINISHED run tagged
    ``analysis_report=true`` in the experiment. Returns the run id."""
    cl = client(uri)
    parent = report.meta.get("parent_run_id")
    if report.kind == "sweep" and parent:
        cl.log_artifacts(parent, str(report.out_dir), artifact_path="report")
        return parent
    exp = cl.get_experiment_by_name(report.name)
    if exp is None:
        return None
    stamp = time.strftime("%Y%m%d-%H%M%S")
    run = cl.create_run(exp.experiment_id, run_name=f"report-{stamp}",
                        tags={REPORT_TAG: "true", "report_kind": report.kind, "mlflow.runName": f"report-{stamp}",
                              **({"ablation_batch_reported": str(report.meta["batch"])} if report.meta.get("batch") else {})})
    try:
        cl.log_artifacts(run.info.run_id, str(report.out_dir), artifact_path="report")
        cl.set_terminated(run.info.run_id, "FINISHED")
    except Exception:
        cl.set_terminated(run.info.run_id, "FAILED")
        raise
    return run.info.run_id


def write_report(name: str, uri: Optional[str] = None, storage: Optional[str] = None, out: Path = Path("reports"),
                 kind: str = "auto", batch: Optional[str] = None, log: bool = True, quiet: bool = False) -> Report:
    """Build and write ``<out>/<name>/report.md`` and ``report.html`` with their PNGs; log them to
    MLflow (unless ``log=False``) and print the headline table (unless ``quiet``)."""
    kind = detect_kind(name, uri, storage) if kind == "auto" else kind
    out_dir = Path(out) / _slug(name)
    out_dir.mkdir(parents=True, exist_ok=True)
    report = Report(name=name, kind=kind, out_dir=out_dir)
    report.meta["tracking_uri"] = resolve_tracking_uri(uri)
    if kind == "ablation":
        build_ablation(report, uri, batch)
    elif kind == "sweep":
        build_sweep(report, uri, storage)
    elif kind == "experiment":
        build_experiment(report, uri)
    else:
        raise ValueError(f"kind {kind!r} is not one of {KINDS}")
    md = out_dir / "report.md"
    md.write_text(render_markdown(report))
    page = out_dir / "report.html"
    page.write_text(render_html(report))
    report.files[:0] = [md, page]
    if log:
        try:
            report.meta["mlflow_report_run"] = log_to_mlflow(report, uri)
        except Exception as err:  # noqa: BLE001 - the files are written; say why MLflow failed
            print(f"warning: could not log the report to MLflow: {type(err).__name__}: {err}", file=sys.stderr)
    if not quiet:
        print(f"\n{report.kind} report for {name!r} ({report.meta.get('device') or ''})\n")
        print(report.headline)
        print("\nFindings:")
        for f in report.findings:
            print(f"  - {f}")
        print(f"\nwrote {md} and {page} ({len(report.images)} plots)"
              + (f"; logged to MLflow run {report.meta['mlflow_report_run']}" if report.meta.get("mlflow_report_run") else ""))
    return report


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m analysis.report",
                                description="Write reports/<name>/report.md (+ HTML, PNGs) from MLflow runs.")
    p.add_argument("--name", default="grafccsr", help="MLflow experiment or Optuna study name (default grafccsr)")
    p.add_argument("--tracking-uri", default=None, help="MLflow store (default sqlite:///<project>/mlflow.db)")
    p.add_argument("--storage", default=None, help="Optuna storage (default sqlite:///<project>/sweeps/optuna.db)")
    p.add_argument("--out", default="reports", help="output root (default reports/)")
    p.add_argument("--kind", choices=KINDS, default="auto")
    p.add_argument("--batch", default=None, help="ablation batch id (default: the latest)")
    p.add_argument("--no-log", action="store_true", help="do not log the report to MLflow")
    return p.parse_args(argv)


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parse_args(argv)
    try:
        write_report(args.name, uri=args.tracking_uri, storage=args.storage, out=Path(args.out), kind=args.kind,
                     batch=args.batch, log=not args.no_log)
    except LookupError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
