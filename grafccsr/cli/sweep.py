"""Sweep driver: ``python -m grafccsr.sweep [STUDY] [--trials N] [--workers N] ...``.

STUDY is a study file or the name of a shipped one (``smoke``); without it, the study that fits
the machine: ``memory_quality`` with CUDA, ``memory_quality_cpu`` without.

Runs an Optuna study (ask/tell) whose trials are ``python -m grafccsr.train`` subprocesses;
each trial's objectives are read from its run folder's ``metrics.json``. Re-running the same
command resumes the study (``n_trials`` is the study's total); several processes may share
one study through its storage. See ``sweeps/README.md``.

The storage URL of a database with a password comes from ``$GRAFCCSR_STORAGE`` or from the
local services' state file (``--storage services``), never from the command line, which every
local user reads with ``ps``; trainers get MLflow's credentials through their environment.

Exit codes: 0 the sweep ran (failed trials included), 2 bad study file or arguments (also: a
storage that does not answer at start, a CUDA study on a machine without CUDA, other fixed
overrides than the study ran with, and a trial that failed with a config error every trial
would meet), 5 a trial could not read the data, 7 the storage stopped answering during the
sweep (the study keeps what it had recorded; re-run the same command), 130 interrupted (running
trials are recorded as interrupted and queued again). After exit 2 or 5 from a trial, that
trial does not count toward the study's total.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Optional, Sequence, Tuple

from grafccsr.cli.common import add_overrides, error, parse
from grafccsr.cli.common import parser as make_parser
from grafccsr.cli.services import default_dir
from grafccsr.config import ConfigError
from grafccsr.config.schema import TrackingConfig
from grafccsr.services.local import STORAGE_ENV, Services
from grafccsr.sweeping.spec import CPU_STUDY, GPU_STUDY, SpecError, find_study, load_spec
from grafccsr.sweeping.storage import has_password
from grafccsr.tracking.store import apply_http_settings
from grafccsr.training.outcome import EXIT_CONFIG

PROG = "grafccsr.sweep"
SERVICES = "services"
"""``--storage services`` / ``--tracking-uri services``: what ``grafccsr-services`` started."""


def build_parser():
    parser = make_parser(
        "python -m grafccsr.sweep",
        "Run (or resume) an Optuna study of grafccsr training runs: one `python -m grafccsr.train` "
        "subprocess per trial, objectives from its metrics.json, MLflow parent + child runs.",
        "examples:\n"
               "  python -m grafccsr.sweep                       # the study that fits this machine\n"
               "  python -m grafccsr.sweep smoke                 # a shipped study by name (or a file)\n"
               "  python -m grafccsr.sweep sweeps/smoke.yaml train.max_iters=8 --new-study\n"
               "  python -m grafccsr.sweep sweeps/memory_quality.yaml --trials 40 --workers 2\n"
               "  python -m grafccsr.sweep sweeps/memory_quality.yaml --storage journal:sweeps/optuna-journal.log\n"
               "  python -m grafccsr.sweep sweeps/memory_quality.yaml --storage services --tracking-uri services\n"
               "      (the PostgreSQL + MLflow server `make services` started; on other machines:\n"
               "       eval \"$(python -m grafccsr.services env)\" there, then --tracking-uri http://host:port)\n"
               "  python -m grafccsr.sweep sweeps/smoke.yaml --trials 0    # only print/log the Pareto front",
    )
    parser.add_argument("study", nargs="?", default=None, metavar="STUDY",
                        help=f"a study file (sweeps/smoke.yaml) or a shipped study's name (smoke); default: "
                             f"{GPU_STUDY} on a machine with CUDA, {CPU_STUDY} without")
    add_overrides(parser, "extra Hydra overrides appended to the study's base_overrides for every trial")
    parser.add_argument("--trials", type=int, default=None, metavar="N",
                        help="total number of trials the study should have (default: n_trials in the file); "
                             "re-running after it is reached launches nothing")
    parser.add_argument("--workers", type=int, default=1, metavar="N",
                        help="trials run concurrently by this process (default 1)")
    parser.add_argument("--storage", default=None, metavar="URL",
                        help=f"Optuna storage: sqlite:///path.db, journal:<path>, a SQLAlchemy URL without a password, "
                             f"or '{SERVICES}' (the local services' PostgreSQL); default: ${STORAGE_ENV} (a URL with a "
                             "password goes there), else the file's `storage`, else sqlite:///<project>/sweeps/optuna.db")
    parser.add_argument("--study-name", default=None, metavar="NAME", help="override the file's study_name")
    parser.add_argument("--new-study", action="store_true",
                        help="the study ran with other fixed overrides (the file's base_overrides and the command "
                             "line's): run these as a study of their own, <name>-<digest of the overrides>, instead "
                             "of refusing; the same command resumes it")
    parser.add_argument("--tracking-uri", default=None, metavar="URI",
                        help="MLflow tracking URI for the parent and child runs (default sqlite:///<project>/mlflow.db); "
                             f"'none' disables MLflow; '{SERVICES}': the local services' server (credentials from "
                             "MLFLOW_TRACKING_USERNAME/PASSWORD, or from the services' state file)")
    parser.add_argument("--runs-root", type=Path, default=None, metavar="DIR",
                        help="trial run folders go to DIR/sweeps/<study>/trial-<n> (default <project>/runs)")
    parser.add_argument("--timeout-per-trial", type=float, default=None, metavar="S",
                        help="override the file's timeout_per_trial_s")
    return parser


def where(storage: Optional[str], tracking_uri: Optional[str], prog: str = PROG) -> Tuple[Optional[str], Optional[str]]:
    """The storage URL and tracking URI to use. A password never comes from the command line:
    ``--storage`` with one is warned about; ``$GRAFCCSR_STORAGE`` and ``services`` carry it. With
    ``services``, MLflow's credentials from the state file go into this process's environment,
    which the trainers inherit (never their command lines)."""
    if SERVICES in (storage, tracking_uri):
        services = Services(default_dir())
        env = services.client_env()
        if not env:
            raise SpecError(f"--storage/--tracking-uri {SERVICES}: no services in {services.root} "
                            "(make services, or set GRAFCCSR_SERVICES_DIR)")
        for key in ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD"):
            if key in env:
                os.environ.setdefault(key, env[key])
        storage = env[STORAGE_ENV] if storage == SERVICES else storage
        tracking_uri = services.tracking_uri if tracking_uri == SERVICES else tracking_uri
    elif storage and has_password(storage):
        print(f"{prog}: warning: --storage holds a password, which every local user can read with ps while it "
              f"runs; put the URL in ${STORAGE_ENV} (`python -m grafccsr.services env` prints it) or use "
              f"--storage {SERVICES}", file=sys.stderr)
    elif not storage:
        storage = os.environ.get(STORAGE_ENV) or None
    return storage, tracking_uri


def main(argv: Optional[Sequence[str]] = None) -> int:
    defaults = TrackingConfig()  # bounded MLflow calls: a lost server answers within seconds, not minutes
    apply_http_settings(defaults.request_timeout_s, defaults.request_retries)
    try:
        args = parse(build_parser(), sys.argv[1:] if argv is None else argv)
        if args.study is not None and "=" in args.study:  # no study named, overrides only
            args.overrides.insert(0, args.study)
            args.study = None
        spec = load_spec(find_study(args.study or default_study()))
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

        storage, tracking_uri = where(args.storage, args.tracking_uri)
        kwargs = {}
        if tracking_uri is not None:
            kwargs["tracking_uri"] = tracking_uri
        sweep = Sweep(spec, storage=storage, n_trials=args.trials, workers=args.workers,
                      runs_root=args.runs_root, extra_overrides=args.overrides, new_study=args.new_study, **kwargs)
        install_sigterm_as_interrupt()
        result = sweep.run()
    except (SpecError, ConfigError) as err:
        return error(str(err), EXIT_CONFIG, PROG)
    if result.storage_lost is not None or result.stopped is not None:
        return error(result.storage_lost or result.stopped, main_exit_code(result), PROG)
    return main_exit_code(result)


def default_study() -> str:
    """The shipped study that fits this machine, said in one line."""
    import torch

    if torch.cuda.is_available():
        print(f"no study named: {GPU_STUDY} (this machine has CUDA; {CPU_STUDY} is the CPU-sized one)", flush=True)
        return GPU_STUDY
    print(f"no study named: {CPU_STUDY}, as this machine has no CUDA ({GPU_STUDY} trains GRAF sizes on a GPU; "
          "name it on a machine with one)", flush=True)
    return CPU_STUDY


def run_sweep(study_file: Path, **kwargs):
    """Programmatic entry (tests, notebooks): ``Sweep(load_spec(study_file), **kwargs).run()``."""
    from grafccsr.sweeping.driver import Sweep

    return Sweep(load_spec(study_file), **kwargs).run()


if __name__ == "__main__":
    sys.exit(main())
