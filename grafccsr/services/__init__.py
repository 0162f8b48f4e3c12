"""Local services for multi-process sweeps: PostgreSQL (Optuna storage) and an MLflow tracking
server backed by it. ``python -m grafccsr.services start|stop|status`` (``make services``);
see :mod:`grafccsr.services.local`."""

from grafccsr.services.local import (AUTH_USER, INSTALL_HINT, MLFLOW_DB, OPTUNA_DB, PG_ROLE, STORAGE_ENV,
                                     PostgresMissing, Services, ServicesError, UnsafeHost, find_pg_bin)

__all__ = ["AUTH_USER", "INSTALL_HINT", "MLFLOW_DB", "OPTUNA_DB", "PG_ROLE", "STORAGE_ENV", "PostgresMissing",
           "Services", "ServicesError", "UnsafeHost", "find_pg_bin"]
