import os
import subprocess
import sys
import tempfile
import uuid
from pathlib import Path

import pytest

os.environ.setdefault("MPLBACKEND", "Agg")


@pytest.fixture
def mlflow_uri(tmp_path):
    """A throwaway MLflow store for one test."""
    return f"sqlite:///{tmp_path / 'mlflow.db'}"


# --------------------------------------------------------------------------- real servers


@pytest.fixture(scope="session")
def services():
    """A real PostgreSQL + ``mlflow server`` (on PostgreSQL, served artifacts) for the session.

    Reuses the servers of ``$GRAFCCSR_SERVICES_DIR`` when they run (``.ci/run`` starts them
    once); otherwise starts its own in a temporary folder (throwaway settings: no fsync) and
    stops them at the end of the session — also when the session is killed: a watchdog process
    stops them once this process is gone. Skipped only when PostgreSQL's binaries are absent.
    """
    from grafccsr.services import INSTALL_HINT, Services, find_pg_bin

    shared = os.environ.get("GRAFCCSR_SERVICES_DIR")
    if shared:
        svc = Services(Path(shared))
        if svc.status()["running"]:
            yield svc
            return
    if find_pg_bin() is None:
        pytest.skip(f"PostgreSQL binaries (initdb, pg_ctl) not found; install Debian's package: {INSTALL_HINT}")
    root = Path(tempfile.mkdtemp(prefix="grafccsr-services-"))
    root.chmod(0o755)  # run as root, PostgreSQL runs as the postgres user and must reach its folder
    svc = Services(root / "s", fast=True, mlflow_workers=1)
    watchdog = subprocess.Popen([sys.executable, "-m", "grafccsr.services", "watch", "--pid", str(os.getpid()),
                                 "--dir", str(svc.root), "--purge"], start_new_session=True,
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        svc.start()
        yield svc
    finally:
        try:
            svc.stop(purge=True)
        finally:
            watchdog.kill()
            watchdog.wait()
            import shutil

            shutil.rmtree(root, ignore_errors=True)


@pytest.fixture
def pg_storage(services):
    """A fresh PostgreSQL database for one test's Optuna storage (dropped afterwards)."""
    name = f"t_{uuid.uuid4().hex[:12]}"
    url = services.create_database(name)
    yield url
    services.drop_database(name)
