"""Reports from MLflow runs: ``reports/<name>/report.md`` + ``report.html`` + PNGs + CSV.

``python -m analysis.report [--name EXPERIMENT_OR_STUDY] [--tracking-uri URI] [--storage URL]
[--out reports/] [--kind auto|ablation|sweep|experiment] [--batch ID] [--no-log]``

``--tracking-uri`` is any MLflow tracking URI (the project's SQLite file by default, or an
``http(s)://`` tracking server); ``--storage`` any Optuna storage URL (default
``$GRAFCCSR_STORAGE``, else the project's ``sweeps/optuna.db``; ``journal:<file>``; a database
URL with a password belongs in ``$GRAFCCSR_STORAGE``, not on a command line that ``ps`` shows).
Both are read through their clients only.

What ``--name`` means is found out in this order: an Optuna study of that name in the storage
(or an MLflow parent run tagged ``sweep_study=<name>``) is a **sweep** (Pareto plot and front
table, trials joined with their runs); an MLflow experiment whose runs carry ``ablation_item``
tags is an **ablation** (the memory guide's claims next to the measured changes, memory per
phase); any other experiment gets the generic report (memory vs FID with its front, per
feature extractor; memory vs batch size, throughput vs memory, quality curves, memory per phase).

The report is logged to MLflow once per name and updated by later calls: under ``report/`` of
the sweep's parent run, or in the MLflow experiment ``reports`` (:data:`REPORTS_EXPERIMENT`),
apart from the training runs, as its one run named after the report and tagged
``report_of=<name>`` and ``analysis_report=true`` (the loaders skip such runs), created by the
first call.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Optional, Sequence

from .render import Report, render_html, render_markdown
from .runs import REPORT_TAG, all_experiments, client, redact, resolve_tracking_uri, search_runs, tag_filter
from .sections import build_ablation, build_experiment, build_sweep
from .studies import find_sweep_parent, study_names
from grafccsr.paths import program_name
from grafccsr.services.local import STORAGE_ENV
from grafccsr.sweeping.storage import has_password, resolve_storage_url

KINDS = ("auto", "ablation", "sweep", "experiment")
REPORTS_EXPERIMENT = "reports"
"""The MLflow experiment holding the reports (one run per reported experiment), so that the
runs table of an experiment lists its training runs only."""
REPORT_OF_TAG = "report_of"


def detect_kind(name: str, uri: Optional[str] = None, storage: Optional[str] = None) -> str:
    studies = study_names(storage)
    if name in studies:
        return "sweep"
    cl = client(uri)
    exp = cl.get_experiment_by_name(name)
    if exp is not None:
        found = cl.search_runs([exp.experiment_id], filter_string="tags.ablation_item != ''", max_results=1)
        return "ablation" if len(found) else "experiment"
    if find_sweep_parent(name, uri) is not None:
        return "sweep"
    names = sorted(all_experiments(cl).values())
    raise LookupError(f"{name!r} is neither an Optuna study in {redact(resolve_storage_url(storage))} "
                      f"(studies: {studies or 'none'}) nor an MLflow experiment in "
                      f"{redact(resolve_tracking_uri(uri))} (experiments: {names or 'none'})")


def reports_experiment_id(cl, uri: Optional[str]) -> str:
    """:data:`REPORTS_EXPERIMENT`'s id; created (race-free) as a model-training experiment with
    its artifacts beside a local store's training runs."""
    from mlflow.exceptions import MlflowException

    from grafccsr.tracking.store import artifact_root_for

    exp = cl.get_experiment_by_name(REPORTS_EXPERIMENT)
    if exp is not None:
        return exp.experiment_id
    tags = {"mlflow.experimentKind": "custom_model_development",
            "mlflow.note.content": "Reports of `make report` (`python -m analysis.report`): one run per reported "
                                   "experiment, its files under report/."}
    try:
        return cl.create_experiment(REPORTS_EXPERIMENT, artifact_location=artifact_root_for(resolve_tracking_uri(uri)),
                                    tags=tags)
    except MlflowException:  # created meanwhile by another report
        exp = cl.get_experiment_by_name(REPORTS_EXPERIMENT)
        if exp is None:
            raise
        return exp.experiment_id


def report_run_id(cl, name: str, reported_experiment_id: str, uri: Optional[str] = None) -> str:
    """The report run of experiment ``name`` in :data:`REPORTS_EXPERIMENT`: the latest one tagged
    ``report_of=<name>``, else a new one, named ``name``, whose description links the runs."""
    experiment_id = reports_experiment_id(cl, uri)
    found = search_runs(cl, [experiment_id], tag_filter({REPORT_OF_TAG: name, REPORT_TAG: "true"}))
    if found:
        return found[-1].info.run_id
    note = f"Report of the MLflow experiment [{name}](#/experiments/{reported_experiment_id}/runs): files under report/."
    run = cl.create_run(experiment_id, run_name=name,
                        tags={REPORT_TAG: "true", REPORT_OF_TAG: name, "report_of_experiment_id": reported_experiment_id,
                              "mlflow.runName": name, "mlflow.note.content": note})
    return run.info.run_id


def log_to_mlflow(report: Report, uri: Optional[str]) -> Optional[str]:
    """Sweep: artifacts under ``report/`` of the parent run. Otherwise the experiment's report run
    in :data:`REPORTS_EXPERIMENT` (:func:`report_run_id`), its ``report/`` artifacts re-logged
    (same names overwritten) and its tags updated. Returns the run id (None when there is no
    experiment of that name)."""
    cl = client(uri)
    parent = report.meta.get("parent_run_id")
    if report.kind == "sweep" and parent:
        cl.log_artifacts(parent, str(report.out_dir), artifact_path="report")
        return parent
    exp = cl.get_experiment_by_name(report.name)
    if exp is None:
        return None
    run_id = report_run_id(cl, report.name, exp.experiment_id, uri)
    cl.set_tag(run_id, "report_kind", report.kind)
    if report.meta.get("batch"):
        cl.set_tag(run_id, "ablation_batch_reported", str(report.meta["batch"]))
    try:
        cl.log_artifacts(run_id, str(report.out_dir), artifact_path="report")
    except Exception:
        cl.set_terminated(run_id, "FAILED")
        raise
    cl.set_terminated(run_id, "FINISHED")  # end time = this update
    return run_id


def write_report(name: str, uri: Optional[str] = None, storage: Optional[str] = None, out: Path = Path("reports"),
                 kind: str = "auto", batch: Optional[str] = None, log: bool = True, quiet: bool = False) -> Report:
    """Build and write ``<out>/<name>/report.md`` and ``report.html`` with their PNGs; log them to
    MLflow (unless ``log=False``) and print the headline table (unless ``quiet``)."""
    kind = detect_kind(name, uri, storage) if kind == "auto" else kind
    out_dir = Path(out) / "".join(ch if ch.isalnum() or ch in "-_" else "-" for ch in name)
    out_dir.mkdir(parents=True, exist_ok=True)
    for stale in (*out_dir.glob("*.png"), *out_dir.glob("*.csv"), out_dir / "report.md", out_dir / "report.html"):
        stale.unlink(missing_ok=True)  # an earlier report's files: the folder is logged as a whole
    report = Report(name=name, kind=kind, out_dir=out_dir)
    report.meta["tracking_uri"] = redact(resolve_tracking_uri(uri))
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
    if log:
        try:
            report.meta["mlflow_report_run"] = log_to_mlflow(report, uri)
        except Exception as err:  # noqa: BLE001 - the files are written; say why MLflow failed
            print(f"warning: could not log the report to MLflow: {type(err).__name__}: {err}", file=sys.stderr)
    if not quiet:
        _print_summary(report, md, page)
    return report


def _print_summary(report: Report, md: Path, page: Path) -> None:
    print(f"\n{report.kind} report for {report.name!r} ({report.meta.get('device') or ''})\n")
    print(report.headline)
    print("\nFindings:")
    for f in report.findings:
        print(f"  - {f}")
    run = report.meta.get("mlflow_report_run")
    print(f"\nwrote {md} and {page} ({len(report.images)} plots)" + (f"; logged to MLflow run {run}" if run else ""))


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog=program_name("python -m analysis.report"),
                                description="Write reports/<name>/report.md (+ HTML, PNGs) from MLflow runs.")
    p.add_argument("--name", default="grafccsr", help="MLflow experiment or Optuna study name (default grafccsr)")
    p.add_argument("--tracking-uri", default=None,
                   help="MLflow tracking URI: SQLite file or http(s):// server (default sqlite:///<project>/mlflow.db)")
    p.add_argument("--storage", default=None,
                   help=f"Optuna storage: sqlite:///..., journal:<file> or a database URL without a password "
                        f"(default ${STORAGE_ENV}, where a URL with one goes; else sqlite:///<project>/sweeps/optuna.db)")
    p.add_argument("--out", default="reports", help="output root (default reports/)")
    p.add_argument("--kind", choices=KINDS, default="auto")
    p.add_argument("--batch", default=None, help="ablation batch id (default: the latest)")
    p.add_argument("--no-log", action="store_true", help="do not log the report to MLflow")
    return p.parse_args(argv)


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parse_args(argv)
    if args.storage and has_password(args.storage):
        print(f"warning: --storage holds a password, which every local user can read with ps while this runs; "
              f"put the URL in ${STORAGE_ENV} instead", file=sys.stderr)
    storage = args.storage or os.environ.get(STORAGE_ENV) or None
    try:
        write_report(args.name, uri=args.tracking_uri, storage=storage, out=Path(args.out), kind=args.kind,
                     batch=args.batch, log=not args.no_log)
    except LookupError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
