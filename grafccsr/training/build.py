"""One way to build a run: the device, the models on it and their :class:`GanStep`.

The training loop, the benchmark, the sizing tools and evaluation all build through here,
so a model, optimiser or AMP change reaches every one of them.
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch import nn

from grafccsr.config import Config, ConfigError
from grafccsr.models import build_models
from grafccsr.training.compile import compile_field
from grafccsr.training.distributed import Dist
from grafccsr.training.step import GanStep


def resolve_device(name: str, key: str = "train.device") -> torch.device:
    """A device name (``key`` in messages) as a torch device: ``auto`` is CUDA when available.
    A CUDA device on a machine without one is a config error (exit 2), not a crash."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ConfigError(f"{key}={name!r} is not a device; choose auto, cpu, cuda or cuda:N") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError(f"{key}={name} but CUDA is not available on this machine; use cpu")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ConfigError(f"{key}={name} but this machine has {torch.cuda.device_count()} CUDA device(s)")
    elif device.type != "cpu":
        raise ConfigError(f"{key}={name!r}: choose auto, cpu, cuda or cuda:N")
    return device


def device_name(device: torch.device) -> str:
    """Human name of a device: the GPU's model, or ``cpu``."""
    return torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"


def build_run(cfg: Config, num_classes: int, device: torch.device | str, *, seed: Optional[int] = None,
              models: Optional[Tuple[nn.Module, nn.Module]] = None, dist: Dist = Dist()) -> GanStep:
    """The generator and discriminator of ``cfg`` on ``device`` (compiled if ``train.compile``)
    and their :class:`GanStep` (EMA copy, optimisers, schedulers, GradScalers).

    ``seed`` seeds the models' initialisation; ``models`` passes prebuilt ones already on
    ``device`` (the estimator's fake-tensor copies). Under ``torchrun`` (``dist``) every rank
    starts from rank 0's weights and buffers.
    """
    device = torch.device(device)
    if seed is not None:
        torch.manual_seed(seed)
    if models is None:
        generator, discriminator = build_models(cfg, num_classes)
        generator.to(device)
        discriminator.to(device)
    else:
        generator, discriminator = models
    dist.broadcast_module(generator)
    dist.broadcast_module(discriminator)
    if cfg.train.compile:
        compile_field(generator)
    return GanStep(cfg, generator, discriminator, device, dist)
