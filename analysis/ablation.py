"""The memory guide's expected-savings table, measured.

``python -m analysis.ablation [--preset cpu|gpu] [--iters N] [--experiment NAME]
[--tracking-uri URI] [--items 3,6,11] [--repeats N] [--dry-run] [overrides ...]``

Runs one training subprocess (``python -m grafccsr.train``) for the baseline (``+exp=baseline_fp32``:
every memory item off, FP32) and one per guide item switched on by itself, the items together
(``+exp=seed_all``) and the three things the guide lists as missing (gradient accumulation,
gradient checkpointing, render chunking). Every run has the same seed, model, batch size and
iteration budget, and CCSR as the original's regulariser (so item 9 has a CCSR branch to act
on). Runs go to one MLflow experiment, tagged ``ablation_item``, ``ablation_batch`` (one id per
invocation) and ``ablation_preset``. Then :func:`ablation_table` puts the guide's claimed
saving next to the measured change of every item, and :mod:`analysis.report` writes
``reports/<experiment>/report.md``.

Memory measured: on CUDA the allocator's peak allocated and peak reserved memory; on every
device the peak of live tensor bytes (``mem/peak_live_tensors_mb``, sampled iterations of the D
and G steps). On a CPU only the latter exists, and items that only act on CUDA (pinned memory,
non-blocking copies, ``empty_cache``, moving eval samples off the GPU) cannot change it.
"""

from __future__ import annotations

import argparse
import math
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence

import pandas as pd

from analysis.runs import PROJECT_ROOT, load_runs, metric_histories, resolve_tracking_uri

# ----------------------------------------------------------------------------- items


@dataclass(frozen=True)
class Item:
    key: str
    """Tag value ``ablation_item`` (``baseline``, ``1`` ... ``11``, ``6+7``, ``all``, ``accum``, ``ckpt``, ``chunk``)."""
    label: str
    """Short row label for tables and plots."""
    change: str
    """What is switched on."""
    overrides: Sequence[str] = ()
    """Hydra overrides on top of the preset (``{amp_dtype}``, ``{empty_cache_every}`` and
    ``{render_chunk}`` are filled from the preset)."""
    claim: str = "—"
    """The guide's claim, in its words (its table or its list)."""
    claim_low: Optional[float] = None
    """Claimed saving in % (positive = less memory), low end; None when the guide gave no number."""
    claim_high: Optional[float] = None
    exp: Optional[str] = None
    """Preset from conf/exp/ replacing ``baseline_fp32`` for this row (``seed_all``)."""
    runnable: bool = True
    note: str = ""


ITEMS: List[Item] = [
    Item("baseline", "baseline", "+exp=baseline_fp32: every memory item off, FP32", claim="—"),
    Item("rerun", "baseline again (noise floor)", "the baseline's command, run a second time", claim="—",
         note="identical configuration: its change is run-to-run variation, the noise floor of every other row"),
    Item("1", "#1 no global CUDA tensor type", "stop torch.set_default_tensor_type('torch.cuda.FloatTensor')",
         claim="~10 %", claim_low=10.0, claim_high=10.0, runnable=False,
         note="grafccsr never sets a global tensor type (every tensor's device comes from the config)"),
    Item("2", "#2 DataLoader workers + pinned", "memory.loader_workers=4 memory.pin_memory=true",
         ("memory.loader_workers=4", "memory.pin_memory=true"), claim="balances memory and speed (no number)"),
    Item("3", "#3 zero_grad(set_to_none)", "memory.set_to_none=true", ("memory.set_to_none=true",),
         claim="5–10 %", claim_low=5.0, claim_high=10.0),
    Item("4", "#4 loss objects built once", "create losses once, outside the loop",
         claim="avoids per-iteration allocation (no number)", runnable=False,
         note="grafccsr builds its loss objects once by design"),
    Item("5", "#5 non_blocking + pinned", "memory.non_blocking=true memory.pin_memory=true",
         ("memory.non_blocking=true", "memory.pin_memory=true"),
         claim="overlaps host-to-device copies with compute (no number)"),
    Item("6", "#6 eager del", "memory.eager_free=true", ("memory.eager_free=true",),
         claim="15–20 % together with #7"),
    Item("7", "#7 empty_cache + gc", "memory.empty_cache_every=N", ("memory.empty_cache_every={empty_cache_every}",),
         claim="15–20 % together with #6"),
    Item("6+7", "#6+#7 del + empty_cache", "memory.eager_free=true memory.empty_cache_every=N",
         ("memory.eager_free=true", "memory.empty_cache_every={empty_cache_every}"),
         claim="15–20 %", claim_low=15.0, claim_high=20.0),
    Item("8", "#8 no_grad fakes/sampling/eval", "memory.fakes_without_graph=true", ("memory.fakes_without_graph=true",),
         claim="no autograd graph where none is needed (no number)"),
    Item("9", "#9 CCSR under no_grad", "memory.ccsr_no_grad=true", ("memory.ccsr_no_grad=true",),
         claim="less memory in the CCSR branch (no number)",
         note="as written it stops the CCSR branch from learning (its output is a new leaf)"),
    Item("10", "#10 eval samples to CPU", "memory.eval_to_cpu=true", ("memory.eval_to_cpu=true",),
         claim="eval no longer OOMs (no number)"),
    Item("11", "#11 AMP (all)", "train.amp.policy=all train.amp.dtype=<preset dtype>",
         ("train.amp.policy=all", "train.amp.dtype={amp_dtype}"), claim="30–50 % (\"up to 50 %\")",
         claim_low=30.0, claim_high=50.0),
    Item("all", "all guide items (seed_all)", "+exp=seed_all (items 2–11 on; AMP dtype from the preset)",
         ("train.amp.dtype={amp_dtype}", "memory.empty_cache_every={empty_cache_every}"),
         claim="60–90 % (total)", claim_low=60.0, claim_high=90.0, exp="seed_all"),
    Item("accum", "grad accumulation ×2", "train.grad_accum_steps=2 (same effective batch)",
         ("train.grad_accum_steps=2",), claim="not implemented in the guide"),
    Item("ckpt", "grad checkpointing", "memory.grad_checkpoint=true", ("memory.grad_checkpoint=true",),
         claim="not implemented in the guide"),
    Item("chunk", "render chunking", "memory.render_chunk=N rays", ("memory.render_chunk={render_chunk}",),
         claim="not in the guide"),
]
ITEMS_BY_KEY = {item.key: item for item in ITEMS}


# ----------------------------------------------------------------------------- presets


@dataclass
class Preset:
    name: str
    size_exps: Sequence[str]
    """conf/exp presets merged before baseline_fp32/seed_all (model sizes)."""
    overrides: Sequence[str]
    iters: int
    amp_dtype: str
    empty_cache_every: int
    render_chunk: int
    timeout_s: int
    description: str = ""

    def values(self) -> Dict[str, Any]:
        return {"amp_dtype": self.amp_dtype, "empty_cache_every": self.empty_cache_every,
                "render_chunk": self.render_chunk}


PRESETS: Dict[str, Preset] = {
    "cpu": Preset(
        "cpu", ("smoke",),
        ("train.device=cpu", "model.ccsr.mode=regularizer", "train.log_every=5", "train.sample_every=0",
         "train.ckpt_every=0", "train.eval_every=0", "eval.at_end=true", "eval.num_samples=16",
         "eval.kid_subset_size=8", "eval.kid_subsets=4", "memory.track_peak_every=3", "train.progress=false"),
        iters=10, amp_dtype="bf16", empty_cache_every=5, render_chunk=64, timeout_s=900,
        description="+exp=smoke sizes (32 px images, 16x16 patches, 8 samples/ray, batch 2), CCSR regulariser, "
                    "10 iterations, FID/KID on 16 samples; 16 runs of 30-90 s on 2 CPU cores"),
    "gpu": Preset(
        "gpu", (),
        ("model=graf", "train.device=cuda", "train.batch_size=8", "model.ccsr.mode=regularizer",
         "train.log_every=25", "train.sample_every=0", "train.ckpt_every=0", "train.eval_every=0",
         "eval.at_end=true", "eval.num_samples=1000", "eval.kid_subset_size=100", "eval.kid_subsets=50",
         "memory.track_peak_every=50", "train.progress=false"),
        iters=300, amp_dtype="fp16", empty_cache_every=100, render_chunk=1024, timeout_s=3600,
        description="GRAF sizes (64x64 patches, 64 samples/ray), batch 8, CCSR regulariser, 300 iterations, "
                    "FID/KID on 1000 samples, fp16 AMP with GradScalers as the guide wrote it"),
}


def item_overrides(item: Item, preset: Preset) -> List[str]:
    exps = [*preset.size_exps, item.exp or "baseline_fp32"]
    exp = f"+exp={exps[0]}" if len(exps) == 1 else f"+exp=[{','.join(exps)}]"
    values = preset.values()
    return [exp, *preset.overrides, *(o.format(**values) for o in item.overrides)]


def build_command(item: Item, preset: Preset, iters: int, experiment: str, uri: str, batch: str, run_dir: Path,
                  extra: Sequence[str] = (), python: str = sys.executable) -> List[str]:
    """The training command of one ablation row. ``extra`` (the user's overrides) come last."""
    return [
        python, "-m", "grafccsr.train",
        *item_overrides(item, preset),
        f"train.max_iters={iters}",
        *extra,
        f"tracking.uri={uri}",
        f"tracking.experiment={experiment}",
        f"tracking.run_name=ablation-{item.key}",
        f"++tracking.tags.ablation_item={item.key}",
        f"++tracking.tags.ablation_batch={batch}",
        f"++tracking.tags.ablation_preset={preset.name}",
        f"hydra.run.dir={run_dir}",
    ]


# ----------------------------------------------------------------------------- running


def code_fingerprint(root: Path = PROJECT_ROOT) -> str:
    """A short hash of the training code and configs (``grafccsr/**/*.py`` and ``conf/**/*.yaml``,
    less :data:`NOT_TRAINING_CODE`).

    Every run is tagged with the fingerprint taken just before it starts, so that a batch whose
    code changed between runs (a working tree edited meanwhile) is caught by the table instead
    of turning a code change into an item's "effect"."""
    import hashlib

    digest = hashlib.sha256()
    for path in _code_files(root):
        digest.update(str(path.relative_to(root)).encode())
        try:
            digest.update(path.read_bytes())
        except OSError:
            continue
    return digest.hexdigest()[:12]


Runner = Callable[..., int]
"""``runner(cmd, log_path, timeout_s, cwd=None) -> exit code``."""

#: Files of the project that a training run does not import (changes there do not matter).
NOT_TRAINING_CODE = ("grafccsr/sweeping/", "grafccsr/sweep.py", "grafccsr/bench.py", "grafccsr/eval.py",
                     "grafccsr/memory/estimate.py", "grafccsr/memory/batch_finder.py", "__main__.py")


def _code_files(root: Path) -> List[Path]:
    files = [*root.glob("grafccsr/**/*.py"), *root.glob("conf/**/*.yaml")]
    return sorted(p for p in files if "__pycache__" not in p.parts
                  and not any(str(p.relative_to(root)).startswith(x) or str(p).endswith(x) for x in NOT_TRAINING_CODE))


def snapshot_code(dest: Path, root: Path = PROJECT_ROOT) -> Path:
    """A frozen copy of ``grafccsr/`` and ``conf/`` in ``dest`` (with ``data`` linked to the
    project's data folder, so the embedded dataset and FID statistics caches are shared).

    The training subprocesses run with ``dest`` as their working directory, so ``python -m
    grafccsr.train`` imports the copy: edits to the working tree made while a long ablation
    runs cannot leak into half of its rows."""
    import shutil

    dest = Path(dest)
    if dest.exists():
        shutil.rmtree(dest)
    dest.mkdir(parents=True)
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    shutil.copytree(root / "grafccsr", dest / "grafccsr", ignore=ignore)
    shutil.copytree(root / "conf", dest / "conf", ignore=ignore)
    (root / "data").mkdir(exist_ok=True)
    (dest / "data").symlink_to(root / "data", target_is_directory=True)
    return dest


def subprocess_runner(cmd: List[str], log_path: Path, timeout_s: int, cwd: Optional[Path] = None) -> int:
    """Run one training command (from ``cwd``, default the project root), its output to ``log_path``."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, PYTHONUNBUFFERED="1", HYDRA_FULL_ERROR="1", MPLBACKEND="Agg")
    with open(log_path, "w") as log:
        log.write(f"cd {cwd or PROJECT_ROOT}\n" + " ".join(cmd) + "\n\n")
        log.flush()
        proc = subprocess.Popen(cmd, cwd=cwd or PROJECT_ROOT, stdout=log, stderr=subprocess.STDOUT, env=env)
        try:
            return proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            proc.terminate()  # the loop checkpoints and ends its MLflow run as KILLED
            try:
                return proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                proc.kill()
                return proc.wait()
        except KeyboardInterrupt:
            proc.terminate()
            proc.wait(timeout=60)
            raise


@dataclass
class AblationPlan:
    preset: Preset
    iters: int
    experiment: str
    uri: str
    batch: str
    runs_root: Path
    items: List[Item]
    repeats: int = 1
    extra: Sequence[str] = ()
    timeout_s: Optional[int] = None
    code_dir: Optional[Path] = None
    """Working directory of the runs (a :func:`snapshot_code` copy); None = the project root."""
    commands: List[tuple] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.commands = []
        for item in self.items:
            if not item.runnable:
                continue
            for r in range(self.repeats):
                name = item.key.replace("+", "_") + (f"-r{r}" if self.repeats > 1 else "")
                run_dir = self.runs_root / self.batch / name
                self.commands.append((item, build_command(item, self.preset, self.iters, self.experiment, self.uri,
                                                          self.batch, run_dir, self.extra), run_dir))


def select_items(keys: Optional[str]) -> List[Item]:
    """All items, or the comma-separated keys (the baseline is always included)."""
    if not keys:
        return list(ITEMS)
    wanted = [k.strip() for k in keys.split(",") if k.strip()]
    unknown = [k for k in wanted if k not in ITEMS_BY_KEY]
    if unknown:
        raise SystemExit(f"unknown ablation item(s) {unknown}; choose from {[i.key for i in ITEMS]}")
    return [i for i in ITEMS if i.key == "baseline" or i.key in wanted]


def _say(text: str) -> None:
    print(text, flush=True)


def run_plan(plan: AblationPlan, runner: Runner = subprocess_runner, say: Callable[[str], None] = _say) -> List[int]:
    """Run the plan's commands one after another (never concurrently: they are timed)."""
    codes = []
    total = len(plan.commands)
    fingerprints = set()
    for n, (item, cmd, run_dir) in enumerate(plan.commands, 1):
        t0 = time.time()
        fingerprint = code_fingerprint(plan.code_dir or PROJECT_ROOT)
        if fingerprints and fingerprint not in fingerprints:
            say(f"warning: the training code changed during the ablation (fingerprint {fingerprint}); "
                "the table will not compare runs made with different code")
        fingerprints.add(fingerprint)
        say(f"[{n}/{total}] {item.label:34s} ...")
        code = runner([*cmd, f"++tracking.tags.ablation_code={fingerprint}"], run_dir.with_suffix(".log"),
                      plan.timeout_s or plan.preset.timeout_s, cwd=plan.code_dir)
        outcome = "finished" if code == 0 else f"exit code {code} (see {run_dir.with_suffix('.log')})"
        say(f"[{n}/{total}] {item.label:34s} {outcome} in {time.time() - t0:.0f} s")
        codes.append(code)
    return codes


# ----------------------------------------------------------------------------- the table


def pct_change(value: Any, base: Any) -> Optional[float]:
    """(value - base) / base in %, None when either is missing or the base is 0."""
    try:
        v, b = float(value), float(base)
    except (TypeError, ValueError):
        return None
    if math.isnan(v) or math.isnan(b) or b == 0:
        return None
    return (v - b) / b * 100.0


MEASURES = {
    "peak_live_tensors_mb": "peak live tensors",
    "peak_allocated_mb": "peak CUDA allocated",
    "peak_reserved_mb": "peak CUDA reserved",
}
_NUMERIC = ("peak_live_tensors_mb", "peak_allocated_mb", "peak_reserved_mb", "process_peak_rss_mb", "it_per_s",
            "fid", "kid_mean", "kid_std")


def select_batch(df: pd.DataFrame, batch: Optional[str] = None) -> pd.DataFrame:
    """Ablation runs of one invocation: ``batch``, else the batch of the most recent run
    (all runs when none carries a batch tag)."""
    df = df[df["tags.ablation_item"].notna()] if "tags.ablation_item" in df.columns else df.iloc[:0]
    if "tags.ablation_batch" not in df.columns or df["tags.ablation_batch"].isna().all():
        return df
    if batch is None:
        latest = df.sort_values("start_time").iloc[-1]
        batch = latest["tags.ablation_batch"]
    return df[df["tags.ablation_batch"] == batch]


def _aggregate(runs: pd.DataFrame) -> Dict[str, Any]:
    """Median of the finished runs of one item (several with --repeats); status otherwise."""
    finished = runs[runs["status"] == "FINISHED"]
    out: Dict[str, Any] = {"runs": len(runs), "finished": len(finished)}
    if len(finished):
        for col in _NUMERIC:
            out[col] = float(pd.to_numeric(finished[col], errors="coerce").median()) if col in finished else math.nan
        out["status"] = "FINISHED"
    else:
        for col in _NUMERIC:
            out[col] = math.nan
        reasons = sorted({str(r) for r in runs["failure_reason"].dropna()}) if len(runs) else []
        out["status"] = (sorted(set(runs["status"]))[0] if len(runs) else "not run") + \
            (f" ({', '.join(reasons)})" if reasons else "")
    src = finished if len(finished) else runs
    first = src.iloc[-1] if len(src) else None
    out["device"] = first["device"] if first is not None else None
    out["fid_extractor"] = first["fid_extractor"] if first is not None else None
    out["iterations"] = int(first["iterations"]) if first is not None and pd.notna(first["iterations"]) else None
    codes = sorted({str(c) for c in runs.get("tags.ablation_code", pd.Series(dtype=object)).dropna()})
    out["code"] = ",".join(codes) if codes else None
    out["run_ids"] = list(runs["run_id"])
    return out


def ablation_table(df: pd.DataFrame, batch: Optional[str] = None) -> pd.DataFrame:
    """One row per guide item (in the guide's order): the claim next to the measured values and
    their change against the baseline, ``(item - baseline) / baseline * 100``.

    Columns: ``key``, ``label``, ``change``, ``claim``, ``claim_low_pct``, ``claim_high_pct``, ``status``,
    ``runs``, ``device``, ``iterations``, ``fid_extractor``, and for each of ``peak_live_tensors_mb``,
    ``peak_allocated_mb``, ``peak_reserved_mb``, ``process_peak_rss_mb``, ``it_per_s``, ``fid``,
    ``kid_mean``: the value and ``<col>_change_pct`` (None when the run's code fingerprint tag
    ``ablation_code`` differs from the baseline's); ``quality_comparable`` says whether FID/KID
    share the baseline's extractor and iteration budget (their changes are None otherwise);
    ``note``. The frame's ``attrs`` hold ``device``, ``batch`` and ``memory_columns`` (the measures
    present)."""
    runs = select_batch(df, batch)
    by_item = {key: g for key, g in runs.groupby("tags.ablation_item")} if len(runs) else {}
    base = _aggregate(by_item["baseline"]) if "baseline" in by_item else None
    rows = []
    for item in ITEMS:
        row: Dict[str, Any] = {"key": item.key, "label": item.label, "change": item.change, "claim": item.claim,
                               "claim_low_pct": item.claim_low, "claim_high_pct": item.claim_high, "note": item.note}
        if not item.runnable:
            row.update(status="no toggle", runs=0)
            rows.append(row)
            continue
        if item.key not in by_item:
            row.update(status="not run", runs=0)
            rows.append(row)
            continue
        agg = _aggregate(by_item[item.key])
        row.update({k: agg[k] for k in ("status", "runs", "device", "iterations", "fid_extractor", "code")})
        same_code = base is None or agg["code"] == base["code"] or agg["code"] is None or base["code"] is None
        for col in _NUMERIC:
            row[col] = agg[col]
            row[f"{col}_change_pct"] = pct_change(agg[col], base[col]) if base is not None and same_code else None
        if not same_code:
            row["note"] = "; ".join(x for x in (row["note"], f"not compared: made with other code than the baseline "
                                                              f"(fingerprint {agg['code']} vs {base['code']})") if x)
        comparable = base is not None and agg["fid_extractor"] == base["fid_extractor"] \
            and agg["iterations"] == base["iterations"]
        row["quality_comparable"] = comparable
        if not comparable:
            for col in ("fid", "kid_mean", "kid_std"):
                row[f"{col}_change_pct"] = None
            if base is not None and agg["status"] == "FINISHED":
                why = "another FID extractor" if agg["fid_extractor"] != base["fid_extractor"] else \
                    f"{agg['iterations']} iterations vs the baseline's {base['iterations']}"
                row["note"] = "; ".join(x for x in (row["note"], f"FID/KID not compared: {why}") if x)
        if base is not None and agg["device"] is not None and agg["device"] != base["device"]:
            row["note"] = "; ".join(x for x in (row["note"], f"ran on {agg['device']}, baseline on {base['device']}") if x)
        rows.append(row)
    table = pd.DataFrame(rows)
    present = [c for c in MEASURES if c in table.columns and table[c].notna().any()]
    table.attrs.update(device=base["device"] if base else None, batch=_batch_of(runs),
                       memory_columns=present, fid_extractor=base["fid_extractor"] if base else None,
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


def _num(v: Any, fmt: str = "{:.2f}") -> str:
    try:
        f = float(v)
    except (TypeError, ValueError):
        return "—"
    return "—" if math.isnan(f) else fmt.format(f)


def _delta(v: Any) -> str:
    return "" if v is None or (isinstance(v, float) and math.isnan(v)) else f" ({v:+.1f} %)"


def table_markdown(table: pd.DataFrame) -> str:
    """The measured-vs-claimed table in Markdown, with a header naming device and measures."""
    device = table.attrs.get("device") or "unknown"
    cuda = is_cuda(device)
    mem_cols = [c for c in ("peak_allocated_mb", "peak_reserved_mb") if cuda and c in (table.attrs.get("memory_columns") or [])]
    mem_cols.append("peak_live_tensors_mb")
    extractor = table.attrs.get("fid_extractor") or "?"
    headers = ["#", "change", "guide's claimed saving",
               *[f"{MEASURES[c]} MiB (Δ %)" for c in mem_cols], "it/s (Δ %)",
               f"FID [{extractor}] (Δ %)", "KID (Δ %)", "status"]
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    for _, r in table.iterrows():
        if r["status"] in ("no toggle", "not run"):
            cells = [r["label"], r["change"], r["claim"], *["—"] * len(mem_cols), "—", "—", "—",
                     r["status"] + (f": {r['note']}" if r["status"] == "no toggle" and r["note"] else "")]
        else:
            cells = [r["label"], r["change"], r["claim"],
                     *[_num(r.get(c)) + _delta(r.get(f"{c}_change_pct")) for c in mem_cols],
                     _num(r.get("it_per_s"), "{:.3g}") + _delta(r.get("it_per_s_change_pct")),
                     _num(r.get("fid"), "{:.3g}") + _delta(r.get("fid_change_pct")),
                     _num(r.get("kid_mean"), "{:.3g}") + _delta(r.get("kid_mean_change_pct")),
                     str(r["status"]) + (f" ×{int(r['runs'])}" if r.get("runs", 1) and r.get("runs", 1) > 1 else "")
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
    return (f"Device: **{device}**. Memory: {measure}. Δ % = (item − baseline) / baseline × 100: "
            f"negative means less memory (a claimed saving of 10 % is a Δ of −10 %) or, for it/s, slower "
            f"training; it/s is the mean of the run's logged windows (iterations measured by the live-tensor "
            f"tracker excluded). FID/KID: extractor `{table.attrs.get('fid_extractor') or '?'}`, compared only between "
            f"runs with the same extractor and iteration budget "
            f"({table.attrs.get('baseline_iterations') or '?'} iterations).")


def _val(v: Any) -> Optional[float]:
    try:
        f = float(v)
    except (TypeError, ValueError):
        return None
    return None if math.isnan(f) else f


def _pct(v: float) -> str:
    return f"{v:+.1f} %".replace("-0.0 %", "+0.0 %") if abs(v) < 0.05 else f"{v:+.1f} %"


def findings(table: pd.DataFrame) -> List[str]:
    """One sentence per item, stating only what was measured next to what the guide claimed.

    When the baseline was run twice (row ``rerun``), a change no larger than the rerun's is called
    "within the run-to-run variation" (measured noise floor)."""
    col = headline_measure(table)
    name = MEASURES[col]
    cuda = is_cuda(table.attrs.get("device"))
    out = []
    base = table[table["key"] == "baseline"]
    if base.empty or base.iloc[0]["status"] != "FINISHED":
        status = base.iloc[0]["status"] if len(base) else "not run"
        return [f"The baseline did not finish ({status}); no change can be computed."]
    b = base.iloc[0]
    out.append(f"Baseline ({b['change']}): {name} {_num(b.get(col))} MiB, {_num(b.get('it_per_s'), '{:.3g}')} it/s, "
               f"FID {_num(b.get('fid'), '{:.3g}')}, KID {_num(b.get('kid_mean'), '{:.3g}')} after "
               f"{_num(b.get('iterations'), '{:.0f}')} iterations on {b.get('device')}.")
    noise: Dict[str, float] = {}
    rerun = table[(table["key"] == "rerun") & (table["status"] == "FINISHED")]
    if len(rerun):
        for c in (col, "peak_reserved_mb", "it_per_s"):
            v = _val(rerun.iloc[0].get(f"{c}_change_pct"))
            if v is not None:
                noise[c] = abs(v)

    def noted(c: str, v: float, key: str) -> str:
        if key != "rerun" and noise.get(c, 0.0) >= 0.05 and abs(v) <= noise[c] + 1e-9:
            return f" (within the ±{noise[c]:.1f} % run-to-run variation)"
        return ""

    for _, r in table.iterrows():
        key = r["key"]
        if key == "baseline" or r["status"] == "not run":
            continue
        if r["status"] == "no toggle":
            out.append(f"{r['label']}: not measured, no toggle — {r['note']} (the guide claimed {r['claim']}).")
            continue
        if r["status"] != "FINISHED":
            out.append(f"{r['label']}: the run did not finish ({r['status']}); nothing measured.")
            continue
        change = _val(r.get(f"{col}_change_pct"))
        if change is None:
            text = f"{r['label']}: change in {name} not computed"
        else:
            text = (f"{r['label']} ({r['change']}) changed {name} by {_pct(change)} "
                    f"({_num(b.get(col))} → {_num(r.get(col))} MiB){noted(col, change, key)}")
        lo, hi = _val(r["claim_low_pct"]), _val(r["claim_high_pct"])
        if lo is not None and hi is not None:
            if change is not None:
                saving = -change
                where = "within" if lo - 1e-9 <= saving <= hi + 1e-9 else "below" if saving < lo else "above"
                text += (f"; the guide claimed a saving of {r['claim']}: the measured saving, "
                         f"{saving:.1f} %".replace("-0.0 %", "0.0 %") + f", is {where} that")
            else:
                text += f"; the guide claimed {r['claim']}"
        elif key != "rerun":
            text += f" (guide: {r['claim']})"
        if cuda:
            d = _val(r.get("peak_reserved_mb_change_pct"))
            if d is not None:
                text += f"; peak CUDA reserved {_pct(d)}{noted('peak_reserved_mb', d, key)}"
        d = _val(r.get("it_per_s_change_pct"))
        if d is not None:
            text += f"; iterations/s {_pct(d)}{noted('it_per_s', d, key)}"
        d = _val(r.get("fid_change_pct"))
        if d is not None:
            text += f"; FID {_num(b.get('fid'), '{:.3g}')} → {_num(r.get('fid'), '{:.3g}')} ({_pct(d)})"
        if r.get("note"):
            text += f". Note: {r['note']}"
        out.append(text + ".")
    if not cuda:
        out.append("On a CPU, items 2, 5, 7 and 10 act on CUDA only (pinned host memory, asynchronous copies, "
                   "the caching allocator, moving samples off the GPU) and the memory column is the training "
                   "step's peak, so their change in live tensor memory says nothing about a GPU.")
    return out


# ----------------------------------------------------------------------------- CLI


def default_experiment(preset: str) -> str:
    return f"ablation-{preset}"


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m analysis.ablation",
        description="Measure the memory guide's items one by one against a baseline (see analysis/ablation.py). "
                    "Extra arguments are Hydra overrides applied to every run.")
    p.add_argument("--preset", choices=sorted(PRESETS), default="cpu",
                   help="cpu (default): smoke-sized, 16 runs, ~10-15 min on 2 cores; gpu: GRAF sizes, batch 8, "
                        "300 iterations, fp16 AMP (needs CUDA)")
    p.add_argument("--iters", type=int, default=None, help="training iterations per run (preset default)")
    p.add_argument("--experiment", default=None, help="MLflow experiment (default ablation-<preset>)")
    p.add_argument("--tracking-uri", default=None, help="MLflow store (default sqlite:///<project>/mlflow.db)")
    p.add_argument("--items", default=None,
                   help=f"comma-separated subset of {','.join(i.key for i in ITEMS if i.runnable)} "
                        "(the baseline always runs)")
    p.add_argument("--repeats", type=int, default=1, help="runs per item (the table takes medians)")
    p.add_argument("--timeout", type=int, default=None, help="seconds per run (preset default)")
    p.add_argument("--runs-root", default=None, help="run folders (default <project>/runs/ablation/<experiment>)")
    p.add_argument("--out", default="reports", help="report folder root (reports/<experiment>/)")
    p.add_argument("--no-report", action="store_true", help="only run; do not write the report")
    p.add_argument("--report-only", action="store_true", help="skip the runs; report the latest batch (or --batch)")
    p.add_argument("--batch", default=None, help="with --report-only: the ablation_batch tag to report")
    p.add_argument("--dry-run", action="store_true", help="print the commands and exit")
    p.add_argument("--no-snapshot", action="store_true",
                   help="run the working tree's code instead of a copy taken at the start (edits made while "
                        "the ablation runs then reach later rows; the table refuses to compare those)")
    p.add_argument("overrides", nargs="*", help="Hydra overrides for every run, e.g. train.batch_size=4")
    return p.parse_intermixed_args(argv)


def main(argv: Optional[Sequence[str]] = None, runner: Runner = subprocess_runner) -> int:
    args = parse_args(argv)
    preset = PRESETS[args.preset]
    experiment = args.experiment or default_experiment(args.preset)
    uri = resolve_tracking_uri(args.tracking_uri)
    batch = time.strftime("%Y%m%d-%H%M%S")
    runs_root = Path(args.runs_root) if args.runs_root else PROJECT_ROOT / "runs" / "ablation" / experiment
    plan = AblationPlan(preset, args.iters or preset.iters, experiment, uri, batch, runs_root,
                        select_items(args.items), max(1, args.repeats), list(args.overrides), args.timeout)
    if args.dry_run:
        for item, cmd, _ in plan.commands:
            print(f"# {item.label}\n" + " ".join(_shell_quote(c) for c in cmd))
        return 0
    if not args.report_only:
        if not args.no_snapshot:
            plan.code_dir = snapshot_code(runs_root / batch / "code")
        print(f"ablation '{experiment}' batch {batch}: {len(plan.commands)} runs, preset {preset.name} "
              f"({preset.description}), {plan.iters} iterations each; MLflow {uri}; code "
              f"{plan.code_dir or PROJECT_ROOT} (fingerprint {code_fingerprint(plan.code_dir or PROJECT_ROOT)})",
              flush=True)
        t0 = time.time()
        previous = signal.signal(signal.SIGTERM, _interrupt)  # stop the current run cleanly, as Ctrl-C does
        try:
            run_plan(plan, runner)
        finally:
            signal.signal(signal.SIGTERM, previous)
        print(f"all runs done in {(time.time() - t0) / 60:.1f} min", flush=True)
    if args.no_report:
        return 0
    from analysis.report import write_report

    write_report(experiment, uri=uri, out=Path(args.out), kind="ablation",
                 batch=args.batch if args.report_only else batch)
    return 0


def _interrupt(signum, _frame) -> None:
    raise KeyboardInterrupt(signal.Signals(signum).name)


def _shell_quote(text: str) -> str:
    import shlex

    return shlex.quote(text)


def load_ablation(experiment: str, uri: Optional[str] = None, throughput: str = "mean") -> pd.DataFrame:
    """The experiment's runs that carry an ``ablation_item`` tag.

    ``throughput="mean"`` replaces ``it_per_s`` (the last logged window) by the mean over all of the
    run's logged ``perf/it_per_s`` windows (the last one kept as ``it_per_s_last``): short runs log
    few windows and the last one alone is a handful of iterations."""
    df = load_runs(uri, experiments=[experiment])
    if "tags.ablation_item" not in df.columns:
        return df.iloc[:0]
    df = df[df["tags.ablation_item"].notna()].reset_index(drop=True)
    df["it_per_s_last"] = df["it_per_s"]
    if throughput == "mean" and len(df) and df["it_per_s"].notna().any():
        hist = metric_histories(df.loc[df["it_per_s"].notna(), "run_id"], ["perf/it_per_s"], uri)
        if len(hist):
            means = hist.groupby("run_id")["value"].mean()
            df["it_per_s"] = df["run_id"].map(means).astype("float64").where(df["run_id"].isin(means.index),
                                                                              df["it_per_s"])
    return df


if __name__ == "__main__":
    sys.exit(main())
