"""FID and KID of a generator against its real set, computed by torch-fidelity 0.4.

* Fakes come from the same pose distribution as the real set: ``num_samples``
  (class, u, v) triples are drawn uniformly (with replacement) from the dataset's
  labels and poses with a seeded ``torch.Generator``, each with its own seeded z,
  and rendered as whole images at the evaluation resolution.
* Reals are the dataset's uint8 images (resized when the evaluation resolution
  differs). Their features and FID statistics are cached by torch-fidelity under
  a name that fingerprints the image bytes, their count, the resolution and the
  extractor's weights (torch-fidelity's own cache key holds only an input name
  and the extractor name, not its weights).
* Extractors: ``random-features`` (offline, seeded random CNN — a "random-feature
  FID", not comparable with papers) or ``inception-v3-compat`` (torch-fidelity's
  standard network, from a local weights file ``eval.weights_path``).

torch-fidelity is imported inside the functions: importing it costs seconds.
"""

from __future__ import annotations

import hashlib
import logging
import os
from pathlib import Path
from typing import Any, Dict, Optional, Tuple

import torch
from torch.utils.data import Dataset

from grafccsr.config import Config, ConfigError
from grafccsr.imaging import resize_uint8, to_uint8
from grafccsr.metrics.keys import INCEPTION, RANDOM_FEATURES
from grafccsr.models import views
from grafccsr.models.render import RenderSettings
from grafccsr.paths import DATA_DIR

log = logging.getLogger(__name__)

INCEPTION_WEIGHTS_FILE = "weights-inception-2015-12-05-6726825d.pth"
INCEPTION_WEIGHTS_URL = f"https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/{INCEPTION_WEIGHTS_FILE}"
"""torch-fidelity 0.4's own download URL (``URL_INCEPTION_V3`` in feature_extractor_inceptionv3.py)."""

_REAL_RESIZE = "bilinear-antialias"
"""How reals are resized to the evaluation resolution (part of the cache key)."""


class ExtractorWeightsError(ConfigError):
    """The chosen feature extractor's weights are not available locally."""


# --------------------------------------------------------------------------- small helpers


class TensorImages(Dataset):
    """uint8 images (N, 3, H, W) as a Dataset of bare tensors (torch-fidelity rejects tuples)."""

    def __init__(self, images: torch.Tensor) -> None:
        if images.dtype != torch.uint8 or images.dim() != 4 or images.shape[1] != 3:
            raise ValueError(f"expected uint8 images (N, 3, H, W), got {images.dtype} {tuple(images.shape)}")
        self.images = images.cpu().contiguous()

    def __len__(self) -> int:
        return self.images.shape[0]

    def __getitem__(self, index: int) -> torch.Tensor:
        return self.images[index]


def eval_resolution(cfg: Config) -> int:
    """Side of evaluated images: ``eval.resolution`` or, when 0, ``data.image_size``."""
    return int(cfg.eval.resolution or cfg.data.image_size)


def images_fingerprint(images: torch.Tensor) -> str:
    """Content hash of a uint8 image tensor (shape and bytes)."""
    h = hashlib.sha256(str(tuple(images.shape)).encode())
    h.update(images.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


_FILE_HASHES: Dict[Tuple[str, int, int], str] = {}


def _file_sha256(path: Path) -> str:
    stat = path.stat()
    key = (str(path.resolve()), stat.st_size, stat.st_mtime_ns)
    if key not in _FILE_HASHES:
        h = hashlib.sha256()
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
        _FILE_HASHES[key] = h.hexdigest()[:16]
    return _FILE_HASHES[key]


def inception_weights_path(weights_path: Optional[str]) -> str:
    """The local InceptionV3 weights file, never a download.

    ``eval.weights_path`` when set; else torch-fidelity's file already in the torch
    hub cache (``$TORCH_HOME/hub/checkpoints``), which is where torch-fidelity would
    download it to. Otherwise raises :class:`ExtractorWeightsError`.
    """
    if weights_path:
        path = Path(weights_path).expanduser()
        if not path.is_file():
            raise ExtractorWeightsError(f"eval.weights_path={weights_path!r} is not a file")
        return str(path)
    cached = Path(torch.hub.get_dir()) / "checkpoints" / INCEPTION_WEIGHTS_FILE
    if cached.is_file():
        return str(cached)
    raise ExtractorWeightsError(
        f"eval.extractor={INCEPTION} needs its weights as a local file and will not download them. "
        f"Download {INCEPTION_WEIGHTS_FILE} from {INCEPTION_WEIGHTS_URL} (on a machine with network) "
        f"and pass eval.weights_path=/path/to/{INCEPTION_WEIGHTS_FILE}, or place it at {cached}. "
        f"For an offline, non-comparable score use eval.extractor={RANDOM_FEATURES}."
    )


def extractor_identity(extractor: str, weights_path: Optional[str] = None) -> str:
    """Fingerprint of an extractor's weights: the random CNN's seed/layout hash, or the
    SHA-256 of the inception weights file."""
    if extractor == RANDOM_FEATURES:
        from grafccsr.metrics.extractors import random_features_identity

        return random_features_identity()
    if extractor == INCEPTION:
        return _file_sha256(Path(inception_weights_path(weights_path)))
    raise ConfigError(f"eval.extractor={extractor!r} is not allowed; choose one of {[RANDOM_FEATURES, INCEPTION]}")


def real_stats_key(images: torch.Tensor, resolution: int, extractor: str, weights_path: Optional[str] = None) -> str:
    """Cache name of the real set's features/statistics: a hash of (image bytes and
    count, evaluation resolution, resize method, extractor name and weights)."""
    parts = [
        images_fingerprint(images),
        str(images.shape[0]),
        str(int(resolution)),
        _REAL_RESIZE,
        extractor,
        extractor_identity(extractor, weights_path),
    ]
    digest = hashlib.sha256("|".join(parts).encode()).hexdigest()[:20]
    return f"grafccsr-real-{images.shape[0]}x{int(resolution)}-{digest}"


def cache_root(cfg: Config) -> Path:
    return Path(cfg.eval.cache_dir).expanduser() if cfg.eval.cache_dir else DATA_DIR / "fidelity-cache"


def kid_subsets_for(n_real: int, n_fake: int, subset_size: int, subsets: int) -> Tuple[int, int]:
    """(subset size, number of subsets) torch-fidelity can use.

    A subset size above the smaller side is clamped to it (with a warning). When it
    equals both sides every subset is the whole of both sets, so one subset is used.
    """
    size = int(subset_size)
    if size > min(n_real, n_fake):
        log.warning("eval.kid_subset_size=%d exceeds the %d reals / %d fakes; using %d",
                    size, n_real, n_fake, min(n_real, n_fake))
        size = min(n_real, n_fake)
    if size == n_real and size == n_fake:
        subsets = 1
    return size, max(1, int(subsets))


# --------------------------------------------------------------------------- torch-fidelity


def _fidelity_kwargs(extractor: str, weights_path: Optional[str], device: torch.device) -> Dict[str, Any]:
    import grafccsr.metrics.extractors  # noqa: F401  (registers random-features)

    kwargs: Dict[str, Any] = {
        "feature_extractor": extractor,
        "cuda": device.type == "cuda",
        "verbose": False,
        "save_cpu_ram": True,  # DataLoader without worker processes: the images are in memory
    }
    if extractor == INCEPTION:
        kwargs["feature_extractor_weights_path"] = inception_weights_path(weights_path)
    elif extractor != RANDOM_FEATURES:
        raise ConfigError(f"eval.extractor={extractor!r} is not allowed; choose one of {[RANDOM_FEATURES, INCEPTION]}")
    return kwargs


def fid_kid(
    reals: torch.Tensor,
    fakes: torch.Tensor,
    *,
    extractor: str = RANDOM_FEATURES,
    weights_path: Optional[str] = None,
    kid_subset_size: int,
    kid_subsets: int,
    batch_size: int = 32,
    device: torch.device | str = "cpu",
    seed: int = 0,
    real_cache_name: Optional[str] = None,
    cache_dir: Optional[Path | str] = None,
) -> Dict[str, float]:
    """FID and KID between two uint8 image sets (N, 3, H, W) with torch-fidelity.

    ``real_cache_name`` + ``cache_dir`` cache the reals' features and statistics
    (the caller makes the name unique to data, resolution and extractor weights).
    ``seed`` drives torch-fidelity's choice of KID subsets.
    """
    from torch_fidelity import calculate_metrics

    device = torch.device(device)
    size, subsets = kid_subsets_for(reals.shape[0], fakes.shape[0], kid_subset_size, kid_subsets)
    kwargs = _fidelity_kwargs(extractor, weights_path, device)
    kwargs.update(
        input1=TensorImages(reals),
        input2=TensorImages(fakes),
        fid=True,
        kid=True,
        kid_subset_size=size,
        kid_subsets=subsets,
        batch_size=int(batch_size),
        rng_seed=int(seed),
    )
    if real_cache_name is not None:
        if cache_dir is None:
            raise ValueError("real_cache_name needs cache_dir")
        os.makedirs(cache_dir, exist_ok=True)
        kwargs.update(input1_cache_name=real_cache_name, cache_root=str(cache_dir), cache=True)
    else:
        kwargs.update(cache=False)
    out = calculate_metrics(**kwargs)
    return {
        "fid": float(out["frechet_inception_distance"]),
        "kid_mean": float(out["kernel_inception_distance_mean"]),
        "kid_std": float(out["kernel_inception_distance_std"]),
        "kid_subset_size": size,
        "kid_subsets": subsets,
    }


def extract_features(
    images: torch.Tensor,
    extractor: str = RANDOM_FEATURES,
    *,
    weights_path: Optional[str] = None,
    batch_size: int = 64,
    device: torch.device | str = "cpu",
) -> torch.Tensor:
    """Features (N, D) of uint8 images with a torch-fidelity-registered extractor,
    the layer it uses for FID/KID (float32, on the CPU)."""
    from torch_fidelity.registry import FEATURE_EXTRACTORS_REGISTRY
    from torch_fidelity.utils import create_feature_extractor

    device = torch.device(device)
    kwargs = _fidelity_kwargs(extractor, weights_path, device)
    name = kwargs.pop("feature_extractor")
    layer = FEATURE_EXTRACTORS_REGISTRY[name].get_default_feature_layer_for_metric("fid")
    net = create_feature_extractor(name, [layer], **kwargs)
    out = []
    with torch.no_grad():
        for start in range(0, images.shape[0], batch_size):
            batch = images[start:start + batch_size].to(device)
            out.append(net(batch)[0].float().cpu())
    return torch.cat(out)


# --------------------------------------------------------------------------- fakes


def sample_eval_poses(dataset, num_samples: int, seed: int = 0) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(class_idx, u, v), each (num_samples,), drawn uniformly with replacement from
    the dataset's (labels[:, 0], poses[:, 0], poses[:, 1]) with a seeded generator."""
    labels, poses = dataset.labels, dataset.poses
    gen = torch.Generator(device="cpu").manual_seed(int(seed))
    index = torch.randint(0, labels.shape[0], (int(num_samples),), generator=gen)
    return labels[index, 0].long(), poses[index, 0].float(), poses[index, 1].float()


@torch.no_grad()
def render_fakes(
    generator: torch.nn.Module,
    dataset,
    cfg: Config,
    device: torch.device,
    *,
    seed: int = 0,
    progress: bool = False,
) -> torch.Tensor:
    """``eval.num_samples`` uint8 fakes (N, 3, R, R) on the CPU at the real set's pose
    distribution, R = :func:`eval_resolution`."""

    resolution = eval_resolution(cfg)
    ccsr = cfg.model.ccsr
    if ccsr.mode == "discriminator" and resolution % ccsr.scale:
        raise ConfigError(
            f"evaluation resolution {resolution} must be divisible by model.ccsr.scale={ccsr.scale} "
            "(the field renders at resolution / scale)"
        )
    settings = RenderSettings.from_config(cfg)
    n = int(cfg.eval.num_samples)
    class_idx, u, v = sample_eval_poses(dataset, n, seed)
    z_gen = torch.Generator(device="cpu").manual_seed(int(seed) + 1)
    z = generator.sample_z(n, "cpu", generator=z_gen)
    step = max(1, int(cfg.eval.batch_size))
    out = torch.empty(n, 3, resolution, resolution, dtype=torch.uint8)
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=n, desc="eval fakes", unit="img", leave=False, disable=None)
    was_training = generator.training
    generator.eval()
    try:
        for start in range(0, n, step):
            sl = slice(start, min(n, start + step))
            images = views.render_views(  # looked up at call time: tests stub it
                generator, settings, z[sl].to(device), class_idx[sl].to(device), u[sl].to(device),
                v[sl].to(device), image_size=resolution, batch_size=step, to_cpu=cfg.memory.eval_to_cpu,
            )
            out[sl] = to_uint8(images).cpu()
            del images
            if bar is not None:
                bar.update(sl.stop - sl.start)
    finally:
        generator.train(was_training)
        if bar is not None:
            bar.close()
    return out


# --------------------------------------------------------------------------- entry point


def evaluate_generator(
    generator: torch.nn.Module,
    dataset,
    cfg: Config,
    device: torch.device,
    *,
    seed: int = 0,
    progress: bool = False,
) -> Dict[str, Any]:
    """FID and KID of ``generator`` (pass the EMA generator) against ``dataset``.

    Returns ``{"fid", "kid_mean", "kid_std", "extractor", "num_samples",
    "resolution", "num_real", "kid_subset_size", "kid_subsets"}``. The global RNG
    state is left untouched (rendering and KID subsets use private seeded generators).
    """
    device = torch.device(device)
    ev = cfg.eval
    resolution = eval_resolution(cfg)
    if ev.extractor == INCEPTION:
        inception_weights_path(ev.weights_path)  # fail before rendering anything
    fork_devices = []
    if device.type == "cuda":
        fork_devices = [device.index if device.index is not None else torch.cuda.current_device()]
    with torch.random.fork_rng(devices=fork_devices):
        fakes = render_fakes(generator, dataset, cfg, device, seed=seed, progress=progress)
        real_images = dataset.images
        key = real_stats_key(real_images, resolution, ev.extractor, ev.weights_path)
        reals = resize_uint8(real_images, resolution)
        result = fid_kid(
            reals,
            fakes,
            extractor=ev.extractor,
            weights_path=ev.weights_path,
            kid_subset_size=ev.kid_subset,
            kid_subsets=ev.kid_subsets,
            batch_size=ev.batch_size,
            device=device,
            seed=seed,
            real_cache_name=key,
            cache_dir=cache_root(cfg),
        )
    return {
        "fid": result["fid"],
        "kid_mean": result["kid_mean"],
        "kid_std": result["kid_std"],
        "extractor": ev.extractor,
        "num_samples": int(fakes.shape[0]),
        "resolution": resolution,
        "num_real": int(reals.shape[0]),
        "kid_subset_size": result["kid_subset_size"],
        "kid_subsets": result["kid_subsets"],
    }
