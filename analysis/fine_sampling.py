"""Where does the coarse network put the fine network's samples? ``python -m analysis.fine_sampling``.

graf_ccsr's newest upstream renders with a separate fine network whose 64 + 64 samples are
placed by a coarse network that never trains (``+exp=graf_ccsr_fine``); ours trains the coarse
pass towards the fine render (``model.render.coarse_loss=match_fine``). What that changes is how
well the importance samples find the matter of the *fine* field, so this measures it directly
on trained snapshots: for each snapshot, the same latent codes and poses (the data's
elevations, random azimuths), whole images rendered three ways through the same weights:

* ``hierarchical``: the generator's render as it trains and evaluates (S stratified samples
  through the coarse network, S more drawn from its weights, all 2S through the fine network);
* ``uniform``: the fine network alone at 2S stratified samples on [near, far] (no importance
  sampling: the same number of fine evaluations);
* ``reference``: the fine network alone at ``--reference-samples`` stratified samples (the
  converged integral).

It prints and writes (``--out``, JSON) the mean absolute difference of the hierarchical and
the uniform render from the reference, in colour ([-1, 1] units) and opacity: importance
sampling earns its cost when ``hierarchical`` is closer to the reference than ``uniform``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import sys
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import torch

from grafccsr.camera import full_grid, pose_matrix, rays_from_grid
from grafccsr.evaluation import load_eval_model
from grafccsr.models.render import RenderSettings, render_rays
from grafccsr.paths import program_name


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog=program_name("python -m analysis.fine_sampling"),
                                description=__doc__.split("\n\n")[0])
    p.add_argument("snapshots", nargs="+", type=Path,
                   help="checkpoints of runs with model.render.fine_network (LABEL=PATH names a group)")
    p.add_argument("--images", type=int, default=8, help="latent codes (and poses) per snapshot (default 8)")
    p.add_argument("--size", type=int, default=32, help="image side in pixels (default 32)")
    p.add_argument("--reference-samples", type=int, default=256, help="samples of the reference render")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=None, help="write the results as JSON here")
    return p.parse_args(argv)


@torch.no_grad()
def measure(path: Path, images: int, size: int, reference_samples: int, seed: int) -> Dict[str, float]:
    model = load_eval_model(path, ["train.device=cpu", "tracking.backend=none"])
    gen, cfg = model.generator, model.cfg
    if gen.fine is None:
        raise SystemExit(f"fine_sampling: error: {path} has no fine network (model.render.fine_network=false)")
    settings = RenderSettings.from_config(cfg)
    rng = torch.Generator().manual_seed(seed)
    z = gen.sample_z(images, "cpu", generator=rng)
    classes = torch.arange(images) % model.num_classes
    u = torch.rand(images, generator=rng)
    levels = torch.tensor(cfg.data.elevation_v)
    v = levels[torch.randint(len(levels), (images,), generator=rng)]
    grid = full_grid(size, images)
    hierarchical = gen.render(z, classes, u, v, grid, settings)
    origins, directions = rays_from_grid(pose_matrix(u, v, settings.radius), grid, settings.fov_deg,
                                         settings.ray_shift)
    zs, za = gen.fine.condition(z, classes)
    plain = dataclasses.replace(settings, importance_samples=0)

    def fine_alone(samples: int) -> Dict[str, torch.Tensor]:
        out = render_rays(gen.fine.field, origins, directions, zs, za,
                          dataclasses.replace(plain, samples_per_ray=samples))
        return {"rgb": out["rgb"], "acc": out["acc"]}

    reference = fine_alone(reference_samples)
    uniform = fine_alone(settings.samples_per_ray + settings.importance_samples)
    hier = {"rgb": hierarchical["rgb"].flatten(2).transpose(1, 2), "acc": hierarchical["acc"].flatten(1)}
    result = {"iteration": model.iteration, "reference_opacity": float(reference["acc"].mean())}
    for name, out in (("hierarchical", hier), ("uniform", uniform)):
        result[f"{name}_rgb_error"] = float((out["rgb"] - reference["rgb"]).abs().mean())
        result[f"{name}_acc_error"] = float((out["acc"] - reference["acc"]).abs().mean())
    return result


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parse_args(argv)
    groups: Dict[str, List[Dict[str, float]]] = {}
    for spec in args.snapshots:
        label, _, path = str(spec).rpartition("=")
        path = Path(path)
        result = measure(path, args.images, args.size, args.reference_samples, args.seed)
        groups.setdefault(label or str(path), []).append({"path": str(path), **result})
        print(f"{label or path}: {path} " + " ".join(f"{k}={v:.4g}" for k, v in result.items()), flush=True)
    summary = {}
    print(f"\n| snapshots | n | hierarchical rgb error | uniform rgb error | hierarchical opacity error | "
          f"uniform opacity error |\n|---|---|---|---|---|---|")
    for label, rows in groups.items():
        means = {k: statistics.fmean(r[k] for r in rows) for k in rows[0] if k != "path"}
        summary[label] = {"n": len(rows), **means, "rows": rows}
        print(f"| {label} | {len(rows)} | {means['hierarchical_rgb_error']:.4f} | {means['uniform_rgb_error']:.4f} | "
              f"{means['hierarchical_acc_error']:.4f} | {means['uniform_acc_error']:.4f} |")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        settings = {**{k: str(v) for k, v in vars(args).items()}, "command": "python -m analysis.fine_sampling "
                    + " ".join(argv if argv is not None else sys.argv[1:])}
        args.out.write_text(json.dumps({"settings": settings, "summary": summary}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
