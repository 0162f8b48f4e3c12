"""Evaluating a trained checkpoint: load its generator, FID/KID, rotation and elevation
videos, labelled multi-view grids, and an MLflow child run of the training run."""

from grafccsr.evaluation.checkpoint import EvalModel, find_run_checkpoint, load_eval_model
from grafccsr.evaluation.run import EvalOptions, evaluate

__all__ = ["EvalModel", "EvalOptions", "evaluate", "find_run_checkpoint", "load_eval_model"]
