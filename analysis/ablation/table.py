"""The ablation's runs as the memory guide's table: the guide's claim next to the measured
value and change of every item, its Markdown, and one finding per item.

Changes are ``(item - baseline) / baseline * 100``. FID/KID are compared only within one
feature extractor's columns (``fid_rf``... or ``fid``...) and one iteration budget; it/s only
where both runs have at least :data:`~analysis.runs.MIN_TIMED_ITERATIONS` timed iterations.
"""

from __future__ import annotations

import math
from typing import Any, Dict, List, Optional

import pandas as pd

from .items import ITEMS
from ..runs import MIN_TIMED_ITERATIONS, QUALITY_COLUMNS, load_runs, measured_throughput, quality_label
from grafccsr.metrics import RANDOM_FEATURES

MEASURES = {
    "peak_live_tensors_mb": "peak live tensors",
    "peak_allocated_mb": "peak CUDA allocated",
    "peak_reserved_mb": "peak CUDA reserved",
}
_QUALITY = tuple(c for cols in QUALITY_COLUMNS.values() for c in cols)
_NUMERIC = (*MEASURES, "process_peak_rss_mb", "it_per_s", *_QUALITY)


# ----------------------------------------------------------------------------- runs


def load_ablation(experiment: str, uri: Optional[str] = None) -> pd.DataFrame:
    """The experiment's runs that carry an ``ablation_item`` tag (``it_per_s`` is the run's
    average over its timed iterations, as the training loop logs it last)."""
    df = load_runs(uri, experiments=[experiment])
    if "tags.ablation_item" not in df.columns:
        return df.iloc[:0]
    return df[df["tags.ablation_item"].notna()].reset_index(drop=True)


def select_batch(df: pd.DataFrame, batch: Optional[str] = None) -> pd.DataFrame:
    """Ablation runs of one invocation: ``batch``, else the batch of the most recent run
    (all runs when none carries a batch tag)."""
    df = df[df["tags.ablation_item"].notna()] if "tags.ablation_item" in df.columns else df.iloc[:0]
    if "tags.ablation_batch" not in df.columns or df["tags.ablation_batch"].isna().all():
        return df
    if batch is None:
        batch = df.sort_values("start_time").iloc[-1]["tags.ablation_batch"]
    return df[df["tags.ablation_batch"] == batch]


def pct_change(value: Any, base: Any) -> Optional[float]:
    """(value - base) / base in %, None when either is missing or the base is 0."""
    try:
        v, b = float(value), float(base)
    except (TypeError, ValueError):
        return None
    if math.isnan(v) or math.isnan(b) or b == 0:
        return None
    return (v - b) / b * 100.0


def _aggregate(runs: pd.DataFrame) -> Dict[str, Any]:
    """Median of the finished runs of one item (several with --repeats); status otherwise."""
    finished = runs[runs["status"] == "FINISHED"].assign(it_per_s=lambda d: measured_throughput(d))
    out: Dict[str, Any] = {"runs": len(runs), "finished": len(finished)}
    for col in _NUMERIC:
        out[col] = float(pd.to_numeric(finished[col], errors="coerce").median()) \
            if len(finished) and col in finished else math.nan
    if len(finished):
        out["status"] = "FINISHED"
    else:
        reasons = sorted({str(r) for r in runs["failure_reason"].dropna()}) if len(runs) else []
        out["status"] = (sorted(set(runs["status"]))[0] if len(runs) else "not run") + \
            (f" ({', '.join(reasons)})" if reasons else "")
    src = finished if len(finished) else runs
    last = src.iloc[-1] if len(src) else None
    out["device"] = last["device"] if last is not None else None
    out["fid_extractor"] = last["fid_extractor"] if last is not None else None
    out["iterations"] = int(last["iterations"]) if last is not None and pd.notna(last["iterations"]) else None
    timed = pd.to_numeric(finished.get("timed_iterations", pd.Series(dtype=float)), errors="coerce").dropna()
    out["timed_iterations"] = int(timed.min()) if len(timed) else None
    codes = sorted({str(c) for c in runs.get("tags.ablation_code", pd.Series(dtype=object)).dropna()})
    out["code"] = ",".join(codes) if codes else None
    out["run_ids"] = list(runs["run_id"])
    return out


def _note(row: Dict[str, Any], text: str) -> None:
    row["note"] = "; ".join(x for x in (row["note"], text) if x)


def _compare(row: Dict[str, Any], agg: Dict[str, Any], base: Optional[Dict[str, Any]]) -> None:
    """Values and changes of one measured item against the baseline, with notes saying what
    was not compared and why."""
    same_code = base is None or agg["code"] == base["code"] or agg["code"] is None or base["code"] is None
    for col in _NUMERIC:
        row[col] = agg[col]
        row[f"{col}_change_pct"] = pct_change(agg[col], base[col]) if base is not None and same_code else None
    if not same_code:
        _note(row, f"not compared: made with other code than the baseline (fingerprint {agg['code']} vs "
                   f"{base['code']})")
    row["quality_comparable"] = base is not None and agg["iterations"] == base["iterations"]
    if base is None or agg["status"] != "FINISHED":
        return
    if not row["quality_comparable"]:
        for col in _QUALITY:
            row[f"{col}_change_pct"] = None
        _note(row, f"FID/KID not compared: {agg['iterations']} iterations vs the baseline's {base['iterations']}")
    elif agg["fid_extractor"] != base["fid_extractor"]:
        _note(row, f"FID/KID not compared: evaluated with {agg['fid_extractor']}, the baseline with "
                   f"{base['fid_extractor']}")
    if agg["device"] is not None and agg["device"] != base["device"]:
        _note(row, f"ran on {agg['device']}, baseline on {base['device']}")


def _quality_columns(base: Optional[Dict[str, Any]]) -> tuple:
    """The (FID, KID mean) columns the table shows: those of the baseline's extractor."""
    for cols in QUALITY_COLUMNS.values():
        if base is not None and not math.isnan(base[cols[0]]):
            return cols[:2]
    extractor = base["fid_extractor"] if base is not None and base["fid_extractor"] in QUALITY_COLUMNS \
        else RANDOM_FEATURES
    return QUALITY_COLUMNS[extractor][:2]


def ablation_table(df: pd.DataFrame, batch: Optional[str] = None) -> pd.DataFrame:
    """One row per guide item (in the guide's order): the claim next to the measured values and
    their change against the baseline.

    Columns: ``key``, ``label``, ``change``, ``claim``, ``claim_low_pct``, ``claim_high_pct``, ``status``,
    ``runs``, ``device``, ``iterations``, ``timed_iterations``, ``fid_extractor``, and for each of
    ``peak_live_tensors_mb``, ``peak_allocated_mb``, ``peak_reserved_mb``, ``process_peak_rss_mb``,
    ``it_per_s`` (missing when not measured) and the quality columns (``fid_rf``, ``kid_rf_mean``, ...,
    ``fid``, ``kid_mean``, ...): the value and ``<col>_change_pct`` (None when the run's code
    fingerprint tag ``ablation_code`` differs from the baseline's); ``quality_comparable`` says
    whether FID/KID share the baseline's iteration budget; ``note``. The frame's ``attrs`` hold
    ``device``, ``batch``, ``memory_columns`` (the measures present), ``fid_extractor``,
    ``quality_columns`` (the baseline's FID and KID columns) and ``baseline_iterations``."""
    runs = select_batch(df, batch)
    by_item = {key: g for key, g in runs.groupby("tags.ablation_item")} if len(runs) else {}
    base = _aggregate(by_item["baseline"]) if "baseline" in by_item else None
    rows = []
    for item in ITEMS:
        row: Dict[str, Any] = {"key": item.key, "label": item.label, "change": item.change, "claim": item.claim,
                               "claim_low_pct": item.claim_low, "claim_high_pct": item.claim_high, "note": item.note}
        if not item.runnable or item.key not in by_item:
            row.update(status="no toggle" if not item.runnable else "not run", runs=0)
        else:
            agg = _aggregate(by_item[item.key])
            row.update({k: agg[k] for k in ("status", "runs", "device", "iterations", "timed_iterations",
                                            "fid_extractor", "code")})
            _compare(row, agg, base)
        rows.append(row)
    table = pd.DataFrame(rows)
    present = [c for c in MEASURES if c in table.columns and table[c].notna().any()]
    table.attrs.update(device=base["device"] if base else None, batch=_batch_of(runs), memory_columns=present,
                       fid_extractor=base["fid_extractor"] if base else None, quality_columns=_quality_columns(base),
                       baseline_iterations=base["iterations"] if base else None)
    return table


def _batch_of(runs: pd.DataFrame) -> Optional[str]:
    if "tags.ablation_batch" in runs.columns and runs["tags.ablation_batch"].notna().any():
        return str(runs["tags.ablation_batch"].dropna().iloc[0])
    return None


def is_cuda(device: Optional[str]) -> bool:
    return isinstance(device, str) and device not in ("", "cpu")


def headline_measure(table: pd.DataFrame) -> str:
    """The memory column findings speak of: CUDA peak allocated on a GPU, live tensors otherwise."""
    cols = table.attrs.get("memory_columns") or []
    if is_cuda(table.attrs.get("device")) and "peak_allocated_mb" in cols:
        return "peak_allocated_mb"
    return "peak_live_tensors_mb"


# ----------------------------------------------------------------------------- Markdown


def _val(v: Any) -> Optional[float]:
    try:
        f = float(v)
    except (TypeError, ValueError):
        return None
    return None if math.isnan(f) else f


def _num(v: Any, fmt: str = "{:.2f}") -> str:
    f = _val(v)
    return "—" if f is None else fmt.format(f)


def _delta(v: Any) -> str:
    f = _val(v)
    return "" if f is None else f" ({f:+.1f} %)"


def _pct(v: float) -> str:
    return f"{v:+.1f} %".replace("-0.0 %", "+0.0 %")


def _speed(r: pd.Series) -> str:
    """it/s, or why it is not shown."""
    timed = _val(r.get("timed_iterations"))
    if _val(r.get("it_per_s")) is None and timed is not None and timed < MIN_TIMED_ITERATIONS:
        return f"not measured ({timed:.0f} timed it.)"
    return _num(r.get("it_per_s"), "{:.3g}")


def _speed_cell(r: pd.Series) -> str:
    speed = _speed(r)
    return speed if speed.startswith("not") else speed + _delta(r.get("it_per_s_change_pct"))


def table_markdown(table: pd.DataFrame) -> str:
    """The measured-vs-claimed table in Markdown, with a header naming device and measures."""
    cuda = is_cuda(table.attrs.get("device"))
    present = table.attrs.get("memory_columns") or []
    mem_cols = [c for c in ("peak_allocated_mb", "peak_reserved_mb") if cuda and c in present]
    mem_cols.append("peak_live_tensors_mb")
    fid, kid = table.attrs.get("quality_columns") or QUALITY_COLUMNS[RANDOM_FEATURES][:2]
    headers = ["#", "change", "guide's claimed saving", *[f"{MEASURES[c]} MiB (Δ %)" for c in mem_cols],
               "it/s (Δ %)", f"{quality_label(fid)} (Δ %)", f"{quality_label(kid)} (Δ %)", "status"]
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    for _, r in table.iterrows():
        if r["status"] in ("no toggle", "not run"):
            cells = [r["label"], r["change"], r["claim"], *["—"] * (len(mem_cols) + 3),
                     r["status"] + (f": {r['note']}" if r["status"] == "no toggle" and r["note"] else "")]
        else:
            runs = r.get("runs", 1)
            cells = [r["label"], r["change"], r["claim"],
                     *[_num(r.get(c)) + _delta(r.get(f"{c}_change_pct")) for c in mem_cols], _speed_cell(r),
                     _num(r.get(fid), "{:.3g}") + _delta(r.get(f"{fid}_change_pct")),
                     _num(r.get(kid), "{:.3g}") + _delta(r.get(f"{kid}_change_pct")),
                     str(r["status"]) + (f" ×{int(runs)}" if runs and runs > 1 else "")
                     + (" — not compared (see findings)" if "not compared" in str(r.get("note") or "") else "")]
        lines.append("| " + " | ".join(str(c).replace("|", "\\|") for c in cells) + " |")
    return "\n".join(lines)


def table_header(table: pd.DataFrame) -> str:
    device = table.attrs.get("device") or "unknown"
    if is_cuda(device):
        measure = ("CUDA peak allocated and peak reserved memory (torch.cuda.max_memory_*, every phase: D step, "
                   "G step, sampling, eval) and peak live tensor bytes (sampled D/G steps)")
    else:
        measure = ("peak live tensor memory (bytes of live tensor storages seen by a dispatch-mode tracker on "
                   "sampled iterations of the D and G steps; a CPU has no allocator peak, so this is the "
                   "measure)")
    fid = (table.attrs.get("quality_columns") or QUALITY_COLUMNS[RANDOM_FEATURES])[0]
    return (f"Device: **{device}**. Memory: {measure}. Δ % = (item − baseline) / baseline × 100: "
            f"negative means less memory (a claimed saving of 10 % is a Δ of −10 %) or, for it/s, slower "
            f"training; it/s is the run's average over its timed iterations (those not measured by the "
            f"live-tensor tracker), and runs with fewer than {MIN_TIMED_ITERATIONS} timed iterations have "
            f"their throughput reported as not measured. {quality_label(fid)}: compared only between runs "
            f"evaluated with the same extractor after the same number of iterations "
            f"({table.attrs.get('baseline_iterations') or '?'}).")


# ----------------------------------------------------------------------------- findings


def _noise_floor(table: pd.DataFrame, columns: List[str]) -> Dict[str, float]:
    """|change| of the baseline's second run per column: the run-to-run variation."""
    rerun = table[(table["key"] == "rerun") & (table["status"] == "FINISHED")]
    out = {}
    for c in columns:
        v = _val(rerun.iloc[0].get(f"{c}_change_pct")) if len(rerun) else None
        if v is not None:
            out[c] = abs(v)
    return out


def _within(noise: Dict[str, float], c: str, v: float, key: str) -> str:
    if key != "rerun" and noise.get(c, 0.0) >= 0.05 and abs(v) <= noise[c] + 1e-9:
        return f" (within the ±{noise[c]:.1f} % run-to-run variation)"
    return ""


def _claim_text(r: pd.Series, change: Optional[float]) -> str:
    lo, hi = _val(r["claim_low_pct"]), _val(r["claim_high_pct"])
    if lo is None or hi is None:
        return "" if r["key"] == "rerun" else f" (guide: {r['claim']})"
    if change is None:
        return f"; the guide claimed {r['claim']}"
    saving = -change
    where = "within" if lo - 1e-9 <= saving <= hi + 1e-9 else "below" if saving < lo else "above"
    return (f"; the guide claimed a saving of {r['claim']}: the measured saving, "
            f"{saving:.1f} %".replace("-0.0 %", "0.0 %") + f", is {where} that")


def _item_finding(table: pd.DataFrame, r: pd.Series, b: pd.Series, noise: Dict[str, float]) -> str:
    col, key, cuda = headline_measure(table), r["key"], is_cuda(table.attrs.get("device"))
    name = MEASURES[col]
    change = _val(r.get(f"{col}_change_pct"))
    if change is None:
        text = f"{r['label']}: change in {name} not computed"
    else:
        text = (f"{r['label']} ({r['change']}) changed {name} by {_pct(change)} "
                f"({_num(b.get(col))} → {_num(r.get(col))} MiB){_within(noise, col, change, key)}")
    text += _claim_text(r, change)
    d = _val(r.get("peak_reserved_mb_change_pct"))
    if cuda and d is not None:
        text += f"; peak CUDA reserved {_pct(d)}{_within(noise, 'peak_reserved_mb', d, key)}"
    d = _val(r.get("it_per_s_change_pct"))
    if d is not None:
        text += f"; iterations/s {_pct(d)}{_within(noise, 'it_per_s', d, key)}"
    elif _val(r.get("it_per_s")) is None or _val(b.get("it_per_s")) is None:
        text += f"; iterations/s not measured (fewer than {MIN_TIMED_ITERATIONS} timed iterations)"
    fid = table.attrs["quality_columns"][0]
    d = _val(r.get(f"{fid}_change_pct"))
    if d is not None:
        text += (f"; {quality_label(fid)} {_num(b.get(fid), '{:.3g}')} → {_num(r.get(fid), '{:.3g}')} "
                 f"({_pct(d)})")
    if r.get("note"):
        text += f". Note: {r['note']}"
    return text + "."


def findings(table: pd.DataFrame) -> List[str]:
    """One sentence per item, stating only what was measured next to what the guide claimed.

    When the baseline was run twice (row ``rerun``), a change no larger than the rerun's is called
    "within the run-to-run variation" (measured noise floor)."""
    col = headline_measure(table)
    base = table[table["key"] == "baseline"]
    if base.empty or base.iloc[0]["status"] != "FINISHED":
        status = base.iloc[0]["status"] if len(base) else "not run"
        return [f"The baseline did not finish ({status}); no change can be computed."]
    b = base.iloc[0]
    fid, kid = table.attrs["quality_columns"]
    out = [f"Baseline ({b['change']}): {MEASURES[col]} {_num(b.get(col))} MiB, iterations/s {_speed(b)}, "
           f"{quality_label(fid)} {_num(b.get(fid), '{:.3g}')}, {quality_label(kid)} {_num(b.get(kid), '{:.3g}')} "
           f"after {_num(b.get('iterations'), '{:.0f}')} iterations on {b.get('device')}."]
    noise = _noise_floor(table, [col, "peak_reserved_mb", "it_per_s"])
    for _, r in table.iterrows():
        if r["key"] == "baseline" or r["status"] == "not run":
            continue
        if r["status"] == "no toggle":
            out.append(f"{r['label']}: not measured, no toggle — {r['note']} (the guide claimed {r['claim']}).")
        elif r["status"] != "FINISHED":
            out.append(f"{r['label']}: the run did not finish ({r['status']}); nothing measured.")
        else:
            out.append(_item_finding(table, r, b, noise))
    if not is_cuda(table.attrs.get("device")):
        out.append("On a CPU, items 2, 5, 7 and 10 act on CUDA only (pinned host memory, asynchronous copies, "
                   "the caching allocator, moving samples off the GPU) and the memory column is the training "
                   "step's peak, so their change in live tensor memory says nothing about a GPU.")
    return out


__all__ = ["MEASURES", "load_ablation", "select_batch", "pct_change", "ablation_table",
           "is_cuda", "headline_measure", "table_markdown", "table_header", "findings"]
