"""Helpers of the sweep driver (``python -m grafccsr.sweep``).

spec      study definitions (sweeps/*.yaml) -> StudySpec, Hydra override formatting
storage   Optuna storage URLs (SQLite, RDB, journal:<path>) and the study lock
runner    one training subprocess per trial, metrics.json -> Outcome; the memory-estimate hook
tracking  MLflow parent run, child-run tags, Pareto artifacts
pareto    Pareto rows, console table, plot
driver    Sweep: ask/tell loop, workers, resume, interruption
"""
