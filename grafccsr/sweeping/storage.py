"""Optuna storage URLs (SQLite / any RDB URL / ``journal:<path>``) and the cross-process lock
that makes "count the study's trials, then ask for one more" atomic: a lock file for SQLite and
journal files, a PostgreSQL advisory lock for PostgreSQL."""

from __future__ import annotations

import hashlib
import os
import threading
from pathlib import Path
from typing import Any, Callable, Optional

from grafccsr.paths import PROJECT_ROOT
from grafccsr.sweeping.spec import SpecError

try:
    import fcntl
except ImportError:  # Windows: the study lock is then a thread lock only
    fcntl = None

SQLITE_BUSY_TIMEOUT_S = 60
PG_CONNECT_TIMEOUT_S = 10
"""A PostgreSQL server that does not answer a connection within this is lost (libpq waits forever)."""
JOURNAL_PREFIX = "journal:"


class StorageUnavailable(SpecError):
    """The storage does not answer: at start a bad argument (exit 2); during a sweep, lost."""


def is_storage_error(err: BaseException) -> bool:
    """A database that stopped answering: Optuna's wrapper of a database error, SQLAlchemy's own
    (a dropped connection), or the study lock's."""
    if isinstance(err, StorageUnavailable):
        return True
    import optuna
    import sqlalchemy

    return isinstance(err, (optuna.exceptions.StorageInternalError, sqlalchemy.exc.OperationalError,
                            sqlalchemy.exc.InterfaceError))


def storage_cause(err: BaseException) -> str:
    """A lost storage's cause in one line (the driver's message, without the SQL)."""
    inner = err
    while inner.__cause__ is not None or getattr(inner, "orig", None) is not None:
        inner = getattr(inner, "orig", None) or inner.__cause__
    lines = [ln.strip() for ln in str(inner).strip().splitlines() if ln.strip()]
    return lines[0][:300] if lines else type(inner).__name__


def has_password(url: str) -> bool:
    """A URL with ``user:password@``."""
    return redact(url) != url


def default_storage_url() -> str:
    return f"sqlite:///{PROJECT_ROOT / 'sweeps' / 'optuna.db'}"


def resolve_storage_url(url: Optional[str]) -> str:
    """Absolute paths for local stores, so that every process and subprocess sees the same file."""
    if not url:
        return default_storage_url()
    if url.startswith(JOURNAL_PREFIX):
        return JOURNAL_PREFIX + str(Path(url[len(JOURNAL_PREFIX):]).expanduser().resolve())
    if url.startswith("sqlite:///") and not url.startswith("sqlite:////") and url != "sqlite:///:memory:":
        path = url[len("sqlite:///"):]
        return f"sqlite:///{Path(path).expanduser().resolve()}"
    return url


def local_file(url: str) -> Optional[Path]:
    """The file behind a SQLite or journal storage (None for servers)."""
    if url.startswith(JOURNAL_PREFIX):
        return Path(url[len(JOURNAL_PREFIX):])
    if url.startswith("sqlite:////"):
        return Path(url[len("sqlite:///"):])
    if url.startswith("sqlite:///") and url != "sqlite:///:memory:":
        return Path(url[len("sqlite:///"):]).resolve()
    return None


def is_postgres(url: str) -> bool:
    return url.split(":", 1)[0].split("+", 1)[0] in ("postgresql", "postgres")


def make_storage(url: str, heartbeat_interval_s: Optional[int] = None, grace_period_s: Optional[int] = None,
                 stale_callback: Optional[Callable[[Any, Any], None]] = None):
    """An Optuna storage object for ``url``.

    RDB storages record heartbeats (when ``heartbeat_interval_s``): a RUNNING trial without a
    heartbeat for ``grace_period_s`` (default 2 x interval) is marked FAIL by the next
    ``fail_stale_trials`` of any sweep process, which then calls ``stale_callback(study, trial)``
    (default: Optuna's ``RetryHeartbeatStaleTrialCallback(max_retry=1)``). SQLite gets a 60 s busy
    timeout so several sweep processes can write to one file. Journal files have no heartbeat.
    """
    import optuna

    path = local_file(url)
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
    if url.startswith(JOURNAL_PREFIX):
        from optuna.storages.journal import JournalFileBackend

        return optuna.storages.JournalStorage(JournalFileBackend(str(path)))
    engine_kwargs = {}
    if url.startswith("sqlite"):
        engine_kwargs["connect_args"] = {"timeout": SQLITE_BUSY_TIMEOUT_S}
    else:
        engine_kwargs["pool_pre_ping"] = True
        if is_postgres(url):
            engine_kwargs["connect_args"] = {"connect_timeout": PG_CONNECT_TIMEOUT_S}
    kwargs = {}
    if heartbeat_interval_s:
        kwargs.update(heartbeat_interval=int(heartbeat_interval_s),
                      grace_period=int(grace_period_s) if grace_period_s else None,
                      heartbeat_stale_trial_callback=stale_callback
                      or optuna.storages.RetryHeartbeatStaleTrialCallback(max_retry=1))
    return optuna.storages.RDBStorage(url, engine_kwargs=engine_kwargs, **kwargs)


def redact(url: str) -> str:
    """The URL without a password (for logs and MLflow params)."""
    if "://" in url and "@" in url.split("://", 1)[1]:
        scheme, rest = url.split("://", 1)
        creds, host = rest.rsplit("@", 1)
        user = creds.split(":", 1)[0]
        return f"{scheme}://{user}:***@{host}" if ":" in creds else url
    return url


def advisory_key(study_name: str) -> int:
    """A stable signed 64-bit key for ``pg_advisory_lock`` (one per study name)."""
    digest = hashlib.sha256(f"grafccsr-sweep:{study_name}".encode()).digest()
    return int.from_bytes(digest[:8], "big", signed=True)


class StudyLock:
    """A non-re-entrant mutex across the threads of this process and across processes:
    ``fcntl.flock`` on ``<storage file>.sweep-lock`` for SQLite and journal files (not ``.lock``,
    which Optuna's journal symlink lock uses); ``pg_advisory_lock`` on a connection of its own for
    PostgreSQL (released by the server if the holder dies, so a SIGKILLed sweep never blocks the
    others). The sweep holds it while it opens the study (schema creation on a fresh database
    races otherwise) and finds or creates the MLflow parent run, and for "count, then ask".
    Other server RDBs (MySQL) get the thread lock only: concurrent processes there may overshoot
    ``n_trials`` by at most one trial per extra process."""

    def __init__(self, storage_url: str, study_name: str = "") -> None:
        self._thread_lock = threading.Lock()
        path = local_file(storage_url)
        self.path = path.with_name(path.name + ".sweep-lock") if path is not None else None
        self._fh = None
        self._pg_url = storage_url if is_postgres(storage_url) else None
        self._pg_key = advisory_key(study_name)
        self._pg_engine = None
        self._pg_conn = None

    def _pg_lock(self) -> None:
        import sqlalchemy

        if self._pg_engine is None:
            self._pg_engine = sqlalchemy.create_engine(self._pg_url, poolclass=sqlalchemy.pool.NullPool,
                                                       connect_args={"connect_timeout": PG_CONNECT_TIMEOUT_S})
        for attempt in (0, 1):  # a connection dropped since the last use (server restart): reconnect once
            try:
                if self._pg_conn is None:
                    self._pg_conn = self._pg_engine.connect().execution_options(isolation_level="AUTOCOMMIT")
                self._pg_conn.execute(sqlalchemy.text("SELECT pg_advisory_lock(:k)"), {"k": self._pg_key})
                return
            except sqlalchemy.exc.OperationalError as err:
                self._pg_close()
                if attempt:
                    detail = str(getattr(err, "orig", err)).strip().splitlines()
                    raise StorageUnavailable(f"storage {redact(self._pg_url)}: cannot connect "
                                             f"({detail[0] if detail else type(err).__name__})") from None

    def _pg_unlock(self) -> None:
        import sqlalchemy

        try:
            self._pg_conn.execute(sqlalchemy.text("SELECT pg_advisory_unlock(:k)"), {"k": self._pg_key})
        except Exception:  # noqa: BLE001 - a lost connection released the lock already
            self._pg_close()

    def _pg_close(self) -> None:
        if self._pg_conn is not None:
            try:
                self._pg_conn.close()
            except Exception:  # noqa: BLE001
                pass
            self._pg_conn = None

    def close(self) -> None:
        self._pg_close()
        if self._pg_engine is not None:
            self._pg_engine.dispose()
            self._pg_engine = None

    def __enter__(self) -> "StudyLock":
        self._thread_lock.acquire()
        if self._pg_url is not None:
            try:
                self._pg_lock()
            except BaseException:
                self._thread_lock.release()
                raise
            return self
        if self.path is not None:
            if fcntl is None:
                return self
            try:
                self.path.parent.mkdir(parents=True, exist_ok=True)
                self._fh = open(self.path, "a+")
                fcntl.flock(self._fh.fileno(), fcntl.LOCK_EX)
            except BaseException:
                if self._fh is not None:
                    self._fh.close()
                    self._fh = None
                self._thread_lock.release()
                raise
        return self

    def __exit__(self, *exc) -> None:
        try:
            if self._pg_conn is not None:
                self._pg_unlock()
            if self._fh is not None:
                fcntl.flock(self._fh.fileno(), fcntl.LOCK_UN)
                self._fh.close()
                self._fh = None
        finally:
            self._thread_lock.release()


def cpu_threads_per_worker(workers: int) -> Optional[str]:
    """OMP/MKL threads for each trainer subprocess when several run at once (None: leave as is)."""
    if workers <= 1 or "OMP_NUM_THREADS" in os.environ:
        return None
    return str(max(1, (os.cpu_count() or 1) // workers))
