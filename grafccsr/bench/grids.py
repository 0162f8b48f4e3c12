"""The benchmark's grids: rows of Hydra overrides, the first row the reference."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import List

import yaml

from grafccsr.config import ConfigError

ORIGINAL = "+exp=graf_ccsr_original"
FUSED = ["model.field.execution=fused"]
OURS = ["memory=default", *FUSED]
"""Our defaults that do not change the maths: fakes for the D step rendered without a graph (D
sees them detached anyway), zero_grad(set_to_none=True), eager ``del``, and the fused radiance
field (the same function with fewer FLOPs than the original's per-point concatenation)."""
LEAN = ["memory=lean", *FUSED]
"""Our defaults plus gradient checkpointing in 4096-point segments."""
BF16 = ["train.amp.policy=generator", "train.amp.dtype=bf16"]
BOUND = ["model.render.bound_radius=0.37"]
"""Rays clipped to the ball holding every embedded object: the samples go where the object is."""
GRID = ["model.occupancy.enabled=true"]
"""The generator's occupancy grid (64^3 cells per class). The benchmark does not train, so every
cell stays on (the warm-up state): these rows measure the grid's overhead (marching each ray
through it, gathering the D step's rays) at its samples, not its savings, which depend on the
trained field (the quality benchmark's ``fast`` recipe); the FLOP count adds its updates."""
TERM = ["model.render.termination_transmittance=0.001"]
"""Early ray termination in renders without autograd (the D step's fakes): within 1e-3 of the
full render. An untrained field is semi-transparent and rarely terminates: its savings show with
a trained, opaque scene (and, with BOUND, on rays that miss the ball, skipped from the start)."""


@dataclass
class Row:
    name: str
    label: str
    overrides: List[str] = field(default_factory=list)
    replace_base: bool = False
    """True: the row ignores the grid's base overrides (e.g. our default config,
    which is NOT the same maths as the reference)."""
    warmup_extra: int = 0
    """Extra warm-up iterations (torch.compile compiles in the first ones)."""
    changes_maths: bool = False
    """The row computes another function than the reference (fewer samples, clipped rays, other
    models); marked ``*`` in the table."""


@dataclass
class Grid:
    name: str
    base: List[str]
    """Overrides every row starts from (the reference row is exactly these)."""
    reduced: str
    """What differs from the original preset at its real sizes, for the table header."""
    rows: List[Row]


def _grid_default() -> Grid:
    # 2 x 1024 x 32 = 65536 points per render: each activation of the field is 64 MB,
    # over glibc's 32 MiB mmap ceiling, as at the original's real sizes
    base = [ORIGINAL, "train.batch_size=2", "model.patch.rays_per_patch=1024", "model.render.samples_per_ray=32"]
    return Grid(
        name="default",
        base=base,
        reduced=(
            "CPU-sized, the same for the reference and every ours_* row: +exp=graf_ccsr_original (GRAF model 8x256, "
            "whole-image patches, CCSR regulariser, BN D, R1 80) with batch 8->2, rays/patch 4096 (64^2)->1024 (32^2), "
            "samples/ray 64->32 (rows marked * change the maths on purpose; default_cfg is our default config)"
        ),
        rows=[
            Row("original", "original preset (reference)"),
            Row("ours", "ours, equal maths (fused field, graph-free fakes, set_to_none, eager del)", OURS),
            Row("ours_lean", "ours + checkpointing in 4096-point segments (memory=lean)", LEAN),
            Row("ours_chunk", "ours + render chunking (256 rays)", OURS + ["memory.render_chunk=256"]),
            Row("ours_accum2", "ours + grad accumulation 2", OURS + ["train.grad_accum_steps=2"]),
            Row("ours_skip", "ours + a G-step graph only where the density is positive (memory.skip_empty_samples; "
                "untrained weights: what it skips depends on them)", OURS + ["memory.skip_empty_samples=true"]),
            Row("ours_s16", "ours + fewer samples 32->16", OURS + ["model.render.samples_per_ray=16"],
                changes_maths=True),
            Row("ours_term", "ours + early ray termination at transmittance 1e-3 (D-step fakes; within 1e-3)",
                OURS + TERM),
            Row("ours_bound_s16", "ours + rays clipped to the 0.37 ball, 16 samples there (denser than 32 on [near, far])",
                OURS + BOUND + ["model.render.samples_per_ray=16"], changes_maths=True),
            Row("ours_bound_term_s16", "ours_bound_s16 + early termination 1e-3 (misses skipped in the D step)",
                OURS + BOUND + TERM + ["model.render.samples_per_ray=16"], changes_maths=True),
            Row("ours_grid_s16", "ours + occupancy grid, every cell on (untrained: its overhead), 16 samples in it",
                OURS + GRID + ["model.render.samples_per_ray=16"], changes_maths=True),
            Row("ours_is8_8", "ours + coarse-to-fine 8 + 8 importance samples instead of 32",
                OURS + ["model.render.samples_per_ray=8", "model.render.importance_samples=8"], changes_maths=True),
            Row("default_cfg", "default train config (model=small)", ["tracking=none"],
                replace_base=True, changes_maths=True),
        ],
    )


def _grid_gpu() -> Grid:
    ckpt, chunk = ["memory.grad_checkpoint=true"], ["memory.render_chunk=1024"]
    return Grid(
        name="gpu",
        base=[ORIGINAL],
        reduced="nothing: +exp=graf_ccsr_original at its real sizes (batch 8, 64^2 patches, 64 samples/ray, GRAF model)",
        rows=[
            Row("original", "original preset (reference)"),
            Row("ours", "ours, equal maths (graph-free fakes, set_to_none, eager del)", OURS),
            Row("ours_bf16", "ours + bf16 generator autocast", OURS + BF16),
            Row("ours_bf16_ckpt", "ours + bf16 + grad checkpointing", OURS + BF16 + ckpt),
            Row("ours_bf16_chunk", "ours + bf16 + render chunking (1024 rays)", OURS + BF16 + chunk),
            Row("ours_bf16_compile", "ours + bf16 + torch.compile(field)", OURS + BF16 + ["train.compile=true"],
                warmup_extra=3),
            Row("ours_bf16_accum2", "ours + bf16 + grad accumulation 2", OURS + BF16 + ["train.grad_accum_steps=2"]),
            Row("ours_bf16_skip", "ours + bf16 + a G-step graph only where the density is positive "
                "(memory.skip_empty_samples; untrained weights)", OURS + BF16 + ["memory.skip_empty_samples=true"]),
            Row("ours_bf16_s32", "ours + bf16 + fewer samples 64->32",
                OURS + BF16 + ["model.render.samples_per_ray=32"], changes_maths=True),
            Row("ours_bf16_term", "ours + bf16 + early ray termination 1e-3 (D-step fakes; within 1e-3)",
                OURS + BF16 + TERM),
            Row("ours_bf16_bound", "ours + bf16 + rays clipped to the 0.37 ball (64 samples there)",
                OURS + BF16 + BOUND, changes_maths=True),
            Row("ours_bf16_bound_s16", "ours + bf16 + rays clipped to the ball, 16 samples there",
                OURS + BF16 + BOUND + ["model.render.samples_per_ray=16"], changes_maths=True),
            Row("ours_bf16_bound_term_s16", "ours_bf16_bound_s16 + early termination 1e-3",
                OURS + BF16 + BOUND + TERM + ["model.render.samples_per_ray=16"], changes_maths=True),
            Row("ours_bf16_grid_s16", "ours + bf16 + occupancy grid, every cell on (untrained: its overhead), "
                "16 samples in it", OURS + BF16 + GRID + ["model.render.samples_per_ray=16"], changes_maths=True),
            Row("ours_bf16_is16_16", "ours + bf16 + coarse-to-fine 16 + 16 importance samples instead of 64",
                OURS + BF16 + ["model.render.samples_per_ray=16", "model.render.importance_samples=16"],
                changes_maths=True),
            Row("ours_bf16_ckpt_b16", "ours + bf16 + ckpt, batch 16", OURS + BF16 + ckpt + ["train.batch_size=16"]),
            Row("ours_bf16_ckpt_b32", "ours + bf16 + ckpt, batch 32", OURS + BF16 + ckpt + ["train.batch_size=32"]),
            Row("ours_bf16_ckpt_b64", "ours + bf16 + ckpt, batch 64", OURS + BF16 + ckpt + ["train.batch_size=64"]),
        ],
    )


_TINY = [
    "data.image_size=32", "data.synthetic.num_azimuths=8", "model.z_dim=16", "model.field.xyz_frequencies=4",
    "model.field.dir_frequencies=2", "model.field.depth=2", "model.field.width=32", "model.field.skips=[]",
    "model.field.view_width=16", "model.field.z_shape_dim=8", "model.field.z_appearance_dim=8",
    "model.discriminator.base_channels=8", "model.discriminator.max_channels=32", "model.ccsr.hidden_channels=8",
    "model.ccsr.num_layers=1", "model.ccsr.code_resolution=16",
    "model.patch.rays_per_patch=256", "model.render.samples_per_ray=8", "train.batch_size=2",
]


def _grid_smoke() -> Grid:
    return Grid(
        name="smoke",
        base=[ORIGINAL, *_TINY],
        reduced="tiny (seconds; for tests): smoke-sized field, D and CCSR, batch 2, 16^2 patches, 8 samples/ray",
        rows=[
            Row("original", "original preset (reference)"),
            Row("ours", "ours, equal maths", OURS),
            Row("ours_ckpt", "ours + grad checkpointing (1024-point segments)",
                OURS + ["memory.grad_checkpoint=true", "memory.checkpoint_segment_points=1024"]),
            Row("ours_bound_term", "ours + rays clipped to the 0.37 ball + early termination 1e-3",
                OURS + BOUND + TERM, changes_maths=True),
        ],
    )


def _grid_cpu_amp() -> Grid:
    base = [ORIGINAL, "train.batch_size=2", "model.patch.rays_per_patch=256", "model.render.samples_per_ray=8"]
    return Grid(
        name="cpu-amp",
        base=base,
        reduced="CPU bf16 check, tiny: +exp=graf_ccsr_original with batch 2, 16^2 patches, 8 samples/ray",
        rows=[
            Row("original", "original preset (reference)"),
            Row("ours", "ours, equal maths", OURS),
            Row("ours_bf16", "ours + bf16 generator autocast (slow on CPUs without bf16 units)", OURS + BF16),
        ],
    )


GRIDS = {"default": _grid_default, "gpu": _grid_gpu, "smoke": _grid_smoke, "cpu-amp": _grid_cpu_amp}


def load_grid(name: str) -> Grid:
    """A built-in grid by name, or a YAML/JSON file with ``base``, ``reduced`` and
    ``rows`` (each ``name``, ``label``, ``overrides``, optional ``replace_base``,
    ``warmup_extra``, ``changes_maths``)."""
    if name in GRIDS:
        return GRIDS[name]()
    path = Path(name)
    if not path.is_file():
        raise ConfigError(f"--grid {name!r}: not a built-in grid ({', '.join(GRIDS)}) nor a file")
    spec = yaml.safe_load(path.read_text())
    rows = [Row(**r) for r in spec["rows"]]
    return Grid(name=spec.get("name", path.stem), base=list(spec.get("base", [])),
                reduced=spec.get("reduced", ""), rows=rows)
