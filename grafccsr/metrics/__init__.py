"""FID/KID of a generator against the real set, computed by torch-fidelity.

Importing this package is cheap: the computation (torch, the models) and torch-fidelity
(seconds to import) are loaded only when a metric is computed or the extractor is asked for;
the metric keys need neither.
"""

from __future__ import annotations

from typing import Any

from grafccsr.metrics.keys import EXTRACTOR_TAG, INCEPTION, METRIC_NAMES, RANDOM_FEATURES, keyed, metric_key

__all__ = [
    "EXTRACTOR_TAG", "INCEPTION", "METRIC_NAMES", "RANDOM_FEATURES", "ExtractorWeightsError",
    "RandomFeatureExtractor", "evaluate_generator", "extract_features", "keyed", "metric_key", "real_stats_key",
    "sample_eval_poses",
]


_FIDELITY = ("ExtractorWeightsError", "evaluate_generator", "extract_features", "real_stats_key", "sample_eval_poses")


def __getattr__(name: str) -> Any:
    # PEP 562: the metric keys stay importable without torch (analysis/ reads them); the
    # computation imports torch and the models, the extractor module torch-fidelity
    if name in _FIDELITY:
        import grafccsr.metrics.fidelity as fidelity

        return getattr(fidelity, name)
    if name == "RandomFeatureExtractor":
        from grafccsr.metrics.extractors import RandomFeatureExtractor

        return RandomFeatureExtractor
    raise AttributeError(f"module 'grafccsr.metrics' has no attribute {name!r}")
