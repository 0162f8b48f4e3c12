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


VIEW_METRICS = ("view_psnr", "view_ssim", "view_iou")
"""Pose-matched scores on held-out views (:mod:`grafccsr.metrics.views`), each the mean over the
latent codes; ``<name>_best`` is the same for each class's best code. Higher is better for all.
Logged as ``eval/<name>`` and per class ``<name>/<class>`` (:func:`logged_view_key`): no FID/KID key
starts with ``view_``."""
VIEW_COLUMNS = tuple(name + suffix for name in VIEW_METRICS for suffix in ("", "_best"))
"""Every overall pose-matched key (the analysis columns and sweep objectives)."""


def view_key(name: str, class_name: str | None = None) -> str:
    """``view_psnr`` or, for one class, ``view_psnr/<class>`` with the characters MLflow refuses in a
    metric name (anything but letters, digits, ``_ - . /`` and space) replaced by ``_``."""
    if class_name is None:
        return name
    safe = "".join(c if c.isascii() and (c.isalnum() or c in "_-. ") else "_" for c in class_name)
    return f"{name}/{safe}"


def logged_view_key(name: str) -> str:
    """The MLflow key of a pose-matched score: ``eval/view_psnr`` overall, and a class's
    ``view_psnr/<class>`` as it is. MLflow's UI groups a run's charts by what precedes the key's
    last ``/`` and orders the groups alphabetically: per class, each score is a group of its own
    after eval/, mem/, perf/ and train/ instead of six groups between eval/ and mem/."""
    return name if "/" in name else f"eval/{name}"
