"""Analysis of grafccsr runs: MLflow runs (and Optuna trials) as pandas frames, Pareto
fronts, plots, the memory guide's table measured, and reports.

Run from the repository root::

    python -m analysis.ablation [--preset cpu|gpu] [--iters N] [overrides ...]
    python -m analysis.report [--name EXPERIMENT_OR_STUDY] [--tracking-uri URI] [--storage URL]

The installed wheel carries this folder as ``grafccsr_analysis`` (``grafccsr-report``,
``grafccsr-quality``), so that no top-level ``analysis`` clashes with another distribution's;
the modules import each other relatively, and work under either name.

Modules, each importing only those above it:

* :mod:`analysis.runs` — MLflow runs as typed frames (extractor-specific quality columns);
* :mod:`analysis.studies` — Optuna studies (any storage URL) joined with their runs;
* :mod:`analysis.pareto` — Pareto fronts; :mod:`analysis.plots` — PNG plots;
* :mod:`analysis.ablation` — the guide's items (``items``), the measured table (``table``),
  and the launcher (``launch``, the only one that imports the report);
* :mod:`analysis.render` — a report's Markdown/HTML; :mod:`analysis.sections` — what each
  kind of report says; :mod:`analysis.report` — the command line and MLflow logging.

Importing this package imports neither MLflow nor matplotlib.
"""
