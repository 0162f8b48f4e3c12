"""FID/KID of a generator against the real set, computed by torch-fidelity.

Importing this package is cheap: torch-fidelity (seconds to import) is loaded
only when a metric is computed. ``from grafccsr.metrics import evaluate_generator``
resolves lazily.
"""

from __future__ import annotations

from typing import Any

__all__ = [
    "EXTRACTOR_TAG",
    "ExtractorWeightsError",
    "RandomFeatureExtractor",
    "evaluate_generator",
    "extract_features",
    "real_stats_key",
    "sample_eval_poses",
]

EXTRACTOR_TAG = "fid_extractor"
"""MLflow tag naming the feature extractor behind a run's ``eval/*`` metrics."""


def __getattr__(name: str) -> Any:  # PEP 562: lazy re-export
    if name == "RandomFeatureExtractor":  # importing it imports torch-fidelity
        from grafccsr.metrics import extractors

        return extractors.RandomFeatureExtractor
    if name in __all__:
        from grafccsr.metrics import fidelity

        return getattr(fidelity, name)
    raise AttributeError(f"module 'grafccsr.metrics' has no attribute {name!r}")
