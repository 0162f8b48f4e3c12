"""FID/KID of a generator against the real set, computed by torch-fidelity.

Importing this package is cheap: torch-fidelity (seconds to import) is loaded only when a
metric is computed or the random-feature extractor is asked for.
"""

from __future__ import annotations

from typing import Any

from grafccsr.metrics.fidelity import (
    ExtractorWeightsError,
    evaluate_generator,
    extract_features,
    real_stats_key,
    sample_eval_poses,
)
from grafccsr.metrics.keys import EXTRACTOR_TAG, INCEPTION, METRIC_NAMES, RANDOM_FEATURES, keyed, metric_key

__all__ = [
    "EXTRACTOR_TAG", "INCEPTION", "METRIC_NAMES", "RANDOM_FEATURES", "ExtractorWeightsError",
    "RandomFeatureExtractor", "evaluate_generator", "extract_features", "keyed", "metric_key", "real_stats_key",
    "sample_eval_poses",
]


def __getattr__(name: str) -> Any:  # PEP 562: the extractor module imports torch-fidelity
    if name == "RandomFeatureExtractor":
        from grafccsr.metrics.extractors import RandomFeatureExtractor

        return RandomFeatureExtractor
    raise AttributeError(f"module 'grafccsr.metrics' has no attribute {name!r}")
