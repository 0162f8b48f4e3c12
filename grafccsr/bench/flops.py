"""Arithmetic per training iteration: torch's FLOP counter over one D + G iteration.

:class:`torch.utils.flop_counter.FlopCounterMode` counts matrix multiplications and
convolutions only (mm, addmm, bmm, baddbmm, convolutions and their backward passes);
elementwise work, interpolation, positional encoding, compositing and optimiser updates
count 0. Two details matter here:

* its module tracker hooks every module's inputs, and ``autograd.grad`` with respect to a
  leaf input (R1's real patches) then fails (pytorch #131753). Totals need no per-module
  attribution, so the tracker is replaced by one that files every count under "Global";
* in-place ``addmm_`` (the fused radiance field accumulates its split matmuls with it) is
  not in torch's table; it is counted here like ``addmm``.

``python -m grafccsr.bench.flops [overrides]`` counts one iteration of a config under
FakeTensorMode: shapes only, seconds at any size (early ray termination and the rays the
occupancy grid skips then count as the full render: their savings depend on values; the
benchmark counts a real iteration; the grid's own updates are counted as they run at the
iteration counted, see :func:`grid_update_flops`).
"""

from __future__ import annotations

import argparse
import sys
from typing import Callable, List, Optional

import torch
from torch.utils import flop_counter

from grafccsr.config import ConfigError, load_config
from grafccsr.sizing.synthetic import default_num_classes, fake_run
from grafccsr.training.compile import eager_fields



def _addmm_inplace_flop(self_shape, a_shape, b_shape, *args, out_shape=None, **kwargs) -> int:
    """``self.addmm_(a, b)``: 2 m k n, as torch counts ``addmm``."""
    (m, k), (_, n) = a_shape, b_shape
    return 2 * m * k * n


_EXTRA_OPS = {torch.ops.aten.addmm_: _addmm_inplace_flop}


class _GlobalOnly:
    """Stands in for FlopCounterMode's module tracker: no hooks, every count under "Global"."""

    parents = frozenset({"Global"})

    def __enter__(self) -> "_GlobalOnly":
        return self

    def __exit__(self, *exc) -> None:
        return None


def counter() -> flop_counter.FlopCounterMode:
    """A FlopCounterMode that also counts ``addmm_`` and tolerates ``autograd.grad`` on leaves."""
    mode = flop_counter.FlopCounterMode(display=False, custom_mapping=_EXTRA_OPS)
    mode.mod_tracker = _GlobalOnly()
    return mode


def count_flops(fn: Callable[[], object]) -> int:
    """FLOPs (matmuls and convolutions) of ``fn()``."""
    with counter() as mode:
        fn()
    return int(mode.get_total_flops())


def iteration_flops(step, batch, iteration: int, check_finite: bool = True) -> int:
    """FLOPs of one D step + G step of a :class:`~grafccsr.training.step.GanStep`, plus the
    occupancy grid's updates per iteration at ``iteration`` (:func:`grid_update_flops`). A
    compiled field runs eager for the count (Inductor's kernels bypass the counter; same maths)."""
    with eager_fields(step.generator):
        return count_flops(lambda: (step.d_step(batch, iteration, check_finite=check_finite),
                                    step.g_step(batch, iteration, check_finite=check_finite))) + \
            grid_update_flops(step, iteration)


def grid_update_flops(step, iteration: int) -> int:
    """FLOPs per iteration of the generator's occupancy-grid updates (``model.occupancy``; 0
    without, and during the warm-up, which has none): one update as it runs at ``iteration``
    (every cell at the warm-up's end, then 2 x ``update_fraction`` of them: both counts are fixed,
    not data-dependent), per ``update_every`` iterations. The grid is restored after the count."""
    grid = step.generator.occupancy
    if grid is None or iteration < grid.cfg.warmup_iters:
        return 0
    saved = [b.clone() for b in grid.buffers()]
    try:
        with eager_fields(step.generator):
            flops = count_flops(lambda: step.generator.update_occupancy(iteration, step.render_settings,
                                                                        step.cfg.train.seed))
    finally:
        for buffer, value in zip(grid.buffers(), saved):
            buffer.copy_(value)
    return flops // grid.cfg.update_every


def fake_iteration_flops(cfg, num_classes: Optional[int] = None, iteration: int = 1) -> int:
    """FLOPs of one D + G iteration of ``cfg`` traced under FakeTensorMode (no compute)."""
    step, batch, fake_mode = fake_run(cfg, num_classes or default_num_classes(cfg))
    with fake_mode:
        return iteration_flops(step, batch, iteration, check_finite=False)


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m grafccsr.bench.flops",
                                     description="FLOPs of one D + G training iteration of a config "
                                                 "(matmuls and convolutions, under FakeTensorMode).")
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="Hydra overrides (key=value, +exp=NAME)")
    overrides = parser.parse_args(argv).overrides
    try:
        cfg = load_config(overrides + ["tracking=none", "train.device=cpu", "train.compile=false"])
    except ConfigError as err:
        print(f"{parser.prog}: error: {err}", file=sys.stderr)
        return 2
    flops = fake_iteration_flops(cfg)
    print(f"{flops / 1e12:.4f} TFLOP per D+G iteration (matmuls and convolutions; FakeTensorMode): "
          f"{' '.join(overrides) or 'default config'}")
    occ = cfg.model.occupancy
    if occ.enabled:  # iteration 1 is in the grid's warm-up unless it is shorter
        after = fake_iteration_flops(cfg, iteration=occ.warmup_iters + 1)
        print(f"{after / 1e12:.4f} TFLOP per D+G iteration after the occupancy grid's warm-up "
              f"(iteration {occ.warmup_iters + 1}: its updates evaluate 2 x {occ.update_fraction:g} of the cells)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
