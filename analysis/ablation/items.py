"""What the ablation measures: the memory guide's items (with the guide's claims), the presets
that size the runs, and the training command of each row."""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

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
    Item("8", "#8 no_grad fakes/sampling/eval", "no_grad around the D step's fakes, samples and eval",
         claim="no autograd graph where none is needed (no number)", runnable=False,
         note="graf_ccsr already rendered the D step's fakes under no_grad (the baseline keeps that), and "
              "grafccsr renders samples and evaluation without a graph by design"),
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


def select_items(keys: Optional[str]) -> List[Item]:
    """All items, or the comma-separated keys (the baseline is always included)."""
    if not keys:
        return list(ITEMS)
    wanted = [k.strip() for k in keys.split(",") if k.strip()]
    unknown = [k for k in wanted if k not in ITEMS_BY_KEY]
    if unknown:
        raise SystemExit(f"unknown ablation item(s) {unknown}; choose from {[i.key for i in ITEMS]}")
    return [i for i in ITEMS if i.key == "baseline" or i.key in wanted]


def default_experiment(preset: str) -> str:
    return f"ablation-{preset}"
