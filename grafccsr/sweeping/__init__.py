"""Helpers of the sweep driver (``python -m grafccsr.sweep``).

spec      study definitions (sweeps/*.yaml) -> StudySpec, Hydra override formatting
storage   Optuna storage URLs (SQLite, RDB, journal:<path>) and the study lock (lock file / pg_advisory_lock)
runner    one training subprocess per trial, metrics.json -> Outcome; the memory-estimate hook
launchers where a trial runs: local subprocess, torchrun, submitit (SLURM or local jobs)
tracking  MLflow parent run, child-run tags, Pareto artifacts
pareto    Pareto rows, console table, plot
driver    Sweep: ask/tell loop, workers, heartbeats and stale-trial retries, resume, interruption

The local PostgreSQL + MLflow server for multi-process sweeps: :mod:`grafccsr.services`.
"""
