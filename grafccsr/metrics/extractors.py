"""Feature extractors registered with torch-fidelity.

``random-features`` (:class:`RandomFeatureExtractor`) is an OFFLINE stand-in for
InceptionV3: a small CNN whose weights are random, drawn from a private
generator seeded with 0, never trained. It needs no download and runs in seconds
on a CPU, so every run can report a number, but a "random-feature FID" only ranks
models evaluated with this same extractor: it is NOT comparable with published
FIDs nor with ``inception-v3-compat`` FIDs.

This module imports torch-fidelity (seconds); import it lazily.
"""

from __future__ import annotations

import hashlib
from typing import Dict, List, Tuple

import torch
import torch.nn.functional as F
from torch_fidelity.feature_extractor_base import FeatureExtractorBase
from torch_fidelity.helpers import vassert
from torch_fidelity.registry import FEATURE_EXTRACTORS_REGISTRY, register_feature_extractor

from grafccsr.metrics.keys import RANDOM_FEATURES


_SEED = 0
_INPUT_SIZE = 64
"""Every input is resized (bilinear, antialiased) to this side first."""
_CHANNELS = (3, 32, 64, 128, 128)
_FEATURE = "256"
"""The one feature layer: per-channel spatial mean and std of the last conv (2 x 128)."""
_VERSION = "v1"
"""Bump when the architecture or initialisation changes (invalidates cached real stats)."""


def _random_weights() -> Dict[str, torch.Tensor]:
    """He-normal 3x3 conv weights and small biases from a private generator seeded
    with 0, so the global RNG state neither changes them nor is changed by them."""
    gen = torch.Generator(device="cpu").manual_seed(_SEED)
    weights: Dict[str, torch.Tensor] = {}
    for i, (c_in, c_out) in enumerate(zip(_CHANNELS[:-1], _CHANNELS[1:])):
        fan_in = c_in * 9
        weights[f"w{i}"] = torch.randn(c_out, c_in, 3, 3, generator=gen) * (2.0 / fan_in) ** 0.5
        weights[f"b{i}"] = torch.randn(c_out, generator=gen) * 0.01
    return weights


def random_features_identity() -> str:
    """Fingerprint of the random extractor's weights and layout (for cache keys)."""
    h = hashlib.sha256(f"{RANDOM_FEATURES}|{_VERSION}|{_INPUT_SIZE}|{_CHANNELS}".encode())
    for name, tensor in sorted(_random_weights().items()):
        h.update(name.encode())
        h.update(tensor.numpy().tobytes())
    return h.hexdigest()[:16]


class RandomFeatureExtractor(FeatureExtractorBase):
    """Seeded random CNN features for a *random-feature* FID/KID (offline, CPU-fast).

    Input: uint8 (N, 3, H, W) as torch-fidelity feeds it. It is resized to 64x64,
    mapped to [-1, 1] and passed through four 3x3 conv + ReLU layers (3 -> 32 -> 64
    -> 128 -> 128 channels, 2x2 average pooling between them); the feature ``"256"``
    is the concatenated spatial mean and standard deviation of the last layer.
    """

    def __init__(self, name: str, features_list: List[str], **kwargs) -> None:
        super().__init__(name, features_list)
        for key, tensor in _random_weights().items():
            self.register_buffer(key, tensor)
        self.requires_grad_(False)
        self.eval()

    @staticmethod
    def get_provided_features_list() -> Tuple[str, ...]:
        return (_FEATURE,)

    @staticmethod
    def get_default_feature_layer_for_metric(metric: str) -> str:
        vassert(metric in ("fid", "kid", "prc"), f"{RANDOM_FEATURES} provides no features for metric {metric!r}")
        return _FEATURE

    @staticmethod
    def can_be_compiled() -> bool:
        return False

    @staticmethod
    def get_dummy_input_for_compile() -> torch.Tensor:
        return torch.zeros(1, 3, _INPUT_SIZE, _INPUT_SIZE, dtype=torch.uint8)

    def forward(self, x: torch.Tensor) -> Tuple[torch.Tensor, ...]:
        vassert(torch.is_tensor(x) and x.dtype == torch.uint8, "Expecting image as torch.Tensor with dtype=torch.uint8")
        vassert(x.dim() == 4 and x.shape[1] == 3, f"Input is not Bx3xHxW: {tuple(x.shape)}")
        h = x.float() / 127.5 - 1.0
        if h.shape[-2:] != (_INPUT_SIZE, _INPUT_SIZE):
            h = F.interpolate(h, size=(_INPUT_SIZE, _INPUT_SIZE), mode="bilinear", align_corners=False, antialias=True)
        layers = len(_CHANNELS) - 1
        for i in range(layers):
            h = F.relu(F.conv2d(h, getattr(self, f"w{i}"), getattr(self, f"b{i}"), padding=1))
            if i < layers - 1:
                h = F.avg_pool2d(h, 2)
        flat = h.flatten(2)
        features = torch.cat((flat.mean(dim=2), flat.std(dim=2)), dim=1)
        return tuple(features for _ in self.features_list)


def register() -> None:
    """Register ``random-features`` with torch-fidelity (idempotent)."""
    if RANDOM_FEATURES not in FEATURE_EXTRACTORS_REGISTRY:
        register_feature_extractor(RANDOM_FEATURES, RandomFeatureExtractor)


register()
