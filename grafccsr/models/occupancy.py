"""An occupancy grid the generator keeps for itself: where its radiance field may hold matter.

NerfAcc's occupancy-grid estimator (``OccGridEstimator``), re-implemented in plain PyTorch for a
latent-conditioned generator (``model.occupancy``). The generator owns one grid per class, so the
grid follows it into the EMA copy, the checkpoint and every torchrun rank:

* **state**: ``density`` (classes, R, R, R), an exponential moving average of the maximum density
  of the generator's field over a few latent codes, and ``occupied`` (same shape, bool), the cells
  rays sample (thresholded, then dilated). Both are persistent buffers; every cell starts on.
* **update** (:meth:`OccupancyGrid.update`, on the training loop's cadence): one jittered point per
  evaluated cell, the field's density there for ``latent_draws`` codes per class, the maximum over
  the codes; value = max(value x ema_decay, new), and a cell is on when its value exceeds the
  threshold, dilated. During the warm-up every cell stays on and the grid is not evaluated; the
  first update, at its end, evaluates every cell, the later ones a random fraction of the cells
  plus as many occupied ones. (NerfAcc evaluates every cell at each update of its warm-up; at
  ``ema_decay`` 0.6 such a value weighs 0.6^k k updates later, while every cell costs 1.6 s of a
  120-s CPU run, each of the warm-up's eight times.) The codes and cells come from a generator
  seeded by the run's seed and the iteration: every rank draws the same ones and computes the same grid.
* **sampling** (:class:`RaySampler`, what the renderer asks): each ray steps through [near, far] at
  a fixed number of steps (at most half a cell long), each step on or off by the cell of its
  midpoint; the renderer spreads its samples over the occupied length (its coordinate: length
  along the occupied steps) and maps them back to depths. Static shapes, no values read into
  Python: the training step still traces under FakeTensorMode.

Why a step's midpoint suffices: a step is at most half a cell long, so every point of it lies
within a quarter cell of its midpoint, in the midpoint's cell or a neighbour. With ``dilation``
>= 1 the neighbours of an occupied cell are on, so every point of a ray inside a cell that the
thresholded grid holds lies in a step that is on (tests/test_occupancy.py checks it).
"""

from __future__ import annotations

import math
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from grafccsr.config.schema import OccupancyConfig

STEPS_PER_CELL = 2
"""March steps per cell side along the longest ray segment (see the module docstring)."""


def _lateral(fov_deg: float, ray_shift: float = 0.0) -> float:
    """Largest |x, y| / |z| of a camera ray (an image corner, shifted rays included)."""
    return math.tan(0.5 * math.radians(fov_deg)) * (1.0 + ray_shift) * math.sqrt(2.0)


def camera_half_size(radius: float, near: float, far: float, fov_deg: float, ray_shift: float = 0.0) -> float:
    """Half side of the smallest origin-centred cube holding every point at depth [near, far] of
    every ray of a camera at distance ``radius`` looking at the origin (any pose): the largest
    distance from the origin such a point has, sqrt((radius - t)^2 + (t l)^2) at t = near or far."""
    lateral = _lateral(fov_deg, ray_shift)
    return max(math.hypot(radius - t, t * lateral) for t in (near, far))


def march_steps(half_size: float, resolution: int, near: float, far: float, fov_deg: float,
                ray_shift: float = 0.0) -> int:
    """Steps per ray so that none is longer than half a cell (the longest ray: an image corner's)."""
    cell = 2.0 * half_size / resolution
    longest = (far - near) * math.sqrt(1.0 + _lateral(fov_deg, ray_shift) ** 2)
    return max(1, math.ceil(STEPS_PER_CELL * longest / cell))


def _seed(seed: int, iteration: int) -> int:
    """One 63-bit seed per (run seed, iteration): the same on every rank, another at each update."""
    return (seed * 0x9E3779B97F4A7C15 + iteration * 0xBF58476D1CE4E5B9 + 1) % (1 << 63)


_LOOKUPS_PER_CHUNK = 1 << 20
"""Steps looked up at a time: a whole evaluation batch (32 images of 64^2 rays x 87 steps) would
otherwise hold hundreds of MB of step positions at once."""


class OccupiedSegments:
    """Each ray's occupied part of [near, far] (rays (B, R)): ``count`` (B, R) occupied steps,
    ``length`` (B, R, 1) their length in units of t (like depths), ``active`` (B, R) (some step
    on) and :meth:`to_depth`, which maps coordinates along the occupied length (B, R, S) in
    [0, length] to depths t. Steps are looked up in chunks of rays and kept as flags (one byte
    per step: 11 MB for an evaluation batch of 32 images of 64^2 rays x 87 steps)."""

    def __init__(self, sampler: "RaySampler", origins: torch.Tensor, directions: torch.Tensor, near: float,
                 far: float):
        b, r = origins.shape[:2]
        self.shape, self.near, self.steps = (b, r), near, sampler.steps
        self.step = (far - near) / sampler.steps
        rays, dirs = origins.reshape(b * r, 3), directions.reshape(b * r, 3)
        classes = sampler.class_idx.reshape(b, 1).expand(b, r).reshape(b * r)
        self._chunk = max(1, _LOOKUPS_PER_CHUNK // sampler.steps)
        self._on = [sampler.steps_on(rays[i:i + self._chunk], dirs[i:i + self._chunk], classes[i:i + self._chunk],
                                     near, self.step) for i in range(0, b * r, self._chunk)]
        self.count = torch.cat([on.sum(-1) for on in self._on]).view(b, r)
        self.length = (self.count * self.step).to(origins.dtype)[..., None]
        self.active = self.count > 0

    def to_depth(self, coords: torch.Tensor) -> torch.Tensor:
        """Depths t of occupied-length coordinates (B, R, S): coordinate c lies in the j-th occupied
        step (j = ceil(c / step) - 1, so a boundary belongs to the step before it: c = 0 is the
        start of the first occupied step, c = length the end of the last), at fraction c / step - j."""
        b, r = self.shape
        flat = coords.detach().reshape(b * r, -1)
        count = self.count.reshape(b * r, 1)
        parts = []
        for on, i in zip(self._on, range(0, b * r, self._chunk)):
            rank = on.cumsum(-1, dtype=torch.int32)  # occupied steps up to each step
            steps = flat[i:i + self._chunk].float() / self.step
            last = (count[i:i + self._chunk] - 1).clamp(min=0)
            j = torch.minimum((torch.ceil(steps) - 1).clamp(min=0).long(), last)
            frac = (steps - j).clamp(0.0, 1.0)
            index = torch.searchsorted(rank, (j + 1).to(torch.int32)).clamp(max=self.steps - 1)  # the j-th occupied
            parts.append(self.near + (index + frac) * self.step)
        return torch.cat(parts).view(coords.shape).to(coords.dtype)


class RaySampler:
    """The grid of each batch row's class, as the renderer asks it (:meth:`segments`)."""

    def __init__(self, occupied: torch.Tensor, class_idx: torch.Tensor, half_size: float, steps: int):
        self.occupied, self.class_idx, self.half_size, self.steps = occupied, class_idx, half_size, steps

    def segments(self, origins: torch.Tensor, directions: torch.Tensor, near: float, far: float
                 ) -> OccupiedSegments:
        """March [near, far] of rays (B, R, 3) in ``steps`` steps, each on or off by the cell of its midpoint."""
        return OccupiedSegments(self, origins, directions, near, far)

    def steps_on(self, origins: torch.Tensor, directions: torch.Tensor, classes: torch.Tensor, near: float,
                 step: float) -> torch.Tensor:
        """Steps on (N, M) of rays (N, 3) of classes (N,): the cells of their midpoints. A midpoint
        outside the cube but within one cell of it takes the nearest boundary cell (it may lie
        just outside while its step reaches in); farther out: off.

        Along a ray a midpoint's position in cells is affine in the step's index k (o + d (near +
        (k + 1/2) step) in cells), so each axis's cell is one multiply-add and a floor per step
        instead of building the (N, M, 3) points."""
        res = self.occupied.shape[-1]
        scale = res / (2.0 * self.half_size)
        o, d = origins.float(), directions.float()
        at_first = (o + d * (near + 0.5 * step) + self.half_size) * scale  # (N, 3), in cells
        k = torch.arange(self.steps, device=o.device, dtype=torch.float32)
        cells = torch.addcmul(at_first[..., None], (d * step * scale)[..., None], k).floor_()  # (N, 3, M)
        near_cube = (cells - 0.5 * (res - 1)).abs().amax(dim=1) <= 0.5 * (res + 1)  # every axis in [-1, R]
        cells.clamp_(0, res - 1)
        x, y, z = cells.unbind(1)
        flat = ((x * res + y) * res + z).long() + classes.long()[:, None] * res ** 3  # exact in float: R^3 < 2^24
        return self.occupied.reshape(-1)[flat] & near_cube


DensityFn = Callable[[torch.Tensor, torch.Generator], torch.Tensor]
"""(points (C, N, 3) of each class, generator) -> the maximum density (C, N) over the latent draws."""


class OccupancyGrid(nn.Module):
    """Per-class occupancy of the generator's own field (see the module docstring)."""

    def __init__(self, cfg: OccupancyConfig, num_classes: int):
        super().__init__()
        self.cfg = cfg
        r = cfg.resolution
        self.register_buffer("density", torch.zeros(num_classes, r, r, r))
        self.register_buffer("occupied", torch.ones(num_classes, r, r, r, dtype=torch.bool))

    @property
    def resolution(self) -> int:
        return self.cfg.resolution

    def due(self, iteration: int) -> bool:
        """Whether the loop updates the grid after ``iteration``: at the warm-up's end, then every
        ``update_every`` iterations."""
        after = iteration - self.cfg.warmup_iters
        return after >= 0 and after % self.cfg.update_every == 0

    def sampler(self, class_idx: torch.Tensor, half_size: float, steps: int) -> RaySampler:
        """The grid of each batch row's class (``class_idx`` (B,)) for the renderer."""
        return RaySampler(self.occupied, class_idx, half_size, steps)

    def density_threshold(self, half_size: float) -> float:
        """The density at which a ray crossing a cell along its diagonal loses ``threshold`` opacity."""
        cell = 2.0 * half_size / self.resolution
        return -math.log1p(-self.cfg.threshold) / (math.sqrt(3.0) * cell)

    def cells_to_update(self, iteration: int, rng: torch.Generator, every_cell: bool = False) -> torch.Tensor:
        """Flat cell indices (C, N) evaluated at ``iteration``: all of them up to the warm-up's end (or
        with ``every_cell``), then a uniformly random ``update_fraction`` of the cells (the same for
        every class) plus as many drawn (with replacement) from each class's occupied cells."""
        classes, total = self.occupied.shape[0], self.resolution ** 3
        device = self.occupied.device
        if iteration <= self.cfg.warmup_iters or every_cell:
            return torch.arange(total, device=device).expand(classes, total)
        n = max(1, math.ceil(self.cfg.update_fraction * total))
        uniform = torch.randperm(total, generator=rng, device=device)[:n].expand(classes, n)
        occupied = torch.multinomial(self.occupied.reshape(classes, total).float(), n, replacement=True,
                                     generator=rng)
        return torch.cat([uniform, occupied], dim=1)

    def cell_points(self, cells: torch.Tensor, half_size: float, rng: torch.Generator) -> torch.Tensor:
        """One uniformly jittered point (C, N, 3) in each cell of ``cells`` (C, N)."""
        r = self.resolution
        ijk = torch.stack((cells // (r * r), (cells // r) % r, cells % r), dim=-1).float()
        jitter = torch.rand(ijk.shape, generator=rng, device=ijk.device)
        return (ijk + jitter) * (2.0 * half_size / r) - half_size

    @torch.no_grad()
    def update(self, iteration: int, half_size: float, density_fn: DensityFn, seed: int,
               every_cell: bool = False) -> None:
        """Evaluate :meth:`cells_to_update` with ``density_fn`` and fold the maxima into the grid;
        after the warm-up also switch cells (:meth:`switch`). ``seed``: the run's (train.seed).
        ``every_cell``: evaluate every cell whatever the iteration (the dearest update: what the FLOP
        counter and the estimator price)."""
        rng = torch.Generator(device=self.density.device)
        rng.manual_seed(_seed(seed, iteration))
        cells = self.cells_to_update(iteration, rng, every_cell)
        values = density_fn(self.cell_points(cells, half_size, rng), rng).float()
        self.fold(cells, values)
        if iteration >= self.cfg.warmup_iters:
            self.occupied.copy_(self.switch(half_size))

    def fold(self, cells: torch.Tensor, values: torch.Tensor) -> None:
        """value = max(value x ema_decay, new maximum) in the cells evaluated (C, N); others unchanged."""
        flat = self.density.view(self.density.shape[0], -1)
        fresh = torch.zeros_like(flat).scatter_reduce_(1, cells, values, reduce="amax", include_self=False)
        seen = torch.zeros_like(flat, dtype=torch.bool).scatter_(1, cells, True)
        flat.copy_(torch.where(seen, torch.maximum(flat * self.cfg.ema_decay, fresh), flat))

    def switch(self, half_size: float) -> torch.Tensor:
        """Cells on (C, R, R, R): value > :meth:`density_threshold`, dilated by ``dilation`` cells. A
        class with no cell above it keeps every cell on (with none on, no ray would sample it and no
        gradient could bring its object back).

        NerfAcc lowers the threshold to the grid's mean value when that is smaller; a generator's
        field holds faint fog and floaters far from its object, which keep the mean below the
        threshold, so that rule keeps far more cells on (on one +exp=fast run at iteration 400:
        18.7 % instead of 7.2 % of the cube, 1.18 instead of 0.84 of occupied length per ray)
        without making the renders safer than the threshold already does: it is left out."""
        classes = self.density.shape[0]
        on = self.density > self.density_threshold(half_size)
        empty = ~on.view(classes, -1).any(dim=1)
        d = self.cfg.dilation
        on = F.max_pool3d(on[:, None].float(), kernel_size=2 * d + 1, stride=1, padding=d)[:, 0] > 0
        return on | empty.view(classes, 1, 1, 1)

    def extra_repr(self) -> str:
        return f"classes={self.density.shape[0]}, resolution={self.resolution}"
