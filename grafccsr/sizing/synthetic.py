"""What the sizing tools and the benchmark run instead of a dataset: a batch of the right
shapes with valid labels, and the real models and step of a config around it."""

from __future__ import annotations

import copy
import warnings
from typing import Optional

import torch
from torch._subclasses.fake_tensor import FakeCopyMode, FakeTensorMode

from grafccsr.config import Config, ConfigError
from grafccsr.models import build_models
from grafccsr.training.build import build_run
from grafccsr.training.distributed import Dist
from grafccsr.training.step import Batch, GanStep


def default_num_classes(cfg: Config) -> int:
    """Classes of the data: the synthetic set's count (folders need an explicit value)."""
    if cfg.data.kind != "synthetic":
        raise ConfigError("data.kind=folder: pass --num-classes (the number of class folders)")
    return cfg.data.synthetic.num_classes


def synthetic_batch(cfg: Config, num_classes: int, device: torch.device | str = "cpu",
                    generator: Optional[torch.Generator] = None) -> Batch:
    """Images in [-1, 1] (B, 3, S, S) and labels (B, 3) = (class, elevation index, azimuth
    degrees) of ``cfg``'s batch size and image size (no dataset needed)."""
    b, s = cfg.train.batch_size, cfg.data.image_size
    images = torch.rand(b, 3, s, s, generator=generator, device=device) * 2.0 - 1.0
    idx = torch.arange(b, device=device)
    step_deg = 360 // cfg.data.synthetic.num_azimuths
    labels = torch.stack(
        (idx % num_classes, idx % len(cfg.data.elevation_v), (idx * 7 * step_deg) % 360), dim=1
    ).long()
    return Batch(images, labels)


def synthetic_run(cfg: Config, num_classes: int, device: torch.device | str = "cpu",
                  seed: Optional[int] = None) -> tuple[GanStep, Batch]:
    """:func:`build_run` and a :func:`synthetic_batch` on ``device``."""
    step = build_run(cfg, num_classes, device, seed=seed)
    return step, synthetic_batch(cfg, num_classes, device)


def fake_run(cfg: Config, num_classes: int, dist: Dist = Dist()) -> tuple[GanStep, Batch, FakeTensorMode]:
    """:func:`synthetic_run` with fake tensors (shapes only, no memory, no compute): the step,
    this rank's batch and the fake mode to run it under. The models are built for real on the
    CPU first (spectral norm's power iterations are slow under fake mode), then copied into fake
    tensors."""
    real_g, real_d = build_models(cfg, num_classes)
    fake_mode = FakeTensorMode()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # deepcopy of fake tensors warns about data_ptr
        with FakeCopyMode(fake_mode):
            generator, discriminator = copy.deepcopy(real_g), copy.deepcopy(real_d)
        with fake_mode, FakeCopyMode(fake_mode):  # GanStep deep-copies G for the EMA
            step = build_run(cfg, num_classes, "cpu", models=(generator, discriminator), dist=dist)
    with fake_mode:
        batch = synthetic_batch(cfg, num_classes, "cpu")
        batch = Batch(dist.shard(batch.images), dist.shard(batch.labels))
    return step, batch, fake_mode
