"""Typed configuration: dataclass schemas registered in Hydra's ConfigStore, plus
cross-field validation.

Every YAML file under ``conf/`` is merged onto :class:`Config`, so a misspelt key
or a value of the wrong type fails when the config is composed. Constraints that
span several fields (a non-square ray count, a CCSR scale that does not divide,
an elevation list that does not match its prefixes, ...) are checked by
:func:`validate`, which every entry point calls before doing any work.

Every constant that the original graf_ccsr hard-coded is a named field here.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from dataclasses import field as dc_field
from pathlib import Path
from typing import Any, Dict, List, Optional

from omegaconf import DictConfig, OmegaConf

PROJECT_ROOT = Path(__file__).resolve().parent.parent
CONF_DIR = PROJECT_ROOT / "conf"


class ConfigError(ValueError):
    """A config value is invalid; the message names the key and what is allowed."""


# --------------------------------------------------------------------------- data


@dataclass
class CameraConfig:
    """Pinhole camera on a sphere looking at the origin (GRAF conventions, z up)."""

    fov_deg: float = 20.0
    """Full field of view in degrees; focal = (W/2) / tan(fov/2)."""
    radius: float = 2.5
    """Distance of the camera from the origin."""
    near: float = 1.5
    """Near bound of the ray segment that is rendered."""
    far: float = 4.5
    """Far bound of the ray segment that is rendered."""


@dataclass
class SyntheticConfig:
    """The embedded, procedurally rendered multi-view dataset."""

    num_classes: int = 2
    """Number of object classes (specimens); each has its own shape and colours."""
    num_azimuths: int = 72
    """Azimuth steps over 360 degrees (72 = 5 degree steps; the original used 360)."""
    seed: int = 0
    """Seed of the procedural textures; the same seed gives the same bytes."""
    supersample: int = 2
    """Rays per pixel side when rendering the set (anti-aliasing)."""


@dataclass
class DataConfig:
    """Where the multi-view images come from and how their poses are read."""

    kind: str = "synthetic"
    """``synthetic`` (embedded, generated on first use) or ``folder`` (real data)."""
    root: Optional[str] = None
    """Dataset folder. ``folder``: required. ``synthetic``: cache folder (default
    ``<project>/data/synthetic-<fingerprint>``)."""
    image_size: int = 64
    """Side of the (square) images in pixels."""
    resize: str = "error"
    """What to do with images of another size: ``error`` or ``resize`` (bilinear)."""
    elevation_prefixes: List[str] = dc_field(default_factory=lambda: ["0", "0.5", "1", "1.5"])
    """File-name prefixes of the elevation levels, index i maps to ``elevation_v[i]``."""
    elevation_v: List[float] = dc_field(default_factory=lambda: [0.5, 0.4, 0.3, 0.2])
    """``v`` of each elevation level; polar angle theta = arccos(1 - 2 v)."""
    camera: CameraConfig = dc_field(default_factory=CameraConfig)
    synthetic: SyntheticConfig = dc_field(default_factory=SyntheticConfig)


# --------------------------------------------------------------------------- model


@dataclass
class PoseConfig:
    """Which poses the generator renders fakes at."""

    mode: str = "known"
    """``known``: the pose of the real image in the same batch slot (graf_ccsr);
    ``random``: u ~ U(u_range), v ~ U(v_range) (GRAF)."""
    u_range: List[float] = dc_field(default_factory=lambda: [0.0, 1.0])
    """Azimuth fraction range for random poses (u = deg / 360)."""
    v_range: List[float] = dc_field(default_factory=lambda: [0.2, 0.5])
    """Elevation ``v`` range for random poses."""


@dataclass
class PatchConfig:
    """GRAF's multi-scale patch sampler."""

    rays_per_patch: int = 1024
    """Rays in one patch; must be a perfect square (the patch side is its root)."""
    sampling: str = "multiscale"
    """``multiscale`` (random scale and shift, GRAF) or ``full`` (whole image
    point-sampled at the patch resolution, what graf_ccsr did)."""
    min_scale: float = 0.25
    """Smallest patch scale (fraction of the image side) reached by annealing."""
    max_scale: float = 1.0
    """Largest patch scale."""
    scale_anneal: float = 0.0075
    """s_min(it) = max(min_scale, max_scale * exp(-scale_anneal * (it // anneal_every)));
    GRAF's 0.0025 x 3 per 1000 iterations = 0.0075 per step of 1000."""
    anneal_every: int = 1000
    """Iterations per annealing step (GRAF anneals in 1000-iteration steps)."""
    antialias: bool = True
    """Blur real images before sampling when the patch is much coarser than them."""

    @property
    def side(self) -> int:
        return math.isqrt(self.rays_per_patch)


@dataclass
class FieldConfig:
    """Conditional radiance field (NeRF MLP with GRAF's shape/appearance split)."""

    xyz_frequencies: int = 10
    """Log-spaced positional-encoding frequencies on xyz (10 -> 63 dims)."""
    dir_frequencies: int = 4
    """Frequencies on view directions (4 -> 27 dims)."""
    depth: int = 8
    """Layers of the trunk MLP."""
    width: int = 256
    """Width of the trunk MLP."""
    skips: List[int] = dc_field(default_factory=lambda: [4])
    """Trunk layers after which the input is concatenated again."""
    view_width: int = 128
    """Width of the view-dependent colour branch."""
    z_shape_dim: int = 128
    """Latent code part fed to the trunk (shape)."""
    z_appearance_dim: int = 128
    """Latent code part fed to the colour branch (appearance)."""
    class_conditioning: bool = True
    """Add a learned per-class embedding to z (broadcast per sample)."""


@dataclass
class RenderConfig:
    """Volume rendering along each ray."""

    samples_per_ray: int = 64
    """Stratified depth samples per ray on [near, far]."""
    importance_samples: int = 0
    """Extra samples per ray from the hierarchical pass (0 = off)."""
    perturb: bool = True
    """Jitter the stratified samples during training."""
    density_noise_std: float = 1.0
    """Std of the noise added to raw density at iteration 0."""
    density_noise_decay_iters: int = 5000
    """The noise decays linearly to exactly 0 at this iteration."""
    white_background: bool = False
    """Composite on white instead of black."""


@dataclass
class CCSRConfig:
    """Consistency-controlled super-resolution (CCLC codes, SR net, CEM)."""

    mode: str = "off"
    """``off``; ``regularizer`` (graf_ccsr: SR only feeds a consistency loss);
    ``discriminator`` (render at P, super-resolve to scale * P, D sees scale * P)."""
    scale: int = 2
    """Super-resolution factor."""
    num_views: int = 8
    """Azimuth bins of per-view latent codes (8 = 45 degree bins)."""
    code_resolution: int = 0
    """Side of each per-view latent image; 0 = the data's image size. Codes are
    sampled with the patch grid, so they stay aligned with the image."""
    code_init_std: float = 0.01
    """Std of the codes' N(0, 1) * std initialisation."""
    hidden_channels: int = 64
    """Channels of the SR network's 3x3 convolutions."""
    num_layers: int = 3
    """3x3 conv layers before the PixelShuffle head."""
    cem_blur: str = "box"
    """Blur of the consistency-enforcing module: ``box`` or ``gaussian``."""
    cem_kernel: int = 3
    """Blur kernel size (odd)."""
    cem_sigma: float = 1.0
    """Gaussian blur sigma (``gaussian`` only)."""
    cem_weight: float = 0.5
    """Weight of the back-projected residual (1.0 = projection)."""
    consistency_weight: float = 1.0
    """alpha(t) = consistency_weight * exp(-consistency_decay * t)."""
    consistency_decay: float = 1e-4
    """Decay rate of alpha(t) per iteration."""


@dataclass
class DiscriminatorConfig:
    """GRAF's DCGAN-style patch discriminator."""

    base_channels: int = 64
    """Channels of the first 4x4 stride-2 conv; doubles per level."""
    max_channels: int = 512
    """Cap on channels per level."""
    spectral_norm: bool = True
    """Spectral normalisation on every conv."""
    norm: str = "instance"
    """``instance``, ``batch`` (graf_ccsr's tail) or ``none``."""
    class_conditioning: bool = True
    """Class one-hot as extra input channels."""
    aux_classifier: bool = False
    """Auxiliary multi-task classification head (ACGAN-style, D and G)."""
    n_each_task: List[int] = dc_field(default_factory=list)
    """Logit slice size of each task (empty = one task over the data's classes)."""


@dataclass
class ModelConfig:
    z_dim: int = 256
    """Latent size; split into z_shape_dim + z_appearance_dim."""
    pose: PoseConfig = dc_field(default_factory=PoseConfig)
    patch: PatchConfig = dc_field(default_factory=PatchConfig)
    field: FieldConfig = dc_field(default_factory=FieldConfig)
    render: RenderConfig = dc_field(default_factory=RenderConfig)
    ccsr: CCSRConfig = dc_field(default_factory=CCSRConfig)
    discriminator: DiscriminatorConfig = dc_field(default_factory=DiscriminatorConfig)


# --------------------------------------------------------------------------- train


@dataclass
class AmpConfig:
    """Mixed precision as named policies (guide item 11)."""

    policy: str = "off"
    """``off``; ``generator`` (radiance field + renderer under autocast);
    ``generator_sr`` (+ CCSR); ``all`` (+ discriminator). R1 is always FP32."""
    dtype: str = "bf16"
    """``bf16`` or ``fp16`` (fp16 uses one GradScaler per optimiser)."""


@dataclass
class TrainConfig:
    device: str = "auto"
    """``auto`` (cuda if available), ``cpu``, ``cuda`` or ``cuda:N``."""
    seed: int = 0
    batch_size: int = 8
    """Images per optimiser step (split into grad_accum_steps micro-batches)."""
    grad_accum_steps: int = 1
    """Micro-batches accumulated per step: same effective batch, less memory."""
    max_iters: int = 2000
    optimizer: str = "rmsprop"
    """``rmsprop`` or ``adam``."""
    lr_g: float = 6e-4
    lr_d: float = 1e-4
    rmsprop_alpha: float = 0.99
    optim_eps: float = 1e-8
    adam_betas: List[float] = dc_field(default_factory=lambda: [0.0, 0.99])
    lr_milestones: List[int] = dc_field(default_factory=lambda: [80000, 120000, 150000])
    lr_gamma: float = 0.5
    r1_gamma: float = 10.0
    """R1 penalty weight (graf_ccsr hard-coded 80; GRAF uses 10)."""
    r1_every: int = 1
    """Lazy R1: apply every k D steps, scaled by k."""
    aux_weight: float = 1.0
    """Weight of the auxiliary multi-task classification loss (if enabled)."""
    ema_beta: float = 0.999
    """EMA of the generator used for samples and evaluation (0 = no EMA)."""
    amp: AmpConfig = dc_field(default_factory=AmpConfig)
    compile: bool = False
    """torch.compile the radiance field (falls back to eager if unavailable)."""
    tf32: bool = True
    """Allow TF32 matmuls on CUDA."""
    log_every: int = 10
    sample_every: int = 500
    eval_every: int = 0
    """FID/KID cadence (0 = only at the end if eval.at_end)."""
    ckpt_every: int = 1000
    num_sample_views: int = 8
    """Views in the sample grid."""
    nan_policy: str = "stop"
    """On a NaN/Inf loss: ``stop`` the run or ``skip`` the step."""
    inject_oom_at: int = -1
    """Testing: raise an out-of-memory error at this iteration (-1 = never)."""
    inject_nan_at: int = -1
    """Testing: make the D loss NaN at this iteration (-1 = never)."""
    progress: bool = True
    """Show a tqdm progress bar."""


# --------------------------------------------------------------------------- memory


@dataclass
class MemoryConfig:
    """Every item of the memory guide as a switch, plus what it left out."""

    set_to_none: bool = True
    """Guide #3: zero_grad(set_to_none=...). False keeps zero-filled grad buffers."""
    loader_workers: int = 0
    """Guide #2: DataLoader workers (capped at 4)."""
    prefetch_factor: int = 2
    """Guide #2: batches prefetched per worker (only with workers > 0)."""
    persistent_workers: bool = True
    """Guide #2: keep workers alive between epochs (only with workers > 0)."""
    pin_memory: bool = True
    """Guide #2/#5: pinned host batches (only applied on CUDA)."""
    non_blocking: bool = True
    """Guide #5: asynchronous host-to-device copies."""
    eager_free: bool = True
    """Guide #6: `del` intermediates (fakes, D outputs, losses) as soon as used."""
    empty_cache_every: int = 0
    """Guide #7: torch.cuda.empty_cache() + gc.collect() after sampling, eval and
    checkpoints, and every N iterations (0 = never)."""
    fakes_without_graph: bool = True
    """Guide #8: render the D step's fakes (and samples, eval) under no_grad."""
    ccsr_no_grad: bool = False
    """Guide #9 as written: run CCSR under no_grad and re-mark its output as
    requiring grad. This STOPS CCSR FROM LEARNING (its output is a new leaf)."""
    eval_to_cpu: bool = True
    """Guide #10: move each evaluation/sample batch to the CPU at once."""
    grad_checkpoint: bool = False
    """Not in the guide: activation checkpointing of the radiance field in segments of
    at most ``checkpoint_segment_points`` points; backward recomputes one segment at a
    time."""
    checkpoint_segment_points: int = 65536
    """Points (rays x samples) per checkpointed segment of the field (with
    ``grad_checkpoint``). The field's activations peak at about one segment's worth
    (~9 KB per point at GRAF's 8x256 in fp32): smaller segments, lower peak, more
    Python overhead per step. Whole rays are kept together."""
    render_chunk: int = 0
    """Not in the guide: rays rendered per chunk (0 = all at once). No-grad renders
    (D-step fakes, samples, eval) are segmented anyway (``no_grad_segment_points``)."""
    no_grad_segment_points: int = 65536
    """Renders without autograd (the D step's fakes, samples, evaluation) run the field
    on at most this many points at a time: the same result, with the MLP's temporaries
    bounded (an evaluation batch of 32 whole 64x64 images at 64 samples is 8.4 M points)."""
    track_peak_every: int = 50
    """Measure the device-agnostic peak (live tensor bytes) on every N-th
    iteration (and the first two); 0 = never. Other steps run untouched."""


# --------------------------------------------------------------------------- eval / tracking


@dataclass
class EvalConfig:
    extractor: str = "random-features"
    """``random-features`` (offline, seeded random CNN: NOT comparable with
    papers) or ``inception-v3-compat`` (torch-fidelity's standard FID network)."""
    weights_path: Optional[str] = None
    """Local file with the inception-v3-compat weights (offline clusters)."""
    num_samples: int = 1000
    """Fakes generated for FID/KID."""
    kid_subset_size: int = 100
    """Samples per KID subset (<= num_samples)."""
    kid_subsets: int = 100
    """Number of KID subsets."""
    batch_size: int = 32
    """Images rendered/featurised per batch during evaluation."""
    resolution: int = 0
    """Side of evaluated images; 0 = the data's image size."""
    best_metric: str = "fid"
    """``fid`` or ``kid_mean``: which keeps the best checkpoint."""
    at_end: bool = True
    """Evaluate once more at the end of training."""
    cache_dir: Optional[str] = None
    """Real-statistics cache (default ``<project>/data/fidelity-cache``)."""


@dataclass
class TrackingConfig:
    backend: str = "mlflow"
    """``mlflow`` or ``none``."""
    uri: Optional[str] = None
    """MLflow tracking URI (default ``sqlite:///<project>/mlflow.db``)."""
    experiment: str = "grafccsr"
    run_name: Optional[str] = None
    parent_run_id: Optional[str] = None
    """Make the run a nested child of this run (sweeps)."""
    log_checkpoints: bool = False
    """Also upload checkpoints as MLflow artifacts."""
    tags: Dict[str, str] = dc_field(default_factory=dict)


@dataclass
class Config:
    data: DataConfig = dc_field(default_factory=DataConfig)
    model: ModelConfig = dc_field(default_factory=ModelConfig)
    train: TrainConfig = dc_field(default_factory=TrainConfig)
    memory: MemoryConfig = dc_field(default_factory=MemoryConfig)
    eval: EvalConfig = dc_field(default_factory=EvalConfig)
    tracking: TrackingConfig = dc_field(default_factory=TrackingConfig)
    exp_name: str = "default"
    """Set by experiment presets; names the run folder and MLflow tag."""
    output_dir: Optional[str] = None
    """Run folder; default Hydra's run directory."""
    resume: Optional[str] = None
    """Checkpoint file or run folder to resume from (continues its MLflow run)."""


def register_configs() -> None:
    from hydra.core.config_store import ConfigStore

    ConfigStore.instance().store(name="base_config", node=Config)


# --------------------------------------------------------------------------- validation


def _choice(key: str, value: Any, allowed: List[Any]) -> None:
    if value not in allowed:
        raise ConfigError(f"{key}={value!r} is not allowed; choose one of {allowed}")


def _positive(key: str, value: float, allow_zero: bool = False) -> None:
    if value < 0 or (value == 0 and not allow_zero):
        raise ConfigError(f"{key}={value!r} must be {'>= 0' if allow_zero else '> 0'}")


def validate(cfg: Config) -> Config:
    """Check constraints that span fields. Raises ConfigError naming the key."""
    d, m, t, mem, ev, tr = cfg.data, cfg.model, cfg.train, cfg.memory, cfg.eval, cfg.tracking

    _choice("data.kind", d.kind, ["synthetic", "folder"])
    if d.kind == "folder" and not d.root:
        raise ConfigError("data.root must name the dataset folder when data.kind=folder")
    _choice("data.resize", d.resize, ["error", "resize"])
    _positive("data.image_size", d.image_size)
    if len(d.elevation_prefixes) != len(d.elevation_v):
        raise ConfigError(
            f"data.elevation_prefixes has {len(d.elevation_prefixes)} entries but "
            f"data.elevation_v has {len(d.elevation_v)}; they must pair up"
        )
    for i, v in enumerate(d.elevation_v):
        if not 0.0 <= v <= 1.0:
            raise ConfigError(f"data.elevation_v[{i}]={v} must lie in [0, 1]")
    cam = d.camera
    if not 0 < cam.fov_deg < 180:
        raise ConfigError(f"data.camera.fov_deg={cam.fov_deg} must lie in (0, 180)")
    if not 0 <= cam.near < cam.far:
        raise ConfigError(f"data.camera.near={cam.near} must be >= 0 and < data.camera.far={cam.far}")
    _positive("data.synthetic.num_classes", d.synthetic.num_classes)
    _positive("data.synthetic.num_azimuths", d.synthetic.num_azimuths)
    _positive("data.synthetic.supersample", d.synthetic.supersample)
    if 360 % d.synthetic.num_azimuths:
        raise ConfigError(
            f"data.synthetic.num_azimuths={d.synthetic.num_azimuths} must divide 360 "
            "(file names carry whole degrees)"
        )

    p = m.patch
    _positive("model.patch.rays_per_patch", p.rays_per_patch)
    side = math.isqrt(p.rays_per_patch)
    if side * side != p.rays_per_patch:
        raise ConfigError(
            f"model.patch.rays_per_patch={p.rays_per_patch} is not a perfect square; "
            f"nearest allowed values are {side * side} ({side}^2) and {(side + 1) ** 2} ({side + 1}^2)"
        )
    if side < 16:
        raise ConfigError(f"model.patch.rays_per_patch={p.rays_per_patch} gives a {side}px patch; the discriminator needs >= 16 (256 rays)")
    _choice("model.patch.sampling", p.sampling, ["multiscale", "full"])
    if not 0 < p.min_scale <= p.max_scale <= 1.0:
        raise ConfigError(
            f"need 0 < model.patch.min_scale ({p.min_scale}) <= model.patch.max_scale ({p.max_scale}) <= 1"
        )
    _positive("model.patch.anneal_every", p.anneal_every)
    _choice("model.pose.mode", m.pose.mode, ["known", "random"])
    for key, rng in (("model.pose.u_range", m.pose.u_range), ("model.pose.v_range", m.pose.v_range)):
        if len(rng) != 2 or not 0.0 <= rng[0] <= rng[1] <= 1.0:
            raise ConfigError(f"{key}={list(rng)} must be [low, high] with 0 <= low <= high <= 1")

    f = m.field
    if f.z_shape_dim + f.z_appearance_dim != m.z_dim:
        raise ConfigError(
            f"model.field.z_shape_dim ({f.z_shape_dim}) + model.field.z_appearance_dim "
            f"({f.z_appearance_dim}) must equal model.z_dim ({m.z_dim})"
        )
    for s in f.skips:
        if not 0 <= s < f.depth - 1:
            raise ConfigError(f"model.field.skips entry {s} must lie in [0, model.field.depth - 1 = {f.depth - 1})")
    _positive("model.render.samples_per_ray", m.render.samples_per_ray)
    _positive("model.render.importance_samples", m.render.importance_samples, allow_zero=True)
    _positive("model.render.density_noise_decay_iters", m.render.density_noise_decay_iters, allow_zero=True)

    c = m.ccsr
    _choice("model.ccsr.mode", c.mode, ["off", "regularizer", "discriminator"])
    _choice("model.ccsr.scale", c.scale, [1, 2, 3, 4, 8])
    _choice("model.ccsr.cem_blur", c.cem_blur, ["box", "gaussian"])
    if c.cem_kernel < 1 or c.cem_kernel % 2 == 0:
        raise ConfigError(f"model.ccsr.cem_kernel={c.cem_kernel} must be a positive odd number")
    _positive("model.ccsr.num_views", c.num_views)
    if 360 % c.num_views:
        raise ConfigError(f"model.ccsr.num_views={c.num_views} must divide 360 (azimuth bins of whole degrees)")
    if c.mode == "discriminator":
        hr = side * c.scale
        if hr > d.image_size:
            raise ConfigError(
                f"model.ccsr.scale={c.scale} with a {side}px patch needs real patches of {hr}px, "
                f"larger than data.image_size={d.image_size}; lower model.ccsr.scale or model.patch.rays_per_patch"
            )
        if hr > 256:
            raise ConfigError(f"model.ccsr.scale * patch side = {hr} exceeds the discriminator's 256px limit")
    if c.mode != "off" and c.scale < 2:
        raise ConfigError(f"model.ccsr.scale={c.scale} must be >= 2 when model.ccsr.mode={c.mode}")

    disc = m.discriminator
    _choice("model.discriminator.norm", disc.norm, ["instance", "batch", "none"])
    for i, n in enumerate(disc.n_each_task):
        if n < 2:
            raise ConfigError(f"model.discriminator.n_each_task[{i}]={n} must be >= 2")

    _positive("train.batch_size", t.batch_size)
    _positive("train.grad_accum_steps", t.grad_accum_steps)
    if t.batch_size % t.grad_accum_steps:
        raise ConfigError(
            f"train.batch_size={t.batch_size} must be divisible by train.grad_accum_steps={t.grad_accum_steps}"
        )
    _positive("train.max_iters", t.max_iters)
    _choice("train.optimizer", t.optimizer, ["rmsprop", "adam"])
    _choice("train.amp.policy", t.amp.policy, ["off", "generator", "generator_sr", "all"])
    _choice("train.amp.dtype", t.amp.dtype, ["bf16", "fp16"])
    _choice("train.nan_policy", t.nan_policy, ["stop", "skip"])
    _positive("train.r1_every", t.r1_every)
    _positive("train.r1_gamma", t.r1_gamma, allow_zero=True)
    if not 0.0 <= t.ema_beta < 1.0:
        raise ConfigError(f"train.ema_beta={t.ema_beta} must lie in [0, 1)")
    if len(t.adam_betas) != 2:
        raise ConfigError(f"train.adam_betas={list(t.adam_betas)} must have two entries")
    if not (t.device in ("auto", "cpu", "cuda") or t.device.startswith("cuda:")):
        raise ConfigError(f"train.device={t.device!r} is not allowed; choose auto, cpu, cuda or cuda:N")
    for key in ("log_every", "sample_every", "eval_every", "ckpt_every"):
        _positive(f"train.{key}", getattr(t, key), allow_zero=True)
    _positive("train.num_sample_views", t.num_sample_views)

    if not 0 <= mem.loader_workers:
        raise ConfigError(f"memory.loader_workers={mem.loader_workers} must be >= 0")
    _positive("memory.prefetch_factor", mem.prefetch_factor)
    _positive("memory.render_chunk", mem.render_chunk, allow_zero=True)
    _positive("memory.checkpoint_segment_points", mem.checkpoint_segment_points)
    _positive("memory.no_grad_segment_points", mem.no_grad_segment_points)
    _positive("memory.empty_cache_every", mem.empty_cache_every, allow_zero=True)
    _positive("memory.track_peak_every", mem.track_peak_every, allow_zero=True)

    _choice("eval.extractor", ev.extractor, ["random-features", "inception-v3-compat"])
    _choice("eval.best_metric", ev.best_metric, ["fid", "kid_mean"])
    _positive("eval.num_samples", ev.num_samples)
    _positive("eval.kid_subset_size", ev.kid_subset_size)
    if ev.kid_subset_size > ev.num_samples:
        raise ConfigError(
            f"eval.kid_subset_size={ev.kid_subset_size} must be <= eval.num_samples={ev.num_samples}"
        )
    if ev.weights_path and not Path(ev.weights_path).is_file():
        raise ConfigError(f"eval.weights_path={ev.weights_path!r} is not a file")

    _choice("tracking.backend", tr.backend, ["mlflow", "none"])
    return cfg


def to_config(cfg: DictConfig | Config) -> Config:
    """Turn a composed DictConfig into a validated :class:`Config` object."""
    if isinstance(cfg, Config):
        return validate(cfg)
    obj = OmegaConf.to_object(cfg)
    if not isinstance(obj, Config):
        # composed without the schema: merge onto it so unknown keys still fail
        obj = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(Config), cfg))
    return validate(obj)


def load_config(overrides: Optional[List[str]] = None, config_name: str = "config") -> Config:
    """Compose ``conf/`` with Hydra's compose API (for tests, sweeps, benchmarks)."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    register_configs()
    if GlobalHydra.instance().is_initialized():
        GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        composed = compose(config_name=config_name, overrides=list(overrides or []))
    return to_config(composed)


def flatten(cfg: Config | DictConfig | Dict[str, Any], prefix: str = "") -> Dict[str, Any]:
    """Flatten a config into ``{"a.b.c": value}`` (for MLflow params)."""
    if not isinstance(cfg, dict):
        cfg = OmegaConf.to_container(OmegaConf.structured(cfg) if not isinstance(cfg, DictConfig) else cfg, resolve=True)
    out: Dict[str, Any] = {}
    for k, v in cfg.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and v:
            out.update(flatten(v, key + "."))
        else:
            out[key] = v
    return out
