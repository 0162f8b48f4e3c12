"""``python -m grafccsr.models [overrides]``: parameter counts of the models a config builds."""

from __future__ import annotations

import sys

from grafccsr.cli.common import add_overrides, guarded, parse, parser
from grafccsr.config import ConfigError, load_config
from grafccsr.models import build_models, discriminator_input_size, parameter_summary

_LABELS = {
    "field": "radiance field",
    "class_embedding": "class embedding",
    "ccsr.codes": "CCSR codes",
    "ccsr.sr_net": "CCSR SR net",
}


def summary_rows(overrides: list[str], num_classes: int | None) -> list[tuple[str, int]]:
    """(label, parameter count) rows for the composed config, totals included."""
    cfg = load_config(overrides)
    if num_classes is None:
        if cfg.data.kind != "synthetic":
            raise ConfigError("--num-classes is required when data.kind is not synthetic")
        num_classes = cfg.data.synthetic.num_classes
    generator, discriminator = build_models(cfg, num_classes)
    rows: list[tuple[str, int]] = []
    for name, count in parameter_summary(generator):
        if name == "ccsr":
            rows += [(f"ccsr.{sub}", n) for sub, n in parameter_summary(generator.ccsr)]
        else:
            rows.append((name, count))
    rows = [(_LABELS.get(name, name), count) for name, count in rows]
    rows.append(("generator total", sum(p.numel() for p in generator.parameters())))
    size = discriminator_input_size(cfg)
    rows.append((f"discriminator ({size}x{size})", sum(p.numel() for p in discriminator.parameters())))
    return rows


@guarded("grafccsr.models")
def main(argv: list[str] | None = None) -> int:
    p = parser("python -m grafccsr.models", "Parameter counts of the generator and discriminator.")
    p.add_argument("--summary", action="store_true", help="print the parameter table per sub-module (the default)")
    p.add_argument("--num-classes", type=int, default=None, help="classes of the data (default: synthetic set's)")
    add_overrides(p)
    args = parse(p, sys.argv[1:] if argv is None else argv)
    rows = summary_rows(args.overrides, args.num_classes)
    width = max(len(label) for label, _ in rows)
    print(f"{'module':<{width}}  {'parameters':>12}")
    for label, count in rows:
        print(f"{label:<{width}}  {count:>12,}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
