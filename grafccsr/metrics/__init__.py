"""FID/KID of a generator against the real set, computed by torch-fidelity.

Importing this package is cheap: torch-fidelity (seconds to import) is loaded only when a
metric is computed. ``from grafccsr.metrics import evaluate_generator`` resolves lazily.
"""

from __future__ import annotations

from typing import Any

__all__ = [
    "EXTRACTOR_TAG",
    "ExtractorWeightsError",
    "RandomFeatureExtractor",
    "evaluate_generator",
    "extract_features",
    "keyed",
    "metric_key",
    "real_stats_key",
    "sample_eval_poses",
]

EXTRACTOR_TAG = "fid_extractor"
"""MLflow tag naming the feature extractor behind a run's evaluation metrics."""

RANDOM_FEATURES = "random-features"
INCEPTION = "inception-v3-compat"


def metric_key(name: str, extractor: str) -> str:
    """The logged name of ``fid``/``kid_mean``/``kid_std`` for an extractor: plain for
    torch-fidelity's Inception (comparable with papers), ``fid_rf``/``kid_rf_mean``/``kid_rf_std``
    for random features, so the two never share a series."""
    if extractor == INCEPTION:
        return name
    if extractor == RANDOM_FEATURES:
        return name.replace("fid", "fid_rf").replace("kid", "kid_rf")
    raise ValueError(f"unknown extractor {extractor!r}")


METRIC_NAMES = ("fid", "kid_mean", "kid_std")


def keyed(result: dict) -> dict:
    """An evaluation result with ``fid``/``kid_*`` renamed for its ``extractor`` (:func:`metric_key`)."""
    return {metric_key(k, result["extractor"]) if k in METRIC_NAMES else k: v for k, v in result.items()}


def __getattr__(name: str) -> Any:  # PEP 562: lazy re-export
    if name == "RandomFeatureExtractor":  # importing it imports torch-fidelity
        from grafccsr.metrics import extractors

        return extractors.RandomFeatureExtractor
    if name in __all__:
        from grafccsr.metrics import fidelity

        return getattr(fidelity, name)
    raise AttributeError(f"module 'grafccsr.metrics' has no attribute {name!r}")
