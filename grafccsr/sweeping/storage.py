"""Optuna storage URLs (SQLite / any RDB URL / ``journal:<path>``) and the cross-process lock
that makes "count the study's trials, then ask for one more" atomic on local storages."""

from __future__ import annotations

import os
import threading
from pathlib import Path
from typing import Optional

from grafccsr.paths import PROJECT_ROOT

SQLITE_BUSY_TIMEOUT_S = 60
JOURNAL_PREFIX = "journal:"


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


def make_storage(url: str, heartbeat_interval_s: Optional[int] = None):
    """An Optuna storage object for ``url``.

    RDB storages record heartbeats (when ``heartbeat_interval_s``) so that trials of a sweep
    process that died are marked FAIL by the next process and re-queued once
    (``RetryFailedTrialCallback``). SQLite gets a 60 s busy timeout so several sweep processes
    can write to one file. Journal files have no heartbeat in Optuna.
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
    kwargs = {}
    if heartbeat_interval_s:
        kwargs.update(heartbeat_interval=int(heartbeat_interval_s),
                      heartbeat_stale_trial_callback=optuna.storages.RetryHeartbeatStaleTrialCallback(max_retry=1))
    return optuna.storages.RDBStorage(url, engine_kwargs=engine_kwargs, **kwargs)


def redact(url: str) -> str:
    """The URL without a password (for logs and MLflow params)."""
    if "://" in url and "@" in url.split("://", 1)[1]:
        scheme, rest = url.split("://", 1)
        creds, host = rest.rsplit("@", 1)
        user = creds.split(":", 1)[0]
        return f"{scheme}://{user}:***@{host}" if ":" in creds else url
    return url


class StudyLock:
    """A re-entrant-free mutex across the threads of this process and, for local storages,
    across processes (``fcntl.flock`` on ``<storage file>.sweep-lock``; not ``.lock``, which
    Optuna's journal symlink lock uses). Server RDBs get the
    thread lock only: concurrent processes there may overshoot ``n_trials`` by at most one
    trial per extra process, as Optuna's own ``MaxTrialsCallback`` does."""

    def __init__(self, storage_url: str) -> None:
        self._thread_lock = threading.Lock()
        path = local_file(storage_url)
        self.path = path.with_name(path.name + ".sweep-lock") if path is not None else None
        self._fh = None

    def __enter__(self) -> "StudyLock":
        self._thread_lock.acquire()
        if self.path is not None:
            try:
                import fcntl
            except ImportError:  # Windows: thread lock only
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
            if self._fh is not None:
                import fcntl

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
