"""``python -m grafccsr.services {start,stop,status,env}``: a local PostgreSQL + MLflow server.

start   [--dir D] [--host H] [--auth] [--pg-port N] [--mlflow-port N] [--mlflow-workers N] [--fast] [--json]
        initdb (first time) + pg_ctl start, databases ``optuna`` and ``mlflow``, then
        ``mlflow server`` on PostgreSQL with served artifacts; prints the URIs to use.
        Idempotent: running servers are reported, not started twice. ``--auth``: MLflow's
        basic-auth app with a generated password (required with a --host beyond loopback).
stop    [--dir D] [--purge]      stop what ``start`` started (pid files; stale ones are removed)
status  [--dir D] [--json]       exit 0 when both run, 3 otherwise (passwords shown as ***)
env     [--dir D]                the clients' secrets as ``export`` lines: GRAFCCSR_STORAGE (the
        sweeps' storage URL) and, with --auth, MLFLOW_TRACKING_USERNAME/PASSWORD

``make services`` / ``make services-stop``. State folder: ``--dir`` or ``$GRAFCCSR_SERVICES_DIR``,
default ``<project>/.services``. Exit codes: 0 ok, 1 a server failed to start (log tail printed),
2 bad arguments (also: a --host beyond loopback without --auth), 3 PostgreSQL not installed
(``apt-get install -y postgresql``) / not running. Kept free of torch and Hydra imports: it
starts in well under a second.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
from pathlib import Path
from typing import Optional, Sequence

from grafccsr.paths import program_name

PROG = "python -m grafccsr.services"


def default_dir() -> Path:
    env = os.environ.get("GRAFCCSR_SERVICES_DIR")
    if env:
        return Path(env)
    from grafccsr.paths import PROJECT_ROOT

    return PROJECT_ROOT / ".services"


def _shown(path: str) -> str:
    try:
        return str(Path(path).relative_to(Path.cwd()))
    except ValueError:
        return path


def describe(status, before=None) -> str:
    """What runs and the URIs to use; ``before``: the status before ``start`` (says what it started)."""
    pg, ml = status["postgres"], status["mlflow"]
    pg_verb = "started" if before is not None and not before["postgres"]["running"] else "already running"
    ml_verb = "started" if before is not None and not before["mlflow"]["healthy"] else "already running"
    auth = " (basic auth: user and password from `env`)" if status.get("auth") else ""
    lines = [
        f"PostgreSQL  {pg_verb:<15} {status['storage_url'].rsplit('@', 1)[1].split('/')[0]} (pid {pg['pid']}; "
        f"data {_shown(pg['data'])}, log {_shown(pg['log'])})",
        f"MLflow      {ml_verb:<15} {status['tracking_uri']}{auth} (pid {ml['pid']}; backend database mlflow, "
        f"artifacts {_shown(ml['artifacts'])}, log {_shown(ml['log'])})",
        "",
        "Use:",
        f"  sweeps:    python -m grafccsr.sweep sweeps/memory_quality.yaml --storage services "
        f"--tracking-uri {status['tracking_uri']}",
        f"  training:  python -m grafccsr.train tracking.uri={status['tracking_uri']}",
        f"  secrets:   eval \"$({PROG} env --dir {_shown(status['root'])})\"   (GRAFCCSR_STORAGE{', MLFLOW_TRACKING_USERNAME/PASSWORD' if auth else ''}; "
        "on other machines: save its output in a 0600 file and source it there)",
        f"  UI:        {status['tracking_uri']}",
        f"  stop:      make services-stop   (or {PROG} stop --dir {_shown(status['root'])})",
    ]
    return "\n".join(lines)


def export_lines(env) -> str:
    """``export NAME='value'`` lines for a shell (``eval "$(python -m grafccsr.services env)"``)."""
    return "\n".join(f"export {name}={shlex.quote(value)}" for name, value in env.items())


def build_parser() -> argparse.ArgumentParser:
    top = argparse.ArgumentParser(prog=program_name(PROG), description=__doc__.split("\n\n")[0],
                                  formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = top.add_subparsers(dest="command", required=True, metavar="{start,stop,status,env}")

    def with_dir(p):
        p.add_argument("--dir", type=Path, default=None,
                       help="state folder (default $GRAFCCSR_SERVICES_DIR or <project>/.services)")
        return p

    start = with_dir(sub.add_parser("start", help="start PostgreSQL and the MLflow server (idempotent)"))
    start.add_argument("--host", default="127.0.0.1",
                       help="listen address of both servers (default 127.0.0.1; 0.0.0.0 for other machines, "
                            "which needs --auth)")
    start.add_argument("--auth", action="store_true",
                       help="MLflow's basic-auth app: user grafccsr, a generated password (in the 0600 state file; "
                            "`env` prints it for clients); stays on for later starts of this folder")
    start.add_argument("--pg-port", type=int, default=None, help="PostgreSQL port (default: the last one, else free)")
    start.add_argument("--mlflow-port", type=int, default=None, help="MLflow port (default: the last one, else free)")
    start.add_argument("--mlflow-workers", type=int, default=1,
                       help="MLflow server (uvicorn) worker processes (default 1: with 2, every request on a "
                            "kept-alive connection took ~45 ms instead of ~2 ms here)")
    start.add_argument("--allowed-hosts", default=None, help="mlflow server --allowed-hosts (other machines' Host names)")
    start.add_argument("--fast", action="store_true",
                       help="throwaway servers (tests/CI): no fsync; never for data you keep")
    start.add_argument("--json", action="store_true", help="print the status as JSON")
    stop = with_dir(sub.add_parser("stop", help="stop what start started"))
    stop.add_argument("--purge", action="store_true", help="also delete the state folder (databases, artifacts)")
    status = with_dir(sub.add_parser("status", help="are they running? exit 0 yes, 3 no"))
    status.add_argument("--json", action="store_true")
    with_dir(sub.add_parser("env", help="the clients' secrets as export lines (storage URL, MLflow credentials)"))
    watch = with_dir(sub.add_parser("watch"))  # test sessions: stop when PID is gone (no help: not listed)
    watch.add_argument("--pid", type=int, required=True)
    watch.add_argument("--purge", action="store_true")
    return top


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(sys.argv[1:] if argv is None else argv)
    from grafccsr.services.local import PostgresMissing, Services, ServicesError, UnsafeHost, watch

    root = args.dir or default_dir()
    if args.command == "start":
        services = Services(root, host=args.host, pg_port=args.pg_port, mlflow_port=args.mlflow_port,
                            mlflow_workers=args.mlflow_workers, fast=args.fast, allowed_hosts=args.allowed_hosts,
                            auth=args.auth)
        before = services.status()
        try:
            status = services.start()
        except UnsafeHost as err:
            print(f"{PROG}: error: {err}", file=sys.stderr)
            return 2
        except PostgresMissing as err:
            print(f"{PROG}: error: {err}", file=sys.stderr)
            return 3
        except ServicesError as err:
            print(f"{PROG}: error: {err}", file=sys.stderr)
            return 1
        if args.json:
            print(json.dumps(status, indent=2))
        else:
            print(describe(status, before))
        return 0
    services = Services(root)
    if args.command == "stop":
        stopped = services.stop(purge=args.purge)
        names = [name for name, was in (("MLflow server", stopped["mlflow"]), ("PostgreSQL", stopped["postgres"]))
                 if was]
        print(f"stopped {' and '.join(names)} ({_shown(str(services.root))})" if names
              else f"nothing was running ({_shown(str(services.root))})")
        if args.purge:
            print(f"removed {_shown(str(services.root))}")
        return 0
    if args.command == "watch":
        watch(args.pid, services, purge=args.purge)
        return 0
    if args.command == "env":
        env = services.client_env()
        if not env:
            print(f"{PROG}: error: no services in {_shown(str(services.root))} (start them: make services)",
                  file=sys.stderr)
            return 3
        print(export_lines(env))
        return 0
    status = services.status()
    if args.json:
        print(json.dumps(status, indent=2))
    elif status["running"]:
        print(describe(status))
    else:
        pg, ml = status["postgres"], status["mlflow"]
        print(f"PostgreSQL {'running' if pg['running'] else 'stopped'}, MLflow server "
              f"{'running' if ml['healthy'] else ('not answering' if ml['running'] else 'stopped')} "
              f"({_shown(status['root'])}); start: make services")
    return 0 if status["running"] else 3


if __name__ == "__main__":
    sys.exit(main())
