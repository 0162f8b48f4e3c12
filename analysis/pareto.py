"""Pareto fronts over any number of objectives, each minimised or maximised.

:func:`pareto_mask` works on a plain array. :func:`pareto_front` works on a runs frame and
labels every row ``front``, ``dominated``, ``infeasible`` (over a memory budget or a sweep
constraint) or ``failed`` (not FINISHED, or an objective missing); the front is computed
among the feasible, finished rows only.
"""

from __future__ import annotations

import math
from typing import Optional, Sequence, Union

import numpy as np
import pandas as pd

STATUSES = ("front", "dominated", "infeasible", "failed")


def _signs(directions: Sequence[str], k: int) -> np.ndarray:
    if len(directions) != k:
        raise ValueError(f"{k} objectives but {len(directions)} directions")
    signs = []
    for d in directions:
        d = str(d).lower()
        if d in ("minimize", "min"):
            signs.append(1.0)
        elif d in ("maximize", "max"):
            signs.append(-1.0)
        else:
            raise ValueError(f"direction {d!r} must be 'minimize' or 'maximize'")
    return np.asarray(signs)


def pareto_mask(values: Union[np.ndarray, Sequence[Sequence[float]]], directions: Optional[Sequence[str]] = None) -> np.ndarray:
    """Boolean mask of the non-dominated rows of an ``(n, k)`` array.

    Rows with a NaN are never on the front and never dominate. Identical rows do not dominate
    each other (both stay on the front)."""
    v = np.asarray(values, dtype=float)
    if v.ndim != 2:
        raise ValueError(f"values must be 2-D (n points, k objectives), got shape {v.shape}")
    n, k = v.shape
    directions = directions or ["minimize"] * k
    x = v * _signs(directions, k)
    valid = ~np.isnan(x).any(axis=1)
    mask = np.zeros(n, dtype=bool)
    idx = np.flatnonzero(valid)
    if idx.size == 0:
        return mask
    p = x[idx]
    # dominated[i] = any j with p[j] <= p[i] everywhere and p[j] < p[i] somewhere
    le = (p[:, None, :] <= p[None, :, :]).all(axis=2)  # le[j, i]: j <= i
    lt = (p[:, None, :] < p[None, :, :]).any(axis=2)
    dominated = (le & lt).any(axis=0)
    mask[idx] = ~dominated
    return mask


def pareto_front(
    df: pd.DataFrame,
    objectives: Sequence[str],
    directions: Optional[Sequence[str]] = None,
    feasible: Union[None, str, pd.Series, np.ndarray] = None,
    memory_budget_mb: Optional[float] = None,
    memory_column: str = "peak_memory_mb",
    finished_only: bool = True,
) -> pd.DataFrame:
    """A copy of ``df`` with ``pareto_status`` (front/dominated/infeasible/failed) and ``on_front``.

    ``objectives``: columns, e.g. ``("peak_memory_mb", "fid_rf")``; ``directions``: one
    ``minimize``/``maximize`` each (default: minimise all).

    ``feasible``: a boolean column name or mask (e.g. ``trial_feasible`` of a sweep), combined
    with ``memory_budget_mb`` (rows whose ``memory_column`` exceeds it are infeasible). Rows
    whose ``status`` is not FINISHED (when ``finished_only``) or that lack an objective are
    ``failed``. Sorted by the first objective."""
    out = df.copy()
    missing = [c for c in objectives if c not in out.columns]
    if missing:
        raise KeyError(f"objective columns missing from the frame: {missing}")
    values = out[list(objectives)].apply(pd.to_numeric, errors="coerce").to_numpy(dtype=float)
    failed = np.isnan(values).any(axis=1)
    if finished_only and "status" in out.columns:
        failed |= (out["status"].astype(object) != "FINISHED").to_numpy()
    ok = np.ones(len(out), dtype=bool)
    if feasible is not None:
        f = out[feasible] if isinstance(feasible, str) else feasible
        ok &= np.asarray(pd.Series(f, index=out.index).fillna(True).astype(bool))
    if memory_budget_mb is not None and memory_column in out.columns:
        mem = pd.to_numeric(out[memory_column], errors="coerce").to_numpy(dtype=float)
        ok &= ~(mem > memory_budget_mb)
    candidates = ~failed & ok
    mask = np.zeros(len(out), dtype=bool)
    if candidates.any():
        mask[np.flatnonzero(candidates)] = pareto_mask(values[candidates], directions)
    status = np.where(failed, "failed", np.where(~ok, "infeasible", np.where(mask, "front", "dominated")))
    out["pareto_status"] = status
    out["on_front"] = mask
    key = out[objectives[0]].apply(lambda v: math.inf if v is None or pd.isna(v) else v)
    return out.assign(_key=key).sort_values(["_key"], kind="stable").drop(columns="_key")
