"""Optuna's dashboard on the sweeps' storage: ``grafccsr-dashboard [--storage URL|services] [--port N]``.

The storage is the sweep's: ``--storage``, else ``$GRAFCCSR_STORAGE``, else the project's
``sweeps/optuna.db``. The dashboard runs in this process (optuna-dashboard's WSGI app on the
same storage object the sweep uses), so a URL with a password never goes on a command line.
optuna-dashboard has no login: it listens on loopback only; from another machine, forward the
port (``ssh -L 8080:127.0.0.1:8080 HOST``).

Exit codes: 0 stopped with Ctrl-C, 2 bad arguments (no storage there, a host beyond loopback, a
port in use), 3 optuna-dashboard is not installed (``pip install 'grafccsr[dashboard]'``).
"""

from __future__ import annotations

import socketserver
import sys
from typing import Optional, Sequence
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

from grafccsr.cli.common import error, parse
from grafccsr.cli.common import parser as make_parser
from grafccsr.cli.sweep import SERVICES, where
from grafccsr.services.local import LOOPBACK, STORAGE_ENV, is_loopback
from grafccsr.sweeping.spec import SpecError
from grafccsr.sweeping.storage import (is_storage_error, local_file, make_storage, redact, resolve_storage_url,
                                       storage_cause)
from grafccsr.training.outcome import EXIT_CONFIG

PROG = "grafccsr.cli.dashboard"
EXIT_MISSING = 3
"""optuna-dashboard is an optional extra (as ``grafccsr-services`` exits 3 without PostgreSQL)."""


def build_parser():
    parser = make_parser(
        "python -m grafccsr.cli.dashboard",
        "Optuna dashboard (optuna-dashboard) on the sweeps' storage, on 127.0.0.1.",
        "examples:\n"
        "  grafccsr-dashboard                          # sweeps/optuna.db (or $GRAFCCSR_STORAGE)\n"
        "  grafccsr-dashboard --storage services       # the PostgreSQL `make services` started\n"
        "  grafccsr-dashboard --storage journal:sweeps/optuna-journal.log --port 8081\n"
        "  ssh -L 8080:127.0.0.1:8080 HOST             # then open http://127.0.0.1:8080/ here")
    parser.add_argument("--storage", default=None, metavar="URL",
                        help=f"Optuna storage as for grafccsr-sweep: sqlite:///path.db, journal:<path>, a SQLAlchemy "
                             f"URL without a password, or '{SERVICES}'; default ${STORAGE_ENV}, else "
                             "sqlite:///<project>/sweeps/optuna.db")
    parser.add_argument("--host", default=LOOPBACK, help=f"listen address (default {LOOPBACK}; loopback only: "
                                                         "the dashboard has no login)")
    parser.add_argument("--port", type=int, default=8080, help="listen port (default 8080)")
    return parser


class _Server(socketserver.ThreadingMixIn, WSGIServer):
    daemon_threads = True  # a browser's open connection does not hold up Ctrl-C


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, format, *args):  # noqa: A002 - one line per request would drown the address
        pass


def open_storage(url: Optional[str]):
    """The storage URL (default: the project's sweeps/optuna.db) and its Optuna storage; a local
    file that does not exist is an error, not a new empty database."""
    url = resolve_storage_url(url)
    path = local_file(url)
    if path is not None and not path.is_file():
        raise SpecError(f"no sweep storage at {path}: run a sweep first (make sweep), or name one with --storage "
                        f"or ${STORAGE_ENV}")
    try:
        return url, make_storage(url)
    except Exception as err:  # noqa: BLE001 - a database that does not answer is a bad argument
        if is_storage_error(err):
            raise SpecError(f"storage {redact(url)}: {storage_cause(err)}") from None
        raise


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parse(build_parser(), sys.argv[1:] if argv is None else argv)
    try:
        import optuna_dashboard
    except ImportError:
        return error("optuna-dashboard is not installed: pip install 'grafccsr[dashboard]' (in a checkout: "
                     "make dashboard)", EXIT_MISSING, PROG)
    if not is_loopback(args.host):
        return error(f"--host {args.host}: the dashboard has no login, so it listens on loopback only; from another "
                     f"machine forward the port: ssh -L {args.port}:{LOOPBACK}:{args.port} HOST", EXIT_CONFIG, PROG)
    try:
        storage, _ = where(args.storage, None, PROG)
        url, opened = open_storage(storage)
        server = make_server(args.host, args.port, optuna_dashboard.wsgi(opened), server_class=_Server,
                             handler_class=_QuietHandler)
    except SpecError as err:
        return error(str(err), EXIT_CONFIG, PROG)
    except OSError as err:  # the port is taken
        return error(f"cannot listen on {args.host}:{args.port}: {err.strerror or err}; choose another --port",
                     EXIT_CONFIG, PROG)
    print(f"Optuna dashboard on {redact(url)}: http://{args.host}:{args.port}/dashboard/ (Ctrl-C stops it)",
          flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
