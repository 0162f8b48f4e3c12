"""The typed configuration: one dataclass per section, every default in exactly one place.

The defaults here ARE the default job (``python -m grafccsr.train``: the CPU-sized model on
the embedded data). The group files under ``conf/`` hold only what differs from them
(``model=graf`` lists GRAF's sizes), and presets under ``conf/exp/`` only what they change;
a test composes ``conf/`` and checks it equals ``Config()``.

Choices are ``Literal`` types; numeric bounds are declared with :func:`bounded`; checks that
span several fields are each section's ``check`` method. Every constant the original
graf_ccsr hard-coded is a named field. Where GRAF or graf_ccsr used another value, the
docstring says so.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from dataclasses import field as dc_field
from pathlib import Path
from typing import Any, Dict, List, Literal, Optional, Tuple


class ConfigError(ValueError):
    """A config value is invalid; the message names the key and what is allowed."""


def bounded(default: Any, *, ge: Optional[float] = None, gt: Optional[float] = None,
            le: Optional[float] = None, lt: Optional[float] = None) -> Any:
    """A dataclass field with numeric bounds, checked by :func:`grafccsr.config.validate`."""
    bounds = {k: v for k, v in (("ge", ge), ("gt", gt), ("le", le), ("lt", lt)) if v is not None}
    return dc_field(default=default, metadata={"bounds": bounds})


def _list(*values: Any) -> Any:
    return dc_field(default_factory=lambda: list(values))


# --------------------------------------------------------------------------- camera


@dataclass
class CameraConfig:
    """Pinhole camera on a sphere looking at the origin (GRAF conventions, z up).

    Shared by the dataset renderer and the generator: both must see through the same camera.
    """

    fov_deg: float = bounded(20.0, gt=0, lt=180)
    """Full field of view in degrees; focal = (W/2) / tan(fov/2)."""
    radius: float = bounded(2.5, gt=0)
    """Distance of the camera from the origin."""
    near: float = bounded(1.5, ge=0)
    """Near bound of the rendered ray segment (depth along the optical axis)."""
    far: float = bounded(4.5, gt=0)
    """Far bound of the rendered ray segment."""

    def check(self, root: "Config") -> None:
        if self.near >= self.far:
            raise ConfigError(f"camera.near={self.near} must be < camera.far={self.far}")


# --------------------------------------------------------------------------- data


@dataclass
class SyntheticConfig:
    """The embedded, procedurally rendered multi-view dataset."""

    num_classes: int = bounded(2, ge=1)
    """Number of object classes (specimens); each has its own shape and colours."""
    num_azimuths: int = bounded(72, ge=1)
    """Azimuth steps over 360 degrees (72 = 5 degree steps; the original used 360)."""
    seed: int = 0
    """Seed of the procedural textures; the same seed gives the same bytes."""
    supersample: int = bounded(2, ge=1)
    """Rays per pixel side when rendering the set (anti-aliasing)."""
    scene: Literal["centred", "offset"] = "centred"
    """``centred``: one object per class around the origin (a column on a footing, a block, ...),
    all inside a ball of radius 0.37. ``offset``: two objects per class, off-centre and of
    different heights (a tall column beside a low block, a tall pillar beside a low slab): a
    ball around the origin that holds them needs radius 0.42 and is mostly empty (the set that
    breaks ``model.render.bound_radius``'s assumption; ``model.occupancy`` finds them)."""


@dataclass
class HoldoutConfig:
    """Views the training never sees, kept for the pose-matched evaluation (``eval/view_*``).

    A view is held out when its elevation is selected (``elevations``) and its azimuth is
    either one of every ``every_k_azimuth``-th azimuth or inside one of ``azimuth_ranges``.
    The training loader skips held-out views; the evaluation renders the generator at exactly
    their poses. FID/KID are not affected: they compare with every view of the set."""

    every_k_azimuth: int = bounded(8, ge=0)
    """Hold out every k-th azimuth of the set's azimuth grid (the sorted distinct azimuths of
    all views: 72 steps of 5 degrees in the embedded set, so 8 holds out 0, 40, ..., 320
    degrees, 1/8 of the views), at every selected elevation. 0 = none (train on every view,
    as graf_ccsr did); 1 is refused (it would hold out everything)."""
    azimuth_offset: int = bounded(0, ge=0)
    """Which of each k azimuth steps is held out (0 = the first: 0 degrees); < every_k_azimuth."""
    azimuth_ranges: List[str] = _list()
    """Azimuth sectors held out, as ``"LOW-HIGH"`` degrees, half-open [LOW, HIGH); LOW > HIGH
    wraps through 0 (``"350-10"``). A sector tests extrapolation, every k-th azimuth
    interpolation. E.g. ``data.holdout.azimuth_ranges=[90-135]``."""
    elevations: List[int] = _list()
    """Elevation indices (into ``data.elevation_v``) the holdout applies to; empty = all."""

    @property
    def enabled(self) -> bool:
        return self.every_k_azimuth > 0 or bool(self.azimuth_ranges)

    def ranges(self) -> List[Tuple[float, float]]:
        """``azimuth_ranges`` as (low, high) degrees; ConfigError naming the entry if one is malformed."""
        out = []
        for i, text in enumerate(self.azimuth_ranges):
            low, sep, high = str(text).strip().partition("-")
            try:
                pair = (float(low), float(high)) if sep else None
            except ValueError:
                pair = None
            if pair is None or not (0 <= pair[0] <= 360 and 0 <= pair[1] <= 360) or pair[0] == pair[1]:
                raise ConfigError(f"data.holdout.azimuth_ranges[{i}]={text!r} must be 'LOW-HIGH' degrees in "
                                  "[0, 360] with LOW != HIGH, e.g. '90-135' (or '350-10' through 0)")
            out.append(pair)
        return out

    def check(self, root: "Config") -> None:
        if self.every_k_azimuth == 1:
            raise ConfigError("data.holdout.every_k_azimuth=1 would hold out every view; use 0 (off) or >= 2")
        if self.every_k_azimuth and self.azimuth_offset >= self.every_k_azimuth:
            raise ConfigError(f"data.holdout.azimuth_offset={self.azimuth_offset} must be < "
                              f"data.holdout.every_k_azimuth={self.every_k_azimuth}")
        self.ranges()
        levels = len(root.data.elevation_v)
        for i, e in enumerate(self.elevations):
            if not 0 <= e < levels:
                raise ConfigError(f"data.holdout.elevations[{i}]={e} must index data.elevation_v (0..{levels - 1})")
        if self.enabled and not root.data.single_object:
            raise ConfigError("data.holdout is for the pose-matched metrics, which need data.single_object=true; "
                              "with data.single_object=false set data.holdout.every_k_azimuth=0 "
                              "data.holdout.azimuth_ranges=[]")


@dataclass
class DataConfig:
    """Where the multi-view images come from and how their poses are read."""

    kind: Literal["synthetic", "folder"] = "synthetic"
    """``synthetic`` (embedded, generated on first use) or ``folder`` (real data)."""
    root: Optional[str] = None
    """Dataset folder. ``folder``: required. ``synthetic``: cache folder (default
    ``<project>/data/synthetic-<fingerprint>``)."""
    image_size: int = bounded(64, ge=1)
    """Side of the (square) images in pixels (graf_ccsr: 256)."""
    resize: Literal["error", "resize"] = "error"
    """What to do with images of another size: ``error`` or ``resize`` (bilinear)."""
    elevation_prefixes: List[str] = _list("0", "0.5", "1", "1.5")
    """File-name prefixes of the elevation levels, index i maps to ``elevation_v[i]``."""
    elevation_v: List[float] = _list(0.5, 0.4, 0.3, 0.2)
    """``v`` of each elevation level; polar angle theta = arccos(1 - 2 v)."""
    synthetic: SyntheticConfig = dc_field(default_factory=SyntheticConfig)
    single_object: bool = True
    """Every class is one physical object (a specimen) photographed from known poses, so a
    class's render at a view's pose can be compared with that view (the pose-matched
    ``eval/view_*`` metrics). True for the embedded set and graf_ccsr's layout."""
    background: List[float] = _list(0.0, 0.0, 0.0)
    """RGB in [0, 1] of the images' background (the embedded set's is black). With
    ``foreground_tolerance`` it defines a real view's silhouette for ``eval/view_iou``."""
    foreground_tolerance: float = bounded(0.05, ge=0, lt=1)
    """A real pixel is foreground when some channel differs from ``background`` by more than
    this (in [0, 1]; 0.05: a difference of 13 or more of 255 levels; the embedded objects' darkest
    shade is 0.13)."""
    holdout: HoldoutConfig = dc_field(default_factory=HoldoutConfig)

    def check(self, root: "Config") -> None:
        if len(self.background) != 3 or not all(0.0 <= c <= 1.0 for c in self.background):
            raise ConfigError(f"data.background={list(self.background)} must be three values in [0, 1] (RGB)")
        if self.kind == "folder" and not self.root:
            raise ConfigError("data.root must name the dataset folder when data.kind=folder")
        if len(self.elevation_prefixes) != len(self.elevation_v):
            raise ConfigError(
                f"data.elevation_prefixes has {len(self.elevation_prefixes)} entries but "
                f"data.elevation_v has {len(self.elevation_v)}; they must pair up"
            )
        for i, v in enumerate(self.elevation_v):
            if not 0.0 <= v <= 1.0:
                raise ConfigError(f"data.elevation_v[{i}]={v} must lie in [0, 1]")
        if 360 % self.synthetic.num_azimuths:
            raise ConfigError(
                f"data.synthetic.num_azimuths={self.synthetic.num_azimuths} must divide 360 "
                "(file names carry whole degrees)"
            )


# --------------------------------------------------------------------------- model


@dataclass
class PoseConfig:
    """Which poses the generator renders fakes at."""

    mode: Literal["known", "random"] = "known"
    """``known``: the pose of the real image in the same batch slot (graf_ccsr);
    ``random``: u ~ U(u_range), v ~ U(v_range) (GRAF)."""
    u_range: List[float] = _list(0.0, 1.0)
    """Azimuth fraction range for random poses (u = deg / 360)."""
    v_range: List[float] = _list(0.2, 0.5)
    """Elevation ``v`` range for random poses."""

    def check(self, root: "Config") -> None:
        for key, rng in (("model.pose.u_range", self.u_range), ("model.pose.v_range", self.v_range)):
            if len(rng) != 2 or not 0.0 <= rng[0] <= rng[1] <= 1.0:
                raise ConfigError(f"{key}={list(rng)} must be [low, high] with 0 <= low <= high <= 1")


@dataclass
class PatchConfig:
    """GRAF's multi-scale patch sampler."""

    rays_per_patch: int = bounded(256, gt=0)
    """Rays in one patch; a perfect square (the patch side is its root). GRAF: 1024 (32^2);
    graf_ccsr: 4096 (64^2)."""
    sampling: Literal["multiscale", "full"] = "multiscale"
    """``multiscale`` (random scale and shift, GRAF) or ``full`` (whole image point-sampled
    at the patch resolution, what graf_ccsr did)."""
    min_scale: float = bounded(0.5, gt=0, le=1)
    """Smallest patch scale (fraction of the image side) reached by annealing (GRAF: 0.25)."""
    max_scale: float = bounded(1.0, gt=0, le=1)
    """Largest patch scale."""
    min_scale_cap: float = bounded(0.9, gt=0, le=1)
    """s_min never exceeds this (GRAF: 0.9): patches vary in scale from the first iteration."""
    scale_anneal: float = bounded(0.05, ge=0)
    """s_min(it) = min(min_scale_cap, max(min_scale, max_scale * exp(-scale_anneal * (it // anneal_every)))).
    GRAF: 0.0025 x 3 per 1000 iterations, i.e. 0.0075 with anneal_every=1000."""
    anneal_every: int = bounded(100, gt=0)
    """Iterations per annealing step (GRAF: 1000)."""
    antialias: bool = False
    """Box-filter real images to the patch spacing (a mip-map) before sampling. Off: reals are
    point-sampled like the generator's one ray per pixel, as in GRAF and graf_ccsr."""
    align_corners: bool = False
    """Where a patch's P x P points lie. False: the centres of a P x P tiling of the patch (a
    whole-image patch at P = image size is exactly the pixel centres). True: GRAF's and
    graf_ccsr's convention, ``linspace(-1, 1, P)`` read with ``grid_sample(align_corners=True)``:
    the outer points sit on the outermost pixel centres of the region. Both the rays and the
    real patch use the same points. The two agree when a whole-image patch has the image's
    resolution; at P < image size they sample other image points (e.g. a 32^2 thumbnail of a
    64^2 image: False reads midway between pixel pairs, a 2x2 average; True reads the pixels
    at k * 63/31, mostly unfiltered), so D sees other reals. Needs the image size
    (``PatchSampler(..., image_size=data.image_size)``)."""

    @property
    def side(self) -> int:
        return math.isqrt(self.rays_per_patch)

    def check(self, root: "Config") -> None:
        side = self.side
        if side * side != self.rays_per_patch:
            raise ConfigError(
                f"model.patch.rays_per_patch={self.rays_per_patch} is not a perfect square; nearest "
                f"allowed values are {side * side} ({side}^2) and {(side + 1) ** 2} ({side + 1}^2)"
            )
        if side < 16:
            raise ConfigError(f"model.patch.rays_per_patch={self.rays_per_patch} gives a {side}px patch; "
                              "the discriminator needs >= 16 (256 rays)")
        if self.min_scale > self.max_scale:
            raise ConfigError(f"model.patch.min_scale={self.min_scale} must be <= model.patch.max_scale={self.max_scale}")


@dataclass
class FieldConfig:
    """Conditional radiance field (NeRF MLP with GRAF's shape/appearance split).

    The defaults are the CPU-sized field (58 k parameters); ``model=graf`` is GRAF's 8 x 256."""

    xyz_frequencies: int = bounded(6, ge=0)
    """Log-spaced positional-encoding frequencies on xyz (GRAF: 10 -> 63 dims)."""
    dir_frequencies: int = bounded(3, ge=0)
    """Frequencies on view directions (GRAF: 4 -> 27 dims)."""
    depth: int = bounded(4, ge=1)
    """Layers of the trunk MLP (GRAF: 8)."""
    width: int = bounded(96, ge=1)
    """Width of the trunk MLP (GRAF: 256)."""
    skips: List[int] = _list(2)
    """Trunk layers after which the input is concatenated again (GRAF: [4])."""
    view_width: int = bounded(48, ge=1)
    """Width of the view-dependent colour branch (GRAF: 128)."""
    z_shape_dim: int = bounded(32, ge=0)
    """Latent code part fed to the trunk (shape; GRAF: 128)."""
    z_appearance_dim: int = bounded(32, ge=0)
    """Latent code part fed to the colour branch (appearance; GRAF: 128; graf_ccsr: 0, all of z
    went into the trunk: ``z_shape_dim=256, z_appearance_dim=0``)."""
    class_conditioning: Literal["add", "scale", "none"] = "add"
    """How the class modulates z (per sample, before the shape/appearance split). ``add``:
    z + embedding(class) (embedding initialised N(0, 0.1^2)). ``scale``: graf_ccsr's
    z * LayerNorm(embedding(class)) (embedding initialised N(0, 1), LayerNorm with its affine
    weight and bias: 256 + 512 parameters per class at z_dim 256). ``none``: no class input."""
    execution: Literal["fused", "concat"] = "fused"
    """How the field is computed; the same function and gradients either way (tested). ``fused``:
    each layer that reads z splits its weight, so the z term is one matmul per sample, not per
    point, and the linear feature layer is composed into the colour branch. ``concat``: the
    original's cost: PE(xyz) || z concatenated for every point (trunk input 63 + 256 = 319,
    skip input 575 at graf_ccsr's sizes), a separate feature layer, then feature || PE(dir) || z_app
    (283 = 256 + 27) into the colour branch: about 1.37x the fused field's matmul FLOPs there."""

    skip_latent: Literal["conditioned", "raw"] = "conditioned"
    """Which latent code the skip connection re-injects with PE(xyz). ``conditioned``: the
    class-conditioned z_shape the first layer reads (ours). ``raw``: graf_ccsr's, the latent code
    BEFORE class conditioning (its trunk input [PE(x), z] is kept and concatenated again after
    layer 4, while only the first layer sees z * LayerNorm(embedding)); the same with
    ``class_conditioning=none``."""

    def check(self, root: "Config") -> None:
        if self.z_shape_dim + self.z_appearance_dim != root.model.z_dim:
            raise ConfigError(
                f"model.field.z_shape_dim ({self.z_shape_dim}) + model.field.z_appearance_dim "
                f"({self.z_appearance_dim}) must equal model.z_dim ({root.model.z_dim})"
            )
        for s in self.skips:
            if not 0 <= s < self.depth - 1:
                raise ConfigError(f"model.field.skips entry {s} must lie in [0, model.field.depth - 1 = {self.depth - 1})")


@dataclass
class RenderConfig:
    """Volume rendering along each ray."""

    samples_per_ray: int = bounded(24, gt=0)
    """Stratified depth samples per ray on [near, far] (GRAF and graf_ccsr: 64)."""
    importance_samples: int = bounded(0, ge=0)
    """Extra samples per ray from the hierarchical pass (0 = off): NeRF's coarse-to-fine with
    GRAF's one network. The coarse pass (no graph) draws this many depths from its weights and
    the union (samples_per_ray + this) is rendered again, so the field runs 2 S + I times per
    ray. With NeRF's left-point quadrature it is no equal-quality substitute for more stratified
    samples on hard-edged scenes: 16 + 16 is further from the analytic sphere than 64 (and 16)
    stratified samples (tests/test_render_fewer_points.py); ``bound_radius`` is the switch that
    does that."""
    perturb: bool = True
    """Jitter the stratified samples during training."""
    density_noise_std: float = bounded(1.0, ge=0)
    """Std of the noise added to raw density at iteration 0."""
    density_noise_decay_iters: int = bounded(500, ge=0)
    """The noise decays linearly to exactly 0 at this iteration (GRAF: 5000)."""
    white_background: bool = False
    """Composite on white instead of black."""
    bound_radius: float = bounded(0.0, ge=0)
    """Clip every ray to a ball of this radius around the origin (0 = off: samples span
    [near, far]). The samples are spread over the part of [near, far] inside the ball, so the
    same samples_per_ray sample the object more densely (about 4x at the default camera with
    0.37, the ball holding every embedded object); the last sample's interval ends at the ball
    (the plain render's last interval reaches infinity). Rays that miss the ball get
    zero-length intervals: zero opacity, colour and depth (the background), and the field is
    not evaluated for them (with autograd too: their gradient would be zero). CHANGES THE MATHS:
    anything the field puts outside the ball is not rendered."""
    termination_transmittance: float = bounded(0.0, ge=0, lt=1)
    """Early ray termination in renders without autograd (D-step fakes with
    ``memory.fakes_without_graph``, samples, evaluation; 0 = off): samples are processed front to
    back in depth chunks of ``termination_chunk`` and a ray whose transmittance has fallen below
    this is not evaluated further (its live rays gathered, results scattered back). Differs from
    the full render by at most this value in opacity and in colour (in [0, 1] units; twice that in
    [-1, 1]) and ``far`` x this in depth. Renders with autograd (the G step) and renders traced
    under FakeTensorMode (the estimator) use the full render."""
    termination_chunk: int = bounded(8, gt=0)
    """Samples per ray evaluated between two transmittance checks (with termination). The first
    check follows the first chunk: at or above ``samples_per_ray`` termination never saves a point."""
    fine_network: bool = False
    """graf_ccsr's newest hierarchical sampling (commit e905243): a SECOND radiance field of the
    same shape (its own class embedding and LayerNorm) renders the merged samples_per_ray +
    importance_samples depths; the first field's coarse pass only places the importance
    samples; the colour is the fine pass's (needs importance_samples > 0). Off: one field for
    both passes (GRAF)."""
    coarse_loss: Literal["match_fine", "none"] = "match_fine"
    """With ``fine_network``: what trains the coarse network. ``match_fine`` (ours): in the G step
    the coarse pass is rendered with autograd and pulled towards the fine render of the same z
    and pose, MSE(coarse, fine.detach()) x ``coarse_loss_weight``, so that its weights place the
    importance samples where the fine network puts matter (NeRF's loss on each pass, with the
    fine render as the coarse pass's target). ``none``: upstream graf_ccsr, where the coarse
    output enters no loss: THE COARSE NETWORK NEVER TRAINS (a frozen random network places the
    importance samples; a warning says so)."""
    coarse_loss_weight: float = bounded(1.0, ge=0)
    """Weight of the ``match_fine`` loss (``loss/coarse``)."""
    rays_through: Literal["pixel_centres", "pixel_corners"] = "pixel_centres"
    """Where the generator's rays cross their pixels. ``pixel_centres`` (ours): direction
    x = (i + 1/2 - W/2) / f, where the real images are sampled. ``pixel_corners``: GRAF's, NeRF's
    and graf_ccsr's x = (i - W/2) / f, half a pixel (of the data's image size) up and left of
    the real pixel it is compared with."""

    def check(self, root: "Config") -> None:
        if self.fine_network and self.importance_samples <= 0:
            raise ConfigError("model.render.fine_network=true needs model.render.importance_samples > 0 "
                              "(the fine network renders the hierarchical pass)")
        if self.bound_radius > 0 and self.bound_radius >= root.camera.radius:
            raise ConfigError(
                f"model.render.bound_radius={self.bound_radius} must be smaller than camera.radius="
                f"{root.camera.radius} (the cameras must lie outside the ball)"
            )


@dataclass
class CCSRConfig:
    """Consistency-controlled super-resolution (CCLC codes, SR net, CEM)."""

    mode: Literal["off", "regularizer", "discriminator"] = "regularizer"
    """``regularizer`` (graf_ccsr's use, the default: the SR output only feeds a consistency loss,
    computed in the G step); ``discriminator`` (render at P, super-resolve to scale * P, D sees
    scale * P: real extra resolution); ``off`` (GRAF without CCSR)."""
    variant: Literal["ours", "graf_ccsr"] = "ours"
    """``ours``: a batched scale-``scale`` SR of the patch (P -> scale * P), codes sampled with
    the patch's grid, a residual upsampled input, CEM by blur + area downsampling. ``graf_ccsr``
    (regularizer mode only, the only mode the original had): the original's computation and cost,
    ONE SAMPLE AT A TIME (a Python loop over the batch): the patch is shrunk to ``lr_size``^2
    (bilinear), upsampled to ``code_resolution``^2 (bilinear), concatenated with that view's whole
    code image (not sampled with the patch grid), ``num_layers`` 3x3 convs + LeakyReLU and a conv
    to 3 * scale^2 channels at that size, PixelShuffle(scale), LeakyReLU 0.2, clamp to [-1, 1], a
    CEM that blurs, resizes to the lr_size^2 input and adds half the residual resized back, then a
    bilinear resize back to the patch size P: ``super_resolve`` returns (B, 3, P, P) and the
    consistency loss compares it with the render as is. graf_ccsr at 64^2 patches: lr_size 16,
    code_resolution 64, scale 4 (64^2 -> 256^2)."""
    lr_size: int = bounded(0, ge=0)
    """``graf_ccsr`` variant only: side the rendered patch is shrunk to before the SR network
    (0 = the original's max(8, patch side // 4): 16 at 64^2 patches)."""
    scale: Literal[1, 2, 3, 4, 8] = 2
    """Super-resolution factor."""
    num_views: int = bounded(8, gt=0)
    """Azimuth bins of per-view latent codes (8 = 45 degree bins)."""
    code_resolution: int = bounded(0, ge=0)
    """Side of each per-view latent image; 0 = the data's image size. Codes are sampled with
    the patch grid, so they stay aligned with the image."""
    code_init_std: float = bounded(0.01, ge=0)
    """Std of the codes' N(0, 1) * std initialisation."""
    hidden_channels: int = bounded(64, gt=0)
    """Channels of the SR network's 3x3 convolutions."""
    num_layers: int = bounded(3, ge=0)
    """3x3 conv layers before the PixelShuffle head."""
    cem_blur: Literal["box", "gaussian"] = "box"
    """Blur of the consistency-enforcing module."""
    cem_kernel: int = bounded(3, gt=0)
    """Blur kernel size (odd)."""
    cem_sigma: float = bounded(1.0, gt=0)
    """Gaussian blur sigma (``gaussian`` only)."""
    cem_padding: Literal["replicate", "zeros"] = "replicate"
    """Border of the CEM's blur: ``replicate`` (ours: borders are not darkened) or ``zeros``
    (graf_ccsr's conv padding, which pulls the border pixels of the blurred image towards 0)."""
    cem_weight: float = 0.5
    """Weight of the back-projected residual (graf_ccsr: 0.5; 1.0 = projection)."""
    consistency_weight: float = bounded(1.0, ge=0)
    """alpha(t) = consistency_weight * exp(-consistency_decay * t)."""
    consistency_decay: float = bounded(1e-4, ge=0)
    """Decay rate of alpha(t) per iteration."""

    def check(self, root: "Config") -> None:
        if self.cem_kernel % 2 == 0:
            raise ConfigError(f"model.ccsr.cem_kernel={self.cem_kernel} must be a positive odd number")
        if 360 % self.num_views:
            raise ConfigError(f"model.ccsr.num_views={self.num_views} must divide 360 (azimuth bins of whole degrees)")
        if self.variant == "graf_ccsr" and self.mode == "discriminator":
            raise ConfigError(
                f"model.ccsr.variant=graf_ccsr needs model.ccsr.mode=regularizer (got {self.mode}): the original's "
                "SR output is only compared with the render at the patch size, it never feeds D"
            )
        if self.mode != "off" and self.scale < 2:
            raise ConfigError(f"model.ccsr.scale={self.scale} must be >= 2 when model.ccsr.mode={self.mode}")
        if self.mode == "discriminator":
            hr = root.model.patch.side * self.scale
            if hr > root.data.image_size:
                raise ConfigError(
                    f"model.ccsr.scale={self.scale} with a {root.model.patch.side}px patch needs real patches of "
                    f"{hr}px, larger than data.image_size={root.data.image_size}; lower model.ccsr.scale or "
                    "model.patch.rays_per_patch"
                )
            if hr > 256:
                raise ConfigError(f"model.ccsr.scale * patch side = {hr} exceeds the discriminator's 256px limit")


@dataclass
class DiscriminatorConfig:
    """GRAF's DCGAN-style patch discriminator."""

    variant: Literal["graf", "graf_ccsr"] = "graf"
    """``graf``: channels ``base_channels * 2^k`` per level (capped at ``max_channels``), ``norm``
    after every conv but the first, spectral norm per ``spectral_norm``, conv biases, the class
    one-hot only with more than one class, an aux head only with ``aux_classifier``.
    ``graf_ccsr``: the original's D, which depends on the patch side (``norm``, ``spectral_norm``
    and ``base_channels`` unused; M = ``max_channels``, 512 in the original): 64^2: spectral-norm
    conv to M/8 (no norm), spectral-norm conv to M/4 + InstanceNorm (no affine), conv to M/2 +
    BatchNorm, conv to M + BatchNorm; 32^2: conv to M/4 + BatchNorm, then M/2, M as at 64^2;
    128^2: spectral-norm convs to M/16 (no norm), M/8 and M/4 (+ InstanceNorm), then M/2, M
    (+ BatchNorm), and no class channels (the original crashes with them: refused); 16^2 (not in
    the original, for scaled-down recipes): the 32^2 branch without its first level. All 4x4
    stride-2 convs, no biases, LeakyReLU 0.2, the class one-hot channels always (even with one
    class), a 4x4 stride-1 output conv, and a label head (1x1 conv to M/2, BatchNorm, LeakyReLU,
    global average pool, 1x1 conv to the classes or sum(n_each_task)) computed on every call and
    unused unless ``aux_classifier``."""
    base_channels: int = bounded(32, gt=0)
    """Channels of the first 4x4 stride-2 conv; doubles per level (GRAF: 64)."""
    max_channels: int = bounded(512, gt=0)
    """Cap on channels per level."""
    spectral_norm: bool = True
    """Spectral normalisation on every conv (graf_ccsr: none)."""
    norm: Literal["instance", "batch", "none"] = "instance"
    """Normalisation after every conv but the first (graf_ccsr: batch)."""
    class_conditioning: bool = True
    """Class one-hot as extra input channels."""
    aux_classifier: bool = False
    """Auxiliary multi-task classification head (ACGAN-style, D and G)."""
    n_each_task: List[int] = _list()
    """Logit slice size of each task (empty = one task over the data's classes)."""

    def check(self, root: "Config") -> None:
        for i, n in enumerate(self.n_each_task):
            if n < 2:
                raise ConfigError(f"model.discriminator.n_each_task[{i}]={n} must be >= 2")
        if self.variant == "graf_ccsr":
            ccsr = root.model.ccsr
            size = root.model.patch.side * (ccsr.scale if ccsr.mode == "discriminator" else 1)
            if size not in (16, 32, 64, 128):
                raise ConfigError(f"model.discriminator.variant=graf_ccsr has no discriminator for {size}px patches "
                                  "(the original's: 32, 64, 128; ours adds 16)")
            if size == 128 and self.class_conditioning:
                raise ConfigError("model.discriminator.variant=graf_ccsr at 128px patches has no class channels (the "
                                  "original crashes with them): set model.discriminator.class_conditioning=false")
            if self.max_channels % 16:
                raise ConfigError(f"model.discriminator.max_channels={self.max_channels} must be a multiple of 16 "
                                  "with variant=graf_ccsr (its levels have M/16 ... M channels)")


@dataclass
class OccupancyConfig:
    """An occupancy grid the generator keeps for itself (NerfAcc's ``OccGridEstimator`` for a
    latent-conditioned generator): a cube of ``resolution``^3 cells per class, each holding an
    exponential moving average of the maximum density of the generator's own radiance field
    over ``latent_draws`` latent codes (never the data). Rays place their samples (``samples_per_ray``,
    or one per ``sample_spacing`` of occupied length) only in the cells switched on (stratified over
    the occupied length, jittered in training); rays that cross no such cell render the background and are not evaluated.
    All cells stay on for the first ``warmup_iters`` iterations; at the end of them every cell is
    evaluated, after that a random ``update_fraction`` of the cells plus as many of the occupied
    ones, every ``update_every`` iterations. A cell is on when its
    value exceeds the threshold below (NerfAcc also lowers it to the mean value; not here, see
    :meth:`grafccsr.models.occupancy.OccupancyGrid.switch`), dilated by ``dilation`` cells. CHANGES THE MATHS where the field puts density in cells that are off (what the
    grid skips is bounded by ``threshold``, see tests/test_occupancy.py)."""

    enabled: bool = False
    """Use the grid (``+exp=fast`` does). Replaces ``model.render.bound_radius`` (refused together)."""
    resolution: int = bounded(64, ge=8, le=128)
    """Cells per side of the cube (memory: classes x resolution^3 x 5 bytes). With the default
    cube a cell is 0.072 wide at 64 (the embedded objects are 0.5-0.7 across), 0.14 at 32."""
    half_size: float = bounded(0.0, ge=0)
    """Half side of the origin-centred cube the grid covers; 0 = the smallest cube that holds
    every camera ray's [camera.near, camera.far] segment (2.29 with the default camera: nothing
    the cameras can see is outside). Smaller is finer; what lies outside is never rendered."""
    update_every: int = bounded(32, gt=0)
    """Iterations between two updates (NerfAcc's ``n`` of ``update_every_n_steps``: 16; an update
    costs classes x latent_draws field evaluations per cell evaluated, and this field is an MLP)."""
    warmup_iters: int = bounded(256, ge=0)
    """No cell is switched off before this iteration (NerfAcc's ``warmup_steps``); the grid's first
    update, after it, evaluates every cell. NerfAcc also evaluates every cell at each update of
    the warm-up: at ``ema_decay`` 0.6 what such an update records is mostly forgotten by the
    warm-up's end, and each costs 1.6 s on the CPU (64^3 cells, 2 classes, 2 draws)."""
    latent_draws: int = bounded(2, gt=0)
    """Latent codes per class drawn at each update; a cell's new value is the maximum density
    over them (the same draws on every torchrun rank: seeded by train.seed and the iteration)."""
    ema_decay: float = bounded(0.6, ge=0, lt=1)
    """value = max(value x ema_decay, new maximum) at each evaluation of a cell: cells the
    generator has emptied go dark. NerfAcc uses 0.95 over tens of thousands of steps; a
    generator's field holds densities up to ~12 during the warm-up where it later holds none, and
    at 0.95 such a maximum needs ~100 evaluations (thousands of iterations) to fall below the
    threshold: after 120 s of training its grid had 2.5 % of the cube above the threshold where the
    generator's field then held 0.5-0.9 % (README, "Fewer points per ray"). At 0.6, ~10."""
    threshold: float = bounded(0.01, gt=0, lt=1)
    """Opacity a cell may hold and still be switched off: its density threshold is
    -ln(1 - threshold) / (sqrt(3) x cell side), the density at which a ray crossing the cell
    along its diagonal loses this opacity (NerfAcc's ``occ_thre``, which thresholds
    density x step)."""
    update_fraction: float = bounded(0.0625, gt=0, le=1)
    """After warm-up, each update evaluates this fraction of all cells (uniformly random) plus
    as many cells drawn from the occupied ones (NerfAcc: a quarter each; an MLP field makes
    them dearer than NerfAcc's hash grids)."""
    dilation: int = bounded(1, ge=1, le=4)
    """Cells around every occupied cell that are switched on too (conservative: rays sample a
    margin around what the grid saw)."""
    sample_spacing: float = bounded(0.0, ge=0)
    """Depth (units of ``camera.near``/``far``) each sample stands for along the occupied length:
    a ray gets ceil(occupied length / this) samples, at most ``model.render.samples_per_ray``, one at
    the start of each equal stratum of its occupied length (NerfAcc's ``render_step_size``, with
    ``samples_per_ray`` as the cap): a ray that crosses only a few occupied cells (a margin, a
    floater) costs a few evaluations, not ``samples_per_ray``. 0 = every ray that crosses an occupied
    cell gets ``samples_per_ray``, spread over its occupied length. ``+exp=fast``: 0.125, the
    default job's spacing (24 samples over [1.5, 4.5])."""

    def check(self, root: "Config") -> None:
        if self.enabled and root.model.render.bound_radius > 0:
            raise ConfigError(
                f"model.occupancy.enabled=true with model.render.bound_radius={root.model.render.bound_radius}: "
                "the grid replaces the ball; set model.render.bound_radius=0 (to keep the grid inside a known "
                "region, set model.occupancy.half_size)")


@dataclass
class ModelConfig:
    z_dim: int = bounded(64, gt=0)
    """Latent size; split into z_shape_dim + z_appearance_dim (GRAF: 256)."""
    pose: PoseConfig = dc_field(default_factory=PoseConfig)
    patch: PatchConfig = dc_field(default_factory=PatchConfig)
    field: FieldConfig = dc_field(default_factory=FieldConfig)
    render: RenderConfig = dc_field(default_factory=RenderConfig)
    ccsr: CCSRConfig = dc_field(default_factory=CCSRConfig)
    discriminator: DiscriminatorConfig = dc_field(default_factory=DiscriminatorConfig)
    occupancy: OccupancyConfig = dc_field(default_factory=OccupancyConfig)


# --------------------------------------------------------------------------- train


@dataclass
class AmpConfig:
    """Mixed precision as named policies (guide item 11)."""

    policy: Literal["off", "generator", "generator_sr", "all"] = "off"
    """``off``; ``generator`` (radiance field + renderer under autocast); ``generator_sr``
    (+ CCSR); ``all`` (+ discriminator). R1 is always FP32."""
    dtype: Literal["bf16", "fp16"] = "bf16"
    """``bf16`` or ``fp16`` (fp16 uses one GradScaler per optimiser)."""


@dataclass
class TrainConfig:
    device: str = "auto"
    """``auto`` (cuda if available), ``cpu``, ``cuda`` or ``cuda:N``."""
    seed: int = 0
    """Seed of every random stream (models, batches, patches, latent codes)."""
    batch_size: int = bounded(8, gt=0)
    """Images per optimiser step (split into grad_accum_steps micro-batches)."""
    grad_accum_steps: int = bounded(1, gt=0)
    """Micro-batches accumulated per step: same effective batch, less memory."""
    max_iters: int = bounded(4000, gt=0)
    """Training iterations (one D step + one G step each)."""
    time_budget_s: float = bounded(0.0, ge=0)
    """Stop after this many seconds of training (0 = no limit), for equal-time comparisons;
    the clock runs from the first iteration and includes logging, samples and checkpoints."""
    snapshots: int = bounded(0, ge=0)
    """With a time budget: save ``snapshots/<k>.pt`` when the clock passes each of
    ``snapshot_fractions`` of it (0 = none)."""
    snapshot_fractions: List[float] = _list(0.1, 0.2, 0.4, 0.6, 0.8, 1.0)
    """Fractions of ``time_budget_s`` at which snapshots are saved (when ``snapshots`` > 0)."""
    optimizer: Literal["rmsprop", "adam"] = "rmsprop"
    """GRAF and graf_ccsr: RMSprop."""
    lr_g: float = bounded(6e-4, gt=0)
    """Generator learning rate (graf_ccsr: 6e-4; GRAF: 5e-4)."""
    lr_d: float = bounded(1e-4, gt=0)
    """Discriminator learning rate (GRAF and graf_ccsr: 1e-4)."""
    rmsprop_alpha: float = 0.99
    optim_eps: float = 1e-8
    adam_betas: List[float] = _list(0.0, 0.99)
    lr_milestones: List[int] = _list(80000, 120000, 150000)
    lr_gamma: float = 0.5
    r1_gamma: float = bounded(10.0, ge=0)
    """R1 weight in GRAF's units: the penalty is r1_gamma x the squared gradient of D's logit
    with respect to its input, summed over channels and AVERAGED over pixels and images
    (GAN_stability's compute_grad2 on B*N pixel rows). The same number means the same penalty
    as in GRAF (10) and graf_ccsr (80). Per image that is r1_gamma / N (N pixels in D's input)."""
    r1_every: int = bounded(1, gt=0)
    """Lazy R1: apply every k D steps, scaled by k."""
    aux_weight: float = bounded(1.0, ge=0)
    """Weight of the auxiliary multi-task classification loss (if enabled)."""
    ema_beta: float = bounded(0.99, ge=0, lt=1)
    """EMA of the generator used for samples and evaluation (0 = no EMA). GRAF: 0.999, which
    averages over ~1000 iterations; the short default job uses 0.99. graf_ccsr had none."""
    amp: AmpConfig = dc_field(default_factory=AmpConfig)
    compile: bool = False
    """torch.compile the radiance field (falls back to eager if unavailable)."""
    tf32: bool = True
    """Allow TF32 matmuls on CUDA."""
    log_every: int = bounded(10, ge=0)
    """Iterations per logged window of losses, throughput and memory (0 = only at the end)."""
    sample_every: int = bounded(250, ge=0)
    """Iterations between sample grids (0 = only at the end)."""
    eval_every: int = bounded(0, ge=0)
    """FID/KID cadence (0 = only at the end if eval.at_end)."""
    ckpt_every: int = bounded(500, ge=0)
    """Iterations between checkpoints (0 = only at the end)."""
    num_sample_views: int = bounded(8, gt=0)
    """Views in the sample grid."""
    dist_timeout_s: float = bounded(1800.0, gt=0)
    """Under torchrun: seconds a rank waits for the others in a collective before the job
    fails (rank 0 evaluates and samples while the others wait, so keep it above that)."""
    nan_policy: Literal["stop", "skip"] = "stop"
    """On a NaN/Inf loss: ``stop`` the run or ``skip`` the step."""
    progress: bool = True
    """Show a tqdm progress bar."""

    def check(self, root: "Config") -> None:
        if self.batch_size % self.grad_accum_steps:
            raise ConfigError(
                f"train.batch_size={self.batch_size} must be divisible by train.grad_accum_steps={self.grad_accum_steps}"
            )
        if len(self.adam_betas) != 2:
            raise ConfigError(f"train.adam_betas={list(self.adam_betas)} must have two entries")
        if not (self.device in ("auto", "cpu", "cuda") or self.device.startswith("cuda:")):
            raise ConfigError(f"train.device={self.device!r} is not allowed; choose auto, cpu, cuda or cuda:N")
        for i, f in enumerate(self.snapshot_fractions):
            if not 0.0 < f <= 1.0:
                raise ConfigError(f"train.snapshot_fractions[{i}]={f} must lie in (0, 1]")
        if self.snapshots and not self.time_budget_s:
            raise ConfigError("train.snapshots needs train.time_budget_s > 0 (snapshots are fractions of it)")


# --------------------------------------------------------------------------- memory


@dataclass
class MemoryConfig:
    """Every item of the memory guide as a switch, plus what it left out."""

    set_to_none: bool = True
    """Guide #3: zero_grad(set_to_none=...). False keeps zero-filled grad buffers."""
    loader_workers: int = bounded(0, ge=0)
    """Guide #2: DataLoader workers (capped at 4)."""
    prefetch_factor: int = bounded(2, gt=0)
    """Guide #2: batches prefetched per worker (only with workers > 0)."""
    persistent_workers: bool = True
    """Guide #2: keep workers alive between epochs (only with workers > 0)."""
    pin_memory: bool = True
    """Guide #2/#5: pinned host batches (only applied on CUDA)."""
    non_blocking: bool = True
    """Guide #5: asynchronous host-to-device copies."""
    eager_free: bool = True
    """Guide #6: `del` intermediates (fakes, D outputs, losses) as soon as used."""
    empty_cache_every: int = bounded(0, ge=0)
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
    at most ``checkpoint_segment_points`` points; backward recomputes one segment at a time."""
    checkpoint_segment_points: int = bounded(65536, gt=0)
    """Points (rays x samples) per checkpointed segment of the field (with ``grad_checkpoint``).
    The field's activations peak at about one segment's worth (~9 KB per point at GRAF's 8x256
    in fp32): smaller segments, lower peak, more Python overhead per step. Whole rays are kept
    together."""
    skip_empty_samples: bool = False
    """Not in the guide: in renders with autograd (the G step) the field's density is first
    evaluated without autograd at every sample, and only the samples where it (plus the density
    noise) is positive are evaluated again, with autograd. At the others ReLU gives zero opacity
    and a zero gradient, so images and gradients are the full render's (up to float rounding);
    what is saved is the graph (time and activation memory) of the empty samples, most of them
    (``perf/graph_points_per_ray`` against ``perf/points_per_ray``). Costs one density-only pass
    (the field's trunk) without autograd. The estimator's tracing renders in full."""
    render_chunk: int = bounded(0, ge=0)
    """Not in the guide: rays rendered per chunk (0 = all at once). No-grad renders (D-step
    fakes, samples, eval) are segmented anyway (``no_grad_segment_points``)."""
    no_grad_segment_points: int = bounded(65536, gt=0)
    """Renders without autograd (the D step's fakes, samples, evaluation) run the field on at
    most this many points at a time: the same result, with the MLP's temporaries bounded (an
    evaluation batch of 32 whole 64x64 images at 64 samples is 8.4 M points)."""
    track_peak_every: int = bounded(50, ge=0)
    """Measure the device-agnostic peak (live tensor bytes) on every N-th iteration (and the
    first two); 0 = never. Other steps run untouched."""


# --------------------------------------------------------------------------- eval / tracking


@dataclass
class EvalConfig:
    extractor: Literal["random-features", "inception-v3-compat"] = "random-features"
    """``random-features`` (offline, seeded random CNN: NOT comparable with papers; its
    metrics are logged as ``eval/fid_rf``, ``eval/kid_rf_*``) or ``inception-v3-compat``
    (torch-fidelity's standard FID network: ``eval/fid``, ``eval/kid_*``)."""
    weights_path: Optional[str] = None
    """Local file with the inception-v3-compat weights (offline clusters)."""
    num_samples: int = bounded(256, gt=0)
    """Fakes generated for FID/KID (GRAF: 1000; ``eval=graf``)."""
    kid_subset_size: int = bounded(0, ge=0)
    """Samples per KID subset (<= num_samples); 0 = min(100, num_samples), so that changing
    ``num_samples`` alone never needs a second key."""
    kid_subsets: int = bounded(50, gt=0)
    """Number of KID subsets (``eval=graf``: 100)."""
    batch_size: int = bounded(32, gt=0)
    """Images rendered/featurised per batch during evaluation."""
    resolution: int = bounded(0, ge=0)
    """Side of evaluated images; 0 = the data's image size."""
    best_metric: Literal["fid", "kid_mean"] = "fid"
    """Which keeps the best checkpoint (the extractor's FID or KID)."""
    at_end: bool = True
    """Evaluate once more at the end of training."""
    cache_dir: Optional[str] = None
    """Real-statistics cache (default ``<project>/data/fidelity-cache``)."""
    view_codes: int = bounded(4, gt=0)
    """Pose-matched metrics (``eval/view_*``, with ``data.holdout``): latent codes rendered at
    each held-out view; scores are reported as the mean over codes and for each class's best
    code (the one with the highest mean PSNR over the class's held-out views)."""
    view_opacity_threshold: float = bounded(0.5, gt=0, lt=1)
    """A rendered pixel is foreground for ``eval/view_iou`` when its opacity exceeds this."""
    view_grid_columns: int = bounded(8, gt=0)
    """Held-out views per class shown in the view grid (evenly spaced over the class's held-out
    views); the metrics use all of them."""

    @property
    def kid_subset(self) -> int:
        """The KID subset size used: ``kid_subset_size``, or min(100, num_samples) when it is 0."""
        return self.kid_subset_size or min(100, self.num_samples)

    def check(self, root: "Config") -> None:
        if self.kid_subset_size > self.num_samples:
            raise ConfigError(
                f"eval.kid_subset_size={self.kid_subset_size} must be <= eval.num_samples={self.num_samples} "
                "(or 0: min(100, num_samples))"
            )
        if self.weights_path:
            if not Path(self.weights_path).expanduser().is_file():
                raise ConfigError(f"eval.weights_path={self.weights_path!r} is not a file")


@dataclass
class TrackingConfig:
    backend: Literal["mlflow", "none"] = "mlflow"
    """``mlflow`` or ``none`` (``metrics.json`` is written either way)."""
    uri: Optional[str] = None
    """MLflow tracking URI (default ``sqlite:///<project>/mlflow.db``)."""
    experiment: str = "grafccsr"
    """MLflow experiment name."""
    run_name: Optional[str] = None
    """MLflow run name (default: the preset and the run folder's name)."""
    parent_run_id: Optional[str] = None
    """Make the run a nested child of this run (sweeps)."""
    log_checkpoints: bool = False
    """Upload every checkpoint (``checkpoints/<iteration>/``) so that evaluation and resume
    work on machines without the run folder."""
    system_metrics: bool = True
    """Log MLflow's system metrics (CPU/GPU utilisation and memory, ``system/*``) beside ours;
    needs psutil (and nvidia-ml-py for GPUs)."""
    system_metrics_interval_s: float = bounded(10.0, gt=0)
    """Seconds between system-metric samples."""
    tags: Dict[str, str] = dc_field(default_factory=dict)
    """Extra MLflow tags."""
    request_timeout_s: int = bounded(10, gt=0)
    """Seconds one HTTP request to a tracking server may wait for an answer (sets MLflow's
    ``MLFLOW_HTTP_REQUEST_TIMEOUT``; MLflow's own default is 120). The start-up check of the
    server waits this long once, without retries."""
    request_retries: int = bounded(2, ge=0, le=10)
    """Retries of a failed HTTP request, 1 s then 2 s apart (MLflow's
    ``MLFLOW_HTTP_REQUEST_MAX_RETRIES``, with ``MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR=1``; MLflow's
    defaults, 7 retries with factor 2, wait about 4 minutes). Tracking calls run on a background
    thread, so training never waits for them."""
    lost_retry_s: float = bounded(30.0, gt=0)
    """After the server stopped answering, try it again this often; metrics meanwhile are kept
    and sent when it is back, images and checkpoint uploads are skipped (they stay in the run
    folder)."""


@dataclass
class Config:
    camera: CameraConfig = dc_field(default_factory=CameraConfig)
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
