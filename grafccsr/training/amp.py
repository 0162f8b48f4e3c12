"""Mixed precision as named policies (memory guide item 11).

``off``          everything FP32
``generator``    radiance field + renderer under autocast
``generator_sr`` + the CCSR super-resolution network
``all``          + the discriminator

R1 is always computed in FP32 outside autocast. fp16 uses one GradScaler per
optimiser; bf16 needs none.
"""

from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass

import torch

from grafccsr.config import AmpConfig

_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}
_PARTS = {
    "off": (False, False, False),
    "generator": (True, False, False),
    "generator_sr": (True, True, False),
    "all": (True, True, True),
}


@dataclass(frozen=True)
class AmpPolicy:
    device_type: str
    dtype: torch.dtype
    render: bool
    sr: bool
    discriminator: bool

    @property
    def enabled(self) -> bool:
        return self.render or self.sr or self.discriminator

    @property
    def uses_scaler(self) -> bool:
        return self.enabled and self.dtype == torch.float16

    def autocast(self, part_enabled: bool):
        """Autocast context for one part of the model (or a no-op)."""
        if not part_enabled:
            return nullcontext()
        return torch.autocast(device_type=self.device_type, dtype=self.dtype)

    def make_scaler(self) -> torch.amp.GradScaler:
        return torch.amp.GradScaler(self.device_type, enabled=self.uses_scaler)


def amp_policy(cfg: AmpConfig, device: torch.device) -> AmpPolicy:
    render, sr, disc = _PARTS[cfg.policy]
    return AmpPolicy(device_type=device.type, dtype=_DTYPES[cfg.dtype], render=render, sr=sr, discriminator=disc)
