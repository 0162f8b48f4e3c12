import os

import pytest

os.environ.setdefault("MPLBACKEND", "Agg")


@pytest.fixture
def mlflow_uri(tmp_path):
    """A throwaway MLflow store for one test."""
    return f"sqlite:///{tmp_path / 'mlflow.db'}"
