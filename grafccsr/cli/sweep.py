"""Sweep driver: ``python -m grafccsr.sweep sweeps/smoke.yaml [--trials N] [--workers N] ...``.

Runs an Optuna study (ask/tell) whose trials are ``python -m grafccsr.train`` subprocesses;
each trial's objectives are read from its run folder's ``metrics.json``. Re-running the same
command resumes the study (``n_trials`` is the study's total); several processes may share
one study through its storage. See ``sweeps/README.md``.

Exit codes: 0 the sweep ran (failed trials included), 2 bad study file or arguments,
130 interrupted (running trials are recorded as interrupted and queued again).
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Optional, Sequence

from grafccsr.cli.common import add_overrides, error, parse
from grafccsr.cli.common import parser as make_parser
from grafccsr.config import ConfigError
from grafccsr.sweeping.spec import SpecError, load_spec


def build_parser():
    parser = make_parser(
        "python -m grafccsr.sweep",
        "Run (or resume) an Optuna study of grafccsr training runs: one `python -m grafccsr.train` "
        "subprocess per trial, objectives from its metrics.json, MLflow parent + child runs.",
        "examples:\n"
               "  python -m grafccsr.sweep sweeps/smoke.yaml\n"
               "  python -m grafccsr.sweep sweeps/memory_quality.yaml --trials 40 --workers 2\n"
               "  python -m grafccsr.sweep sweeps/memory_quality.yaml --storage journal:sweeps/optuna-journal.log\n"
               "  python -m grafccsr.sweep sweeps/memory_quality.yaml "
               "--storage postgresql+psycopg2://user:pw@host/optuna --tracking-uri http://host:port\n"
               "      (the same command on several machines; `make services` starts a local PostgreSQL and\n"
               "       MLflow server and prints both URIs)\n"
               "  python -m grafccsr.sweep sweeps/smoke.yaml --trials 0    # only print/log the Pareto front",
    )
    parser.add_argument("study_file", type=Path, help="study definition, e.g. sweeps/smoke.yaml")
    add_overrides(parser, "extra Hydra overrides appended to the study's base_overrides for every trial")
    parser.add_argument("--trials", type=int, default=None, metavar="N",
                        help="total number of trials the study should have (default: n_trials in the file); "
                             "re-running after it is reached launches nothing")
    parser.add_argument("--workers", type=int, default=1, metavar="N",
                        help="trials run concurrently by this process (default 1)")
    parser.add_argument("--storage", default=None, metavar="URL",
                        help="Optuna storage: sqlite:///path.db, any SQLAlchemy URL (postgresql://...), or "
                             "journal:<path>; default: the file's `storage`, else sqlite:///<project>/sweeps/optuna.db")
    parser.add_argument("--study-name", default=None, metavar="NAME", help="override the file's study_name")
    parser.add_argument("--tracking-uri", default=None, metavar="URI",
                        help="MLflow tracking URI for the parent and child runs (default sqlite:///<project>/mlflow.db); "
                             "'none' disables MLflow")
    parser.add_argument("--runs-root", type=Path, default=None, metavar="DIR",
                        help="trial run folders go to DIR/sweeps/<study>/trial-<n> (default <project>/runs)")
    parser.add_argument("--timeout-per-trial", type=float, default=None, metavar="S",
                        help="override the file's timeout_per_trial_s")
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    try:
        args = parse(build_parser(), sys.argv[1:] if argv is None else argv)
        spec = load_spec(args.study_file)
        if args.study_name:
            from grafccsr.sweeping.spec import STUDY_NAME_RE

            if not STUDY_NAME_RE.match(args.study_name):
                raise SpecError(f"--study-name must match {STUDY_NAME_RE.pattern}")
            spec.study_name = args.study_name
        if args.timeout_per_trial is not None:
            spec.timeout_per_trial_s = args.timeout_per_trial
        if args.trials is not None and args.trials < 0:
            raise SpecError("--trials must be >= 0")
        from grafccsr.sweeping.driver import Sweep, install_sigterm_as_interrupt, main_exit_code

        kwargs = {}
        if args.tracking_uri is not None:
            kwargs["tracking_uri"] = args.tracking_uri
        sweep = Sweep(spec, storage=args.storage, n_trials=args.trials, workers=args.workers,
                      runs_root=args.runs_root, extra_overrides=args.overrides, **kwargs)
        install_sigterm_as_interrupt()
        result = sweep.run()
    except (SpecError, ConfigError) as err:
        return error(str(err), 2, "grafccsr.sweep")
    return main_exit_code(result)


def run_sweep(study_file: Path, **kwargs):
    """Programmatic entry (tests, notebooks): ``Sweep(load_spec(study_file), **kwargs).run()``."""
    from grafccsr.sweeping.driver import Sweep

    return Sweep(load_spec(study_file), **kwargs).run()


if __name__ == "__main__":
    sys.exit(main())
