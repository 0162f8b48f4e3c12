"""Command line: build or inspect the dataset a config names.

    python -m grafccsr.data prepare [overrides...]   build (synthetic) or validate (folder), then describe
    python -m grafccsr.data info    [overrides...]   describe an existing dataset, build nothing

Overrides are Hydra's, e.g. ``data.image_size=128``, ``+exp=smoke``, ``data=folder data.root=/x``.
"""

from __future__ import annotations

import math
import sys
import time
from collections import Counter
from typing import List, Optional

from grafccsr.cli.common import add_overrides, guarded, parse, parser
from grafccsr.config import CameraConfig, DataConfig, load_config
from grafccsr.data.errors import DatasetError
from grafccsr.data.folder import MultiViewFolder
from grafccsr.data.synthetic import build_synthetic, fingerprint, is_complete, synthetic_root


def _azimuth_summary(azimuths: List[int]) -> str:
    distinct = sorted(set(azimuths))
    if len(distinct) == 1:
        return f"1 azimuth ({distinct[0]} deg)"
    gaps = {b - a for a, b in zip(distinct, distinct[1:] + [distinct[0] + 360])}
    step = f"step {gaps.pop()} deg" if len(gaps) == 1 else "irregular steps"
    return f"{len(distinct)} distinct, {step}"


def describe(dataset: MultiViewFolder, cfg: DataConfig, camera: CameraConfig, status: str) -> str:
    """Human-readable summary: folder, classes, size, elevations, azimuths, provenance."""
    labels = dataset.labels
    per_class = Counter(labels[:, 0].tolist())
    per_elev = Counter(labels[:, 1].tolist())
    size = dataset.image_size
    lines = [
        f"folder       {dataset.root}",
        f"kind         {cfg.kind}" + (f" (fingerprint {fingerprint(cfg, camera)})" if cfg.kind == "synthetic" else ""),
        f"status       {status}",
        f"images       {len(dataset)} of {size}x{size} RGB ({dataset.images.numel() / 2**20:.1f} MiB in memory)",
        f"classes      {dataset.num_classes}",
    ]
    lines += [f"  {i}  {name:<24} {per_class[i]:>5} images" for i, name in enumerate(dataset.class_names)]
    lines.append("elevations   prefix        v   polar  elevation  images")
    for i, (prefix, v) in enumerate(zip(cfg.elevation_prefixes, cfg.elevation_v)):
        polar = math.degrees(math.acos(1.0 - 2.0 * v))
        lines.append(f"  {i}  {prefix:<8} {v:>6.3f} {polar:>6.1f} deg {90.0 - polar:>6.1f} deg {per_elev[i]:>6}")
    lines.append(f"azimuths     {_azimuth_summary(labels[:, 2].tolist())}")
    return "\n".join(lines)


def prepare(cfg: DataConfig, camera: CameraConfig) -> str:
    if cfg.kind != "synthetic":
        start = time.perf_counter()
        dataset = MultiViewFolder(cfg.root, cfg)
        return describe(dataset, cfg, camera, f"validated and loaded in {time.perf_counter() - start:.1f} s")
    cached = is_complete(synthetic_root(cfg, camera), cfg, camera)
    start = time.perf_counter()
    root = build_synthetic(cfg, camera)
    status = "reused (already built)" if cached else f"rendered in {time.perf_counter() - start:.1f} s"
    return describe(MultiViewFolder(root, cfg), cfg, camera, status)


def info(cfg: DataConfig, camera: CameraConfig) -> str:
    if cfg.kind != "synthetic":
        return describe(MultiViewFolder(cfg.root, cfg), cfg, camera, "validated")
    root = synthetic_root(cfg, camera)
    if not is_complete(root, cfg, camera):
        raise DatasetError(
            f"the synthetic set for these settings ({root}) is not built yet; "
            "run `python -m grafccsr.data prepare` with the same overrides"
        )
    return describe(MultiViewFolder(root, cfg), cfg, camera, "built")


@guarded("grafccsr.data")
def main(argv: Optional[List[str]] = None) -> int:
    p = parser("python -m grafccsr.data", __doc__.split("\n\n", 1)[0],
               "examples:\n  python -m grafccsr.data prepare\n  python -m grafccsr.data prepare +exp=smoke\n"
               "  python -m grafccsr.data info data=folder data.root=/path/to/specimens")
    p.add_argument("command", choices=("prepare", "info"), help="prepare: build/validate; info: describe only")
    add_overrides(p)
    args = parse(p, sys.argv[1:] if argv is None else argv)
    cfg = load_config(args.overrides)
    print(prepare(cfg.data, cfg.camera) if args.command == "prepare" else info(cfg.data, cfg.camera))
    return 0


if __name__ == "__main__":
    sys.exit(main())
