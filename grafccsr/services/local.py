"""A local PostgreSQL (Debian's ``postgresql`` package) and an ``mlflow server`` on it.

Everything lives in one state folder (default ``<project>/.services``)::

    state.json            ports, listen address, role and password (mode 0600)
    postgres/data/        the cluster (initdb); owned by the ``postgres`` system user when run as root
    postgres/postgres.log
    mlflow/artifacts/     --artifacts-destination (served by the server: clients need no shared disk)
    mlflow/mlflow.log, mlflow/mlflow.pid

Two databases: ``optuna`` (the sweeps' storage) and ``mlflow`` (the server's backend store).
Clients authenticate as role ``grafccsr`` with a generated password (never trust auth: the
machine may be shared). With ``auth`` the MLflow server runs MLflow's basic-auth app
(``mlflow server --app-name basic-auth``): its admin user ``grafccsr`` gets a generated password,
kept in ``state.json`` beside the database's; clients pass it through MLflow's environment
variables (``MLFLOW_TRACKING_USERNAME``/``MLFLOW_TRACKING_PASSWORD``, printed by
``python -m grafccsr.services env``), never on a command line. A listen address beyond loopback
is refused without it. ``start`` is idempotent (running servers are reported, a stale pid file
is cleaned up); ``stop`` stops only what this folder's pid files and cluster name.
"""

from __future__ import annotations

import fcntl
import ipaddress
import json
import os
import pwd
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

PG_ROLE = "grafccsr"
OPTUNA_DB = "optuna"
MLFLOW_DB = "mlflow"
INSTALL_HINT = "apt-get install -y postgresql"
PG_BIN_ENV = "GRAFCCSR_PG_BIN"
LOOPBACK = "127.0.0.1"
WILDCARDS = ("0.0.0.0", "::", "")
"""Listen addresses that mean every interface."""


def is_loopback(host: str) -> bool:
    """Only this machine reaches a server listening on ``host``."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:  # a host name: it may resolve to any interface
        return False


def local_host(listen: str) -> str:
    """The address this machine reaches a server on that listens on ``listen``: loopback for a
    wildcard, else that address (a server bound to one interface is not on loopback)."""
    return LOOPBACK if listen in WILDCARDS else listen
AUTH_USER = "grafccsr"
"""The MLflow basic-auth app's admin user (its password: ``state.json``'s ``mlflow_password``)."""
STORAGE_ENV = "GRAFCCSR_STORAGE"
"""Where a sweep takes its storage URL from (a password stays off the command line)."""
MLFLOW_START_TIMEOUT_S = 240.0  # first start runs MLflow's schema migrations (slow on 2 cores)
STOP_GRACE_S = 15.0


class ServicesError(RuntimeError):
    """A service could not be started or stopped (the message says why, with a log tail)."""


class PostgresMissing(ServicesError):
    """Debian's postgresql package (initdb, pg_ctl) is not installed."""


class UnsafeHost(ServicesError):
    """A listen address other machines reach, without authentication."""


# --------------------------------------------------------------------------- helpers


def find_pg_bin() -> Optional[Path]:
    """The folder holding ``initdb`` and ``pg_ctl``: ``$GRAFCCSR_PG_BIN`` if set (only there),
    else the PATH, else Debian's ``/usr/lib/postgresql/<version>/bin`` (newest)."""

    def complete(folder: Path) -> bool:
        return all(os.access(folder / tool, os.X_OK) for tool in ("initdb", "pg_ctl", "postgres", "psql"))

    forced = os.environ.get(PG_BIN_ENV)
    if forced:
        return Path(forced) if complete(Path(forced)) else None
    on_path = shutil.which("pg_ctl")
    if on_path:
        folder = Path(on_path).resolve().parent
        if complete(folder):
            return folder
    versions = []
    for folder in Path("/usr/lib/postgresql").glob("*/bin"):
        try:
            versions.append((float(folder.parent.name), folder))
        except ValueError:
            continue
    for _, folder in sorted(versions, reverse=True):
        if complete(folder):
            return folder
    return None


def pg_version(bin_dir: Path) -> str:
    out = subprocess.run([str(bin_dir / "postgres"), "--version"], capture_output=True, text=True)
    match = re.search(r"(\d+(?:\.\d+)?)", out.stdout)
    return match.group(1) if match else "?"


def port_is_free(host: str, port: int) -> bool:
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError:
            return False
    return True


def free_port(host: str = LOOPBACK, avoid: Sequence[int] = ()) -> int:
    for _ in range(50):
        with socket.socket() as sock:
            sock.bind((host, 0))
            port = sock.getsockname()[1]
        if port not in avoid:
            return port
    raise ServicesError("no free port found")


def pid_alive(pid: Optional[int]) -> bool:
    if not pid:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:  # a zombie child of ours counts as dead
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return True


def cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def log_tail(path: Path, lines: int = 15) -> str:
    try:
        text = path.read_text(errors="replace").strip().splitlines()
    except OSError:
        return ""
    return "\n".join("    " + ln for ln in text[-lines:])


def _runas():
    """Running as root: (uid, gid) of the ``postgres`` system user (initdb/postgres refuse root)."""
    if os.geteuid() != 0:
        return None
    try:
        entry = pwd.getpwnam("postgres")
    except KeyError:
        raise ServicesError("running as root: PostgreSQL refuses to run as root and there is no 'postgres' "
                            f"system user (Debian's package creates it: {INSTALL_HINT})") from None
    return entry.pw_uid, entry.pw_gid


# --------------------------------------------------------------------------- services


@dataclass
class Services:
    root: Path
    host: str = LOOPBACK
    """Listen address of both servers (``0.0.0.0`` for other machines; passwords are required)."""
    pg_port: Optional[int] = None
    mlflow_port: Optional[int] = None
    mlflow_workers: int = 1
    fast: bool = False
    """Throwaway servers (tests, CI): initdb without sync, fsync/synchronous_commit off."""
    allowed_hosts: Optional[str] = None
    """``mlflow server --allowed-hosts`` (needed when clients reach it by another name than localhost)."""
    auth: bool = False
    """MLflow's basic-auth app with a generated admin password (required beyond loopback; kept on
    by later starts of the same folder)."""

    def __post_init__(self) -> None:
        self.root = Path(self.root).resolve()

    # ------------------------------------------------------------------ paths and state
    @property
    def state_file(self) -> Path:
        return self.root / "state.json"

    @property
    def pg_dir(self) -> Path:
        return self.root / "postgres"

    @property
    def pgdata(self) -> Path:
        return self.pg_dir / "data"

    @property
    def pg_log(self) -> Path:
        return self.pg_dir / "postgres.log"

    @property
    def mlflow_dir(self) -> Path:
        return self.root / "mlflow"

    @property
    def artifacts(self) -> Path:
        return self.mlflow_dir / "artifacts"

    @property
    def mlflow_log(self) -> Path:
        return self.mlflow_dir / "mlflow.log"

    @property
    def mlflow_pid_file(self) -> Path:
        return self.mlflow_dir / "mlflow.pid"

    def load_state(self) -> Dict[str, Any]:
        try:
            return json.loads(self.state_file.read_text())
        except (OSError, ValueError):
            return {}

    def _save_state(self, state: Dict[str, Any]) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        tmp = self.state_file.with_suffix(".tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as fh:
            json.dump(state, fh, indent=2)
        os.replace(tmp, self.state_file)

    @contextmanager
    def _locked(self):
        """One start/stop at a time for this folder."""
        self.root.mkdir(parents=True, exist_ok=True)
        with open(self.root / ".lock", "a+") as fh:
            fcntl.flock(fh.fileno(), fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(fh.fileno(), fcntl.LOCK_UN)

    # ------------------------------------------------------------------ URLs
    def _client_host(self, state: Dict[str, Any]) -> str:
        host = state.get("host", self.host)
        return socket.gethostname() if host in WILDCARDS else host

    def storage_url(self, database: str = OPTUNA_DB, *, local: bool = False) -> str:
        """``postgresql+psycopg2://grafccsr:<password>@host:port/<database>`` (``--storage``)."""
        state = self.load_state()
        host = local_host(state.get("host", self.host)) if local else self._client_host(state)
        return f"postgresql+psycopg2://{PG_ROLE}:{state['password']}@{host}:{state['pg_port']}/{database}"

    @property
    def tracking_uri(self) -> str:
        """``http://host:port`` (``tracking.uri=`` / ``--tracking-uri``)."""
        state = self.load_state()
        return f"http://{self._client_host(state)}:{state['mlflow_port']}"

    def _local_tracking_uri(self, state: Dict[str, Any]) -> str:
        return f"http://{local_host(state.get('host', self.host))}:{state['mlflow_port']}"

    def client_env(self, *, local: bool = False) -> Dict[str, str]:
        """The secrets a client needs, as environment variables: the sweep's storage URL
        (:data:`STORAGE_ENV`) and, with ``auth``, MLflow's credentials. Never put them on a
        command line: every local user reads those with ``ps``."""
        state = self.load_state()
        env = {STORAGE_ENV: self.storage_url(local=local)} if state.get("password") and state.get("pg_port") else {}
        if state.get("auth"):
            env.update(MLFLOW_TRACKING_USERNAME=AUTH_USER, MLFLOW_TRACKING_PASSWORD=state["mlflow_password"])
        return env

    # ------------------------------------------------------------------ status
    def _pg_running(self, state: Dict[str, Any]) -> Optional[int]:
        """The postmaster's pid when this folder's cluster runs."""
        pid_file = self.pgdata / "postmaster.pid"
        try:
            pid = int(pid_file.read_text().splitlines()[0])
        except (OSError, ValueError, IndexError):
            return None
        return pid if pid_alive(pid) and "postgres" in cmdline(pid) else None

    def _mlflow_pid(self) -> Optional[int]:
        try:
            pid = int(self.mlflow_pid_file.read_text().strip())
        except (OSError, ValueError):
            return None
        return pid if pid_alive(pid) and "mlflow" in cmdline(pid) else None

    def _healthy(self, uri: str, timeout: float = 2.0) -> bool:
        try:
            with urllib.request.urlopen(f"{uri}/health", timeout=timeout) as resp:
                return resp.status == 200
        except OSError:
            return False

    def status(self) -> Dict[str, Any]:
        state = self.load_state()
        pg_pid = self._pg_running(state)
        ml_pid = self._mlflow_pid()
        healthy = bool(ml_pid) and bool(state.get("mlflow_port")) and self._healthy(self._local_tracking_uri(state))
        out: Dict[str, Any] = {
            "root": str(self.root),
            "running": bool(pg_pid) and healthy,
            "postgres": {"running": bool(pg_pid), "pid": pg_pid, "port": state.get("pg_port"),
                         "data": str(self.pgdata), "log": str(self.pg_log), "bin": state.get("pg_bin")},
            "mlflow": {"running": bool(ml_pid), "healthy": healthy, "pid": ml_pid, "port": state.get("mlflow_port"),
                       "artifacts": str(self.artifacts), "log": str(self.mlflow_log)},
        }
        if state.get("password") and state.get("pg_port"):
            out["storage_url"] = self.storage_url().replace(state["password"], "***")  # `env` prints the secrets
        if state.get("mlflow_port"):
            out["tracking_uri"] = self.tracking_uri
        out["auth"] = bool(state.get("auth"))
        return out

    # ------------------------------------------------------------------ start
    def start(self, mlflow: bool = True) -> Dict[str, Any]:
        """Start PostgreSQL and (``mlflow``) the MLflow server; report what runs."""
        bin_dir = find_pg_bin()
        if bin_dir is None:
            raise PostgresMissing(
                "PostgreSQL is not installed (initdb/pg_ctl not found on PATH or in /usr/lib/postgresql/*/bin). "
                f"Install Debian's package: sudo {INSTALL_HINT}   (or set {PG_BIN_ENV}=<folder with initdb>)")
        runas = _runas()
        with self._locked():
            state = self.load_state()
            state.setdefault("password", secrets.token_urlsafe(18))
            if self.host != LOOPBACK or not state.get("host"):  # else the last start's listen address
                state["host"] = self.host
            self._check_auth(state)
            state["pg_bin"] = str(bin_dir)
            pg_pid = self._pg_running(state)
            if not pg_pid:
                state["pg_port"] = self._choose_port(self.pg_port, state.get("pg_port"), state["host"])
            elif not state.get("pg_port"):  # state.json lost while the cluster runs: its pid file has the port
                state["pg_port"] = int((self.pgdata / "postmaster.pid").read_text().splitlines()[3])
            self._save_state(state)
            if not self.pgdata.joinpath("PG_VERSION").is_file():
                self._initdb(bin_dir, state, runas)
            if not pg_pid:
                self._start_postgres(bin_dir, state, runas)
            self._ensure_databases(bin_dir, state)
            if not mlflow:
                return self.status()
            running = self._mlflow_pid()
            if running and state.get("auth") and "basic-auth" not in cmdline(running):
                self._stop_mlflow()  # started without authentication: start it again with
            if not self._mlflow_pid():
                self.mlflow_pid_file.unlink(missing_ok=True)
                state["mlflow_port"] = self._choose_port(self.mlflow_port, state.get("mlflow_port"), state["host"],
                                                         avoid=[state["pg_port"]])
                self._save_state(state)
                self._start_mlflow(state)
            elif not self._wait_healthy(state, MLFLOW_START_TIMEOUT_S):
                raise ServicesError(f"the MLflow server (pid {self._mlflow_pid()}) does not answer on "
                                    f"{self._local_tracking_uri(state)}/health; log {self.mlflow_log}:\n"
                                    + log_tail(self.mlflow_log))
        return self.status()

    def _check_auth(self, state: Dict[str, Any]) -> None:
        """Authentication is on (credentials generated once), or the servers listen on loopback."""
        if self.auth:
            state["auth"] = True
        if state.get("auth"):
            state.setdefault("mlflow_password", secrets.token_urlsafe(18))
            state.setdefault("flask_secret", secrets.token_urlsafe(32))
        elif not is_loopback(state["host"]):
            raise UnsafeHost(f"--host {state['host']} lets other machines reach the MLflow server, which has no "
                             "authentication: add --auth (MLflow's basic-auth app; the launcher generates the "
                             "password, `python -m grafccsr.services env` prints it for the clients)")

    def _choose_port(self, wanted: Optional[int], previous: Optional[int], host: str,
                     avoid: Sequence[int] = ()) -> int:
        bind_host = local_host(host)
        if wanted:
            if not port_is_free(bind_host, wanted):
                raise ServicesError(f"port {wanted} on {bind_host} is in use")
            return int(wanted)
        if previous and previous not in avoid and port_is_free(bind_host, previous):
            return int(previous)  # stable URIs across restarts
        return free_port(bind_host, avoid)

    def _as_runner(self, runas) -> Dict[str, Any]:
        if runas is None:
            return {}
        return {"user": runas[0], "group": runas[1], "extra_groups": [], "cwd": "/"}

    def _initdb(self, bin_dir: Path, state: Dict[str, Any], runas) -> None:
        self.pg_dir.mkdir(parents=True, exist_ok=True)
        if runas is not None:  # the postgres user must reach its folder: traverse only, nothing readable
            self.root.chmod(self.root.stat().st_mode | 0o711)
            for folder in self.root.parents:
                st = folder.stat()
                if not st.st_mode & 0o001 and st.st_uid != runas[0]:
                    raise ServicesError(f"the postgres system user cannot reach {self.root} ({folder} has no "
                                        f"o+x): chmod o+x {folder}, or give another --dir")
            os.chown(self.pg_dir, *runas)
        self.pg_dir.chmod(0o700)
        if self.pgdata.exists():  # a half-initialised folder from an interrupted start
            shutil.rmtree(self.pgdata)
        pwfile = self.pg_dir / "pwfile"
        fd = os.open(pwfile, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as fh:
            fh.write(state["password"] + "\n")
        if runas is not None:
            os.chown(pwfile, *runas)
        cmd = [str(bin_dir / "initdb"), "-D", str(self.pgdata), "-U", PG_ROLE, f"--pwfile={pwfile}",
               "--auth=scram-sha-256", "-E", "UTF8", "--locale=C"]
        if self.fast:
            cmd.append("--no-sync")
        try:
            out = subprocess.run(cmd, capture_output=True, text=True, env=self._pg_env(), **self._as_runner(runas))
        finally:
            pwfile.unlink(missing_ok=True)
        if out.returncode != 0:
            raise ServicesError(f"initdb failed ({out.returncode}): {(out.stderr or out.stdout).strip()[-2000:]}")
        settings = ["", "# grafccsr.services", "unix_socket_directories = ''", "max_connections = 200",
                    "shared_buffers = 64MB"]
        if self.fast:
            settings += ["fsync = off", "synchronous_commit = off", "full_page_writes = off"]
        with open(self.pgdata / "postgresql.conf", "a") as fh:
            fh.write("\n".join(settings) + "\n")
        with open(self.pgdata / "pg_hba.conf", "a") as fh:  # other machines too, when listening beyond loopback
            fh.write("host all all 0.0.0.0/0 scram-sha-256\nhost all all ::/0 scram-sha-256\n")

    @staticmethod
    def _pg_env() -> Dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
        env.update(LC_ALL="C", LANG="C")
        return env

    def _start_postgres(self, bin_dir: Path, state: Dict[str, Any], runas) -> None:
        if runas is not None and not self.pg_log.exists():
            self.pg_log.touch()
            os.chown(self.pg_log, *runas)
        listen = state["host"] if state["host"] not in ("::",) else "*"
        cmd = [str(bin_dir / "pg_ctl"), "-D", str(self.pgdata), "-l", str(self.pg_log), "-w", "-t", "60",
               "-o", f"-p {state['pg_port']} -c listen_addresses={listen}", "start"]
        out = subprocess.run(cmd, capture_output=True, text=True, env=self._pg_env(), stdin=subprocess.DEVNULL,
                             **self._as_runner(runas))
        if out.returncode != 0 or not self._pg_running(state):
            raise ServicesError(f"PostgreSQL did not start ({(out.stderr or out.stdout).strip()[-500:]}); "
                                f"log {self.pg_log}:\n" + log_tail(self.pg_log))

    def _psql(self, bin_dir: Path, state: Dict[str, Any], sql: str, database: str = "postgres") -> str:
        env = dict(self._pg_env(), PGPASSWORD=state["password"], PGCONNECT_TIMEOUT="10")
        out = subprocess.run([str(bin_dir / "psql"), "-X", "-h", local_host(state["host"]), "-p", str(state["pg_port"]), "-U", PG_ROLE,
                              "-d", database, "-v", "ON_ERROR_STOP=1", "-tAc", sql],
                             capture_output=True, text=True, env=env, stdin=subprocess.DEVNULL)
        if out.returncode != 0:
            raise ServicesError(f"psql {sql!r} failed: {out.stderr.strip()[-1000:]}")
        return out.stdout.strip()

    def _ensure_databases(self, bin_dir: Path, state: Dict[str, Any]) -> None:
        existing = set(self._psql(bin_dir, state, "SELECT datname FROM pg_database").split())
        for name in (OPTUNA_DB, MLFLOW_DB):
            if name not in existing:
                self._psql(bin_dir, state, f"CREATE DATABASE {name}")

    def create_database(self, name: str) -> str:
        """A new, empty database (tests: one per test); returns its ``--storage`` URL."""
        if not re.fullmatch(r"[a-z_][a-z0-9_]{0,62}", name):
            raise ServicesError(f"database name {name!r}: lower-case letters, digits, _")
        state = self.load_state()
        self._psql(Path(state["pg_bin"]), state, f"CREATE DATABASE {name}")
        return self.storage_url(name, local=True)

    def drop_database(self, name: str) -> None:
        if name in (OPTUNA_DB, MLFLOW_DB, "postgres") or not re.fullmatch(r"[a-z_][a-z0-9_]{0,62}", name):
            raise ServicesError(f"refusing to drop database {name!r}")
        state = self.load_state()
        self._psql(Path(state["pg_bin"]), state, f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")

    def _mlflow_command(self, state: Dict[str, Any]) -> List[str]:
        exe = Path(sys.executable).with_name("mlflow")
        base = [str(exe)] if exe.is_file() else [sys.executable, "-m", "mlflow"]
        cmd = [*base, "server",
               "--backend-store-uri", f"postgresql+psycopg2://{PG_ROLE}@{local_host(state['host'])}:{state['pg_port']}/{MLFLOW_DB}",
               "--artifacts-destination", str(self.artifacts), "--serve-artifacts",
               "--host", state["host"], "--port", str(state["mlflow_port"]), "--workers", str(self.mlflow_workers)]
        if state.get("auth"):
            cmd += ["--app-name", "basic-auth"]
        allowed = self.allowed_hosts or _reachable_names(state["host"])
        if allowed:
            cmd += ["--allowed-hosts", allowed]
        return cmd

    def _start_mlflow(self, state: Dict[str, Any]) -> None:
        self.artifacts.mkdir(parents=True, exist_ok=True)
        # the password reaches the server through libpq's environment, not its (world-readable) command line
        # MLflow's job runner (8 huey consumer processes for GenAI features) is not needed here
        env = dict(os.environ, PGPASSWORD=state["password"], MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT="1",
                   MLFLOW_SERVER_ENABLE_JOB_EXECUTION="false", **self._auth_env(state))
        with open(self.mlflow_log, "ab") as log:
            proc = subprocess.Popen(self._mlflow_command(state), stdout=log, stderr=subprocess.STDOUT,
                                    stdin=subprocess.DEVNULL, env=env, start_new_session=True, cwd=str(self.mlflow_dir))
        self.mlflow_pid_file.write_text(f"{proc.pid}\n")
        if not self._wait_healthy(state, MLFLOW_START_TIMEOUT_S, proc):
            self._stop_mlflow()
            raise ServicesError(f"the MLflow server did not come up on {self._local_tracking_uri(state)} "
                                f"within {MLFLOW_START_TIMEOUT_S:.0f} s; log {self.mlflow_log}:\n"
                                + log_tail(self.mlflow_log))

    def _auth_env(self, state: Dict[str, Any]) -> Dict[str, str]:
        """The basic-auth app's settings: its configuration file (no secret in it: users in a SQLite
        file beside it, no permission for anyone but the admin) and, through the server's
        environment, the admin password and the session secret."""
        if not state.get("auth"):
            return {}
        config = self.mlflow_dir / "basic_auth.ini"
        text = ("[mlflow]\ndefault_permission = NO_PERMISSIONS\n"
                f"database_uri = sqlite:///{self.mlflow_dir / 'basic_auth.db'}\nadmin_username = {AUTH_USER}\n"
                "authorization_function = mlflow.server.auth:authenticate_request_basic_auth\n")
        fd = os.open(config, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as fh:
            fh.write(text)
        return {"MLFLOW_AUTH_CONFIG_PATH": str(config), "MLFLOW_AUTH_ADMIN_PASSWORD": state["mlflow_password"],
                "MLFLOW_FLASK_SERVER_SECRET_KEY": state["flask_secret"]}

    def _wait_healthy(self, state: Dict[str, Any], timeout_s: float, proc=None) -> bool:
        uri = self._local_tracking_uri(state)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self._healthy(uri):
                return True
            if proc is not None and proc.poll() is not None:
                return False
            time.sleep(0.25)
        return False

    # ------------------------------------------------------------------ stop
    def stop_postgres(self) -> bool:
        """Stop this folder's PostgreSQL alone (fast shutdown), as a crash or maintenance would."""
        with self._locked():
            return self._stop_postgres(self.load_state())

    def stop(self, purge: bool = False) -> Dict[str, Any]:
        """Stop this folder's MLflow server and PostgreSQL (stale pid files are just removed);
        ``purge`` also deletes the folder (databases and artifacts)."""
        stopped: Dict[str, Any] = {"mlflow": False, "postgres": False}
        if not self.root.exists():
            return stopped
        with self._locked():
            state = self.load_state()
            stopped["mlflow"] = self._stop_mlflow()
            stopped["postgres"] = self._stop_postgres(state)
        if purge:
            shutil.rmtree(self.root, ignore_errors=True)
        return stopped

    def _stop_mlflow(self) -> bool:
        pid = self._mlflow_pid()
        self.mlflow_pid_file.unlink(missing_ok=True)
        if pid is None:
            return False
        _kill_group(pid, STOP_GRACE_S)
        return True

    def _stop_postgres(self, state: Dict[str, Any]) -> bool:
        pid = self._pg_running(state)
        if pid is None:
            return False
        bin_dir = Path(state.get("pg_bin") or find_pg_bin() or "")
        runas = _runas()
        if (bin_dir / "pg_ctl").exists():
            subprocess.run([str(bin_dir / "pg_ctl"), "-D", str(self.pgdata), "-m", "fast", "-w", "-t", "30", "stop"],
                           capture_output=True, text=True, env=self._pg_env(), stdin=subprocess.DEVNULL,
                           **self._as_runner(runas))
        if pid_alive(pid):  # pg_ctl missing or stuck: the postmaster's own fast shutdown signal
            try:
                os.kill(pid, signal.SIGINT)
            except ProcessLookupError:
                pass
            deadline = time.monotonic() + STOP_GRACE_S
            while pid_alive(pid) and time.monotonic() < deadline:
                time.sleep(0.1)
            if pid_alive(pid):
                os.kill(pid, signal.SIGKILL)
        return True


def _reachable_names(listen: str) -> Optional[str]:
    """``--allowed-hosts`` for a server other machines reach: MLflow's defaults (loopback and
    private addresses) plus this machine's names, which clients use (the printed URIs carry
    ``socket.gethostname()``); MLflow refuses other Host headers (DNS rebinding protection).
    None on loopback: MLflow's defaults."""
    if is_loopback(listen):
        return None
    names = {socket.gethostname(), socket.getfqdn(), "localhost", "127.0.0.1"}
    if listen not in WILDCARDS:
        names.add(listen)
    private = ["10.*", "192.168.*", *[f"172.{i}.*" for i in range(16, 32)]]
    return ",".join([*sorted(n for name in names for n in (name, f"{name}:*")), *private])


def _kill_group(pid: int, grace_s: float) -> None:
    """SIGTERM to the process group led by ``pid`` (the server and its workers), SIGKILL after
    ``grace_s``."""
    try:
        pgid = os.getpgid(pid)
    except ProcessLookupError:
        return
    if pgid != pid:  # not a group leader (started differently): signal the process alone
        targets = lambda sig: os.kill(pid, sig)  # noqa: E731
    else:
        targets = lambda sig: os.killpg(pgid, sig)  # noqa: E731
    try:
        targets(signal.SIGTERM)
    except ProcessLookupError:
        return
    deadline = time.monotonic() + grace_s
    while time.monotonic() < deadline:
        try:
            if pgid == pid:
                os.killpg(pgid, 0)
            elif not pid_alive(pid):
                return
        except ProcessLookupError:
            return
        _reap(pid)
        time.sleep(0.1)
    try:
        targets(signal.SIGKILL)
    except ProcessLookupError:
        pass
    _reap(pid)


def _reap(pid: int) -> None:
    try:
        os.waitpid(pid, os.WNOHANG)
    except ChildProcessError:
        pass


def watch(parent_pid: int, services: Services, purge: bool = True, poll_s: float = 1.0) -> None:
    """Stop ``services`` once ``parent_pid`` is gone (a test session killed before its teardown)."""
    while pid_alive(parent_pid):
        time.sleep(poll_s)
    services.stop(purge=purge)
