"""Analysis of grafccsr runs: MLflow runs (and Optuna trials) as pandas frames, Pareto
fronts, plots, the memory guide's table measured, and reports.

Run from the repository root (the folder is not part of the installed package)::

    python -m analysis.ablation [--preset cpu|gpu] [--iters N] [overrides ...]
    python -m analysis.report [--name EXPERIMENT_OR_STUDY]

Modules: :mod:`analysis.runs` (loading), :mod:`analysis.pareto`, :mod:`analysis.plots`,
:mod:`analysis.ablation`, :mod:`analysis.report`. Importing this package imports
neither MLflow nor matplotlib.
"""

__all__ = ["ablation", "pareto", "plots", "report", "runs"]
