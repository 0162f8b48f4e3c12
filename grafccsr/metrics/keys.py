"""Names of evaluation results: which feature extractor, and the logged key of each metric."""

from __future__ import annotations

EXTRACTOR_TAG = "fid_extractor"
"""MLflow tag naming the feature extractor behind a run's evaluation metrics."""
RANDOM_FEATURES = "random-features"
INCEPTION = "inception-v3-compat"
METRIC_NAMES = ("fid", "kid_mean", "kid_std")


def metric_key(name: str, extractor: str) -> str:
    """The logged name of ``fid``/``kid_mean``/``kid_std`` for an extractor: plain for
    torch-fidelity's Inception (comparable with papers), ``fid_rf``/``kid_rf_mean``/``kid_rf_std``
    for random features, so the two never share a series."""
    if extractor == INCEPTION:
        return name
    if extractor == RANDOM_FEATURES:
        return name.replace("fid", "fid_rf").replace("kid", "kid_rf")
    raise ValueError(f"unknown extractor {extractor!r}")


def keyed(result: dict) -> dict:
    """An evaluation result with ``fid``/``kid_*`` renamed for its ``extractor`` (:func:`metric_key`)."""
    return {metric_key(k, result["extractor"]) if k in METRIC_NAMES else k: v for k, v in result.items()}
