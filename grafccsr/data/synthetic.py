"""The embedded multi-view dataset, rendered procedurally and deterministically.

Each class is one "specimen": a small solid (a column on its footing, a block, a
capsule, a beam-column joint, a ball) with its own colours and an object-space
texture, lit by a light fixed in world space (Lambertian + ambient) on a black
background. The camera orbits the static object on the pose grid of the real
data (elevation levels x azimuth steps) with exactly the generator's camera
(:mod:`grafccsr.camera`), so the set is 3D-consistent: a perfect radiance field
could reproduce every image.

The set is written like a real one, ``<root>/<class>/<elevPrefix>_<deg:04d>.png``,
plus ``manifest.json``. It is rendered into a hidden staging folder that is
renamed into place only once complete (manifest last), and it is reused when a
complete set with the same fingerprint is already there.
"""

from __future__ import annotations

import colorsys
import hashlib
import json
import math
import os
import random
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Tuple

import torch
import torch.nn.functional as F
from PIL import Image

from grafccsr.camera import full_grid, pose_matrix, rays_from_grid
from grafccsr.config import CameraConfig, ConfigError, DataConfig
from grafccsr.paths import DATA_DIR
from grafccsr.data.errors import DatasetError

GENERATOR = "grafccsr.data.synthetic"
GENERATOR_VERSION = 1
"""Bump whenever a change to this module changes the rendered bytes."""
MANIFEST = "manifest.json"

AMBIENT = 0.3
DIFFUSE = 0.7
LIGHT_DIR = (0.55, -0.45, 0.70)
"""Fixed in world space, so the orbiting camera sees a lit and a dark side."""
RAYS_PER_CHUNK = 1 << 20
"""Rays traced at once: big chunks amortise torch's per-op and thread-sync overhead
(several-fold on a busy 2-core machine); the render peaks at about 0.6 GB."""
_PNG_COMPRESS_LEVEL = 6
_GOLDEN = 0.618033988749895
"""Hue step between classes: consecutive classes land far apart on the colour wheel."""

Vec3 = Tuple[float, float, float]


# --------------------------------------------------------------------------- scene description


@dataclass(frozen=True)
class Primitive:
    """A solid in object space (z up). ``size``: box half extents (x, y, z);
    cylinder (radius, half height), axis along z; sphere (radius,)."""

    kind: str
    center: Vec3
    size: Tuple[float, ...]


@dataclass(frozen=True)
class Recipe:
    """A named union of primitives and the texture pattern painted on it.
    Every recipe of :data:`RECIPES` fits in a ball of radius 0.37 around the origin (the
    view's half-width there is 0.44 with the default camera); those of
    :data:`OFFSET_RECIPES` need 0.42."""

    name: str
    parts: Tuple[Primitive, ...]
    pattern: str


RECIPES: Tuple[Recipe, ...] = (
    Recipe(
        "column",
        (
            Primitive("cylinder", (0.0, 0.0, 0.07), (0.11, 0.24)),
            Primitive("box", (0.0, 0.0, -0.23), (0.16, 0.16, 0.06)),  # the footing
        ),
        "bands",
    ),
    Recipe("block", (Primitive("box", (0.0, 0.0, 0.0), (0.22, 0.13, 0.20)),), "checker"),
    Recipe(
        "capsule",
        (
            Primitive("cylinder", (0.0, 0.0, 0.0), (0.13, 0.17)),
            Primitive("sphere", (0.0, 0.0, 0.17), (0.13,)),
            Primitive("sphere", (0.0, 0.0, -0.17), (0.13,)),
        ),
        "stripes",
    ),
    Recipe(
        "joint",
        (
            Primitive("box", (0.0, 0.0, 0.0), (0.08, 0.08, 0.30)),
            Primitive("box", (0.0, 0.0, 0.12), (0.30, 0.08, 0.07)),  # the beam
        ),
        "bands",
    ),
    Recipe("ball", (Primitive("sphere", (0.0, 0.0, 0.0), (0.28,)),), "checker"),
)

OFFSET_RECIPES: Tuple[Recipe, ...] = (
    Recipe(
        "column_block",
        (
            Primitive("cylinder", (0.17, 0.07, 0.02), (0.06, 0.27)),  # a tall, thin column off the axis
            Primitive("box", (-0.145, -0.10, -0.20), (0.10, 0.075, 0.055)),  # a low block across from it
        ),
        "bands",
    ),
    Recipe(
        "pillar_slab",
        (
            Primitive("box", (-0.19, 0.085, 0.025), (0.05, 0.05, 0.265)),
            Primitive("box", (0.12, -0.12, -0.215), (0.125, 0.095, 0.04)),
        ),
        "checker",
    ),
)
"""``data.synthetic.scene=offset``: two objects per class, off-centre and of different heights,
so that the ball around the origin that holds them (radius 0.42) is mostly empty; every view of
the set keeps them inside the image."""

SCENES: Dict[str, Tuple[Recipe, ...]] = {"centred": RECIPES, "offset": OFFSET_RECIPES}


@dataclass(frozen=True)
class ClassStyle:
    """How one class looks: its recipe, colours (RGB in [0, 1]), texture frequency
    (cells per unit length) and rotation about the world z axis (radians)."""

    name: str
    recipe: Recipe
    base: Vec3
    accent: Vec3
    frequency: float
    rotation: float


def class_styles(num_classes: int, seed: int, scene: str = "centred") -> List[ClassStyle]:
    """Styles of all classes: shapes cycle through the ``scene``'s recipes (:data:`SCENES`), hues step by the
    golden ratio from a seeded start, frequency and rotation are seeded jitter.
    Names are zero-padded so that sorted folder names give the class index."""
    rng = random.Random(seed)
    hue0 = rng.random()
    width = len(str(num_classes - 1))
    styles = []
    for k in range(num_classes):
        recipe = SCENES[scene][k % len(SCENES[scene])]
        hue = (hue0 + k * _GOLDEN) % 1.0
        styles.append(
            ClassStyle(
                name=f"class{k:0{width}d}_{recipe.name}",
                recipe=recipe,
                base=colorsys.hsv_to_rgb(hue, 0.7, 0.95),
                # same hue, darker and greyer: the class colour dominates the mean
                accent=colorsys.hsv_to_rgb(hue, 0.4, 0.45),
                frequency=7.0 + 4.0 * rng.random(),
                rotation=2.0 * math.pi * rng.random(),
            )
        )
    return styles


# --------------------------------------------------------------------------- ray casting
# Rays: origins o and directions d (R, 3) in object space; directions are not unit
# length (camera-space z = -1), so t is depth along the optical axis, like near/far.
# Each primitive returns its first entry depth t (R,), inf on a miss, and the
# outward normal (R, 3) there (meaningless on a miss).

_EPS = 1e-12


def _hit_sphere(o: torch.Tensor, d: torch.Tensor, p: Primitive) -> Tuple[torch.Tensor, torch.Tensor]:
    center = torch.tensor(p.center)
    radius = p.size[0]
    oc = o - center
    a = (d * d).sum(-1)
    b = (oc * d).sum(-1)
    disc = b * b - a * ((oc * oc).sum(-1) - radius**2)
    t = (-b - disc.clamp(min=0).sqrt()) / a
    t = torch.where(disc >= 0, t, math.inf)
    normal = (oc + t.unsqueeze(-1) * d) / radius
    return t, normal


def _hit_cylinder(o: torch.Tensor, d: torch.Tensor, p: Primitive) -> Tuple[torch.Tensor, torch.Tensor]:
    radius, half_height = p.size
    oc = o - torch.tensor(p.center)
    # side wall: a quadratic in the xy plane, valid between the caps
    a = d[:, 0] ** 2 + d[:, 1] ** 2
    b = oc[:, 0] * d[:, 0] + oc[:, 1] * d[:, 1]
    disc = b * b - a * (oc[:, 0] ** 2 + oc[:, 1] ** 2 - radius**2)
    t_side = (-b - disc.clamp(min=0).sqrt()) / a.clamp(min=_EPS)
    z_side = oc[:, 2] + t_side * d[:, 2]
    t_side = torch.where((disc >= 0) & (a > _EPS) & (z_side.abs() <= half_height), t_side, math.inf)
    # cap: only the one on the camera's side can be entered from outside
    cap_sign = torch.sign(oc[:, 2])
    t_cap = (cap_sign * half_height - oc[:, 2]) / _nonzero(d[:, 2])
    on_cap = oc[:, :2] + t_cap.unsqueeze(-1) * d[:, :2]
    cap_ok = (oc[:, 2].abs() > half_height) & (t_cap > 0) & ((on_cap**2).sum(-1) <= radius**2)
    t_cap = torch.where(cap_ok, t_cap, math.inf)

    side_first = t_side <= t_cap
    hit_xy = oc[:, :2] + t_side.unsqueeze(-1) * d[:, :2]
    side_normal = torch.cat((hit_xy / radius, torch.zeros_like(t_side).unsqueeze(-1)), -1)
    cap_normal = torch.zeros_like(side_normal)
    cap_normal[:, 2] = cap_sign
    normal = torch.where(side_first.unsqueeze(-1), side_normal, cap_normal)
    return torch.minimum(t_side, t_cap), normal


def _slabs(o: torch.Tensor, d: torch.Tensor, p: Primitive) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Slab test of box ``p``: entry depth, exit depth (R,) and the axis entered last (R,)."""
    half = torch.tensor(p.size)
    oc = o - torch.tensor(p.center)
    inv = 1.0 / _nonzero(d)
    t1 = (-half - oc) * inv
    t2 = (half - oc) * inv
    t_near, axis = torch.minimum(t1, t2).max(-1)
    return t_near, torch.maximum(t1, t2).min(-1).values, axis


def _hit_box(o: torch.Tensor, d: torch.Tensor, p: Primitive) -> Tuple[torch.Tensor, torch.Tensor]:
    t_near, t_far, axis = _slabs(o, d, p)
    t = torch.where((t_near <= t_far) & (t_near > 0), t_near, math.inf)
    # the entry face is the slab entered last; its normal points against the ray
    normal = F.one_hot(axis, 3).to(d.dtype) * -torch.sign(d.gather(-1, axis.unsqueeze(-1)))
    return t, normal


def _nonzero(x: torch.Tensor) -> torch.Tensor:
    """``x`` with near-zero entries replaced by +eps, so that dividing by it gives
    huge finite depths instead of inf or NaN."""
    return torch.where(x.abs() < _EPS, torch.full_like(x, _EPS), x)


_HITS: Dict[str, Callable[[torch.Tensor, torch.Tensor, Primitive], Tuple[torch.Tensor, torch.Tensor]]] = {
    "sphere": _hit_sphere,
    "cylinder": _hit_cylinder,
    "box": _hit_box,
}


def _pattern(kind: str, p: torch.Tensor, frequency: float) -> torch.Tensor:
    """Texture mask in {0, 1} at object-space points p (R, 3) -> (R,)."""
    if kind == "checker":
        cells = torch.floor(p * frequency).sum(-1)
    elif kind == "bands":
        # horizontal bands x 8 vertical sectors: a checker in cylindrical coordinates
        sector = torch.floor(torch.atan2(p[:, 1], p[:, 0]) * (8 / (2 * math.pi)))
        cells = torch.floor(p[:, 2] * frequency) + sector
    elif kind == "stripes":
        axis = torch.tensor((0.5, 0.3, 0.81))
        cells = torch.floor((p @ axis) * frequency)
    else:
        raise ValueError(f"unknown texture pattern {kind!r}")
    return torch.remainder(cells, 2.0)


def _rotation_z(angle: float) -> torch.Tensor:
    """Object-to-world rotation (3, 3) about z."""
    c, s = math.cos(angle), math.sin(angle)
    return torch.tensor(((c, -s, 0.0), (s, c, 0.0), (0.0, 0.0, 1.0)))


def _bounding_box(recipe: Recipe) -> Primitive:
    """The object-space axis-aligned box around every part of ``recipe``."""
    lows, highs = [], []
    for part in recipe.parts:
        if part.kind == "box":
            half = part.size
        elif part.kind == "cylinder":
            half = (part.size[0], part.size[0], part.size[1])
        else:
            half = (part.size[0],) * 3
        lows.append([c - h for c, h in zip(part.center, half)])
        highs.append([c + h for c, h in zip(part.center, half)])
    low = [min(axis) for axis in zip(*lows)]
    high = [max(axis) for axis in zip(*highs)]
    return Primitive("box", tuple((a + b) / 2 for a, b in zip(low, high)), tuple((b - a) / 2 for a, b in zip(low, high)))


def shade_rays(style: ClassStyle, origins: torch.Tensor, dirs: torch.Tensor, near: float, far: float) -> torch.Tensor:
    """Colour of world-space rays (R, 3), (R, 3) -> RGB (R, 3) in [0, 1]; misses are black."""
    rot = _rotation_z(style.rotation)
    o, d = origins @ rot, dirs @ rot  # row vectors: x_obj = R^T x_world
    # trace only the rays that enter the bounding box: a small part of the image, and
    # the same bytes as tracing all of them
    t_near, t_far, _ = _slabs(o, d, _bounding_box(style.recipe))
    candidate = (t_near <= t_far) & (t_far > 0)
    rgb = torch.zeros_like(o)
    rgb[candidate] = _shade_object(style, o[candidate], d[candidate], rot, near, far)
    return rgb


def _shade_object(
    style: ClassStyle, o: torch.Tensor, d: torch.Tensor, rot: torch.Tensor, near: float, far: float
) -> torch.Tensor:
    """Colour of object-space rays (R, 3), (R, 3) -> RGB (R, 3); ``rot``: object-to-world (3, 3)."""
    hits = [_HITS[part.kind](o, d, part) for part in style.recipe.parts]
    depths = torch.stack([t for t, _ in hits])  # (P, R)
    depth, first = depths.min(0)
    normals = torch.stack([n for _, n in hits])  # (P, R, 3)
    normal = normals.gather(0, first.view(1, -1, 1).expand(1, -1, 3)).squeeze(0)
    visible = (depth >= near) & (depth <= far)

    point = o + torch.where(visible, depth, 0.0).unsqueeze(-1) * d
    mask = _pattern(style.recipe.pattern, point, style.frequency).unsqueeze(-1)
    albedo = torch.tensor(style.base) * (1 - mask) + torch.tensor(style.accent) * mask
    light = F.normalize(torch.tensor(LIGHT_DIR), dim=0)
    lambert = ((normal @ rot.T) @ light).clamp(min=0.0).unsqueeze(-1)
    rgb = albedo * (AMBIENT + DIFFUSE * lambert)
    return torch.where(visible.unsqueeze(-1), rgb, 0.0)


def render_views(
    style: ClassStyle, u: torch.Tensor, v: torch.Tensor, image_size: int, supersample: int, camera: CameraConfig
) -> torch.Tensor:
    """Render one class at poses u, v (B,) -> images (B, 3, image_size, image_size) in [0, 1].

    Traces ``supersample`` x ``supersample`` rays per pixel and averages them
    (anti-aliasing); views are batched into chunks of about RAYS_PER_CHUNK rays.
    """
    side = image_size * supersample
    views_per_chunk = max(1, RAYS_PER_CHUNK // (side * side))
    chunks = []
    for start in range(0, u.shape[0], views_per_chunk):
        uu, vv = u[start : start + views_per_chunk], v[start : start + views_per_chunk]
        c2w = pose_matrix(uu, vv, camera.radius)
        origins, dirs = rays_from_grid(c2w, full_grid(side, uu.shape[0]), camera.fov_deg)
        rgb = shade_rays(style, origins.reshape(-1, 3), dirs.reshape(-1, 3), camera.near, camera.far)
        images = rgb.view(uu.shape[0], side, side, 3).permute(0, 3, 1, 2)
        chunks.append(F.avg_pool2d(images, supersample))
    return torch.cat(chunks)


# --------------------------------------------------------------------------- the dataset on disk


def _settings(cfg: DataConfig, cam: CameraConfig) -> Dict[str, Any]:
    """Everything that changes the written bytes (hashed into the fingerprint)."""
    syn = cfg.synthetic
    return {
        "generator": GENERATOR,
        "generator_version": GENERATOR_VERSION,
        "image_size": int(cfg.image_size),
        "supersample": int(syn.supersample),
        "num_classes": int(syn.num_classes),
        "num_azimuths": int(syn.num_azimuths),
        "seed": int(syn.seed),
        "elevation_prefixes": [str(p) for p in cfg.elevation_prefixes],
        "elevation_v": [float(v) for v in cfg.elevation_v],
        **({"scene": syn.scene} if syn.scene != "centred" else {}),  # the centred set keeps its fingerprint
        "camera": {
            "fov_deg": float(cam.fov_deg),
            "radius": float(cam.radius),
            "near": float(cam.near),
            "far": float(cam.far),
        },
    }


def fingerprint(cfg: DataConfig, camera: CameraConfig) -> str:
    """12 hex digits identifying the bytes a build with ``cfg`` and ``camera`` writes."""
    blob = json.dumps(_settings(cfg, camera), sort_keys=True).encode()
    return hashlib.sha256(blob).hexdigest()[:12]


def synthetic_root(cfg: DataConfig, camera: CameraConfig, root: Optional[Path] = None) -> Path:
    """Where the set lives: ``root``, else ``cfg.root``, else ``<project>/data/synthetic-<fingerprint>``."""
    if root is None:
        root = Path(cfg.root) if cfg.root else DATA_DIR / f"synthetic-{fingerprint(cfg, camera)}"
    return Path(root).expanduser()


def _views(cfg: DataConfig) -> List[Tuple[int, int]]:
    """(elevation index, azimuth degrees) of every view, elevation-major."""
    step = 360 // cfg.synthetic.num_azimuths
    return [(e, k * step) for e in range(len(cfg.elevation_v)) for k in range(cfg.synthetic.num_azimuths)]


def _file_names(cfg: DataConfig) -> List[str]:
    return [f"{cfg.elevation_prefixes[e]}_{deg:04d}.png" for e, deg in _views(cfg)]


def read_manifest(root: Path) -> Optional[Dict[str, Any]]:
    """The manifest of a synthetic set in ``root``, or None if there is none (or it is not ours)."""
    try:
        manifest = json.loads((Path(root) / MANIFEST).read_text())
    except (OSError, ValueError):
        return None
    return manifest if isinstance(manifest, dict) and manifest.get("generator") == GENERATOR else None


def is_complete(root: Path, cfg: DataConfig, camera: CameraConfig) -> bool:
    """True if ``root`` holds a finished build of exactly ``cfg`` (manifest and every image)."""
    manifest = read_manifest(root)
    if manifest is None or manifest.get("fingerprint") != fingerprint(cfg, camera):
        return False
    names = _file_names(cfg)
    return all((root / cls / name).is_file() for cls in manifest["class_names"] for name in names)


def _check(cfg: DataConfig) -> None:
    """The invariants without which the written files would be wrong (not just odd)."""
    syn = cfg.synthetic
    if syn.num_classes < 1:
        raise ConfigError(f"data.synthetic.num_classes={syn.num_classes} must be >= 1")
    if syn.num_azimuths < 1 or 360 % syn.num_azimuths:
        raise ConfigError(
            f"data.synthetic.num_azimuths={syn.num_azimuths} must divide 360 (file names carry whole degrees)"
        )
    if syn.supersample < 1:
        raise ConfigError(f"data.synthetic.supersample={syn.supersample} must be >= 1")
    if cfg.image_size < 1:
        raise ConfigError(f"data.image_size={cfg.image_size} must be >= 1")
    if len(cfg.elevation_prefixes) != len(cfg.elevation_v):
        raise ConfigError("data.elevation_prefixes and data.elevation_v must have the same length")


def _render_into(folder: Path, cfg: DataConfig, camera: CameraConfig) -> None:
    """Write every image, then the manifest (so a manifest implies a finished build)."""
    styles = class_styles(cfg.synthetic.num_classes, cfg.synthetic.seed, cfg.synthetic.scene)
    views = _views(cfg)
    u = torch.tensor([deg / 360.0 for _, deg in views])
    v = torch.tensor([float(cfg.elevation_v[e]) for e, _ in views])
    names = _file_names(cfg)
    for style in styles:
        images = render_views(style, u, v, cfg.image_size, cfg.synthetic.supersample, camera)
        pixels = (images.clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
        (folder / style.name).mkdir()
        for name, image in zip(names, pixels):
            Image.fromarray(image, "RGB").save(
                folder / style.name / name, format="PNG", compress_level=_PNG_COMPRESS_LEVEL
            )
    manifest = {
        **_settings(cfg, camera),
        "fingerprint": fingerprint(cfg, camera),
        "class_names": [s.name for s in styles],
        "images_per_class": len(views),
        "num_images": len(views) * len(styles),
        "azimuth_step_deg": 360 // cfg.synthetic.num_azimuths,
    }
    (folder / MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")


def build_synthetic(cfg: DataConfig, camera: CameraConfig, root: Optional[Path] = None) -> Path:
    """Render the embedded set for ``cfg`` seen through ``camera`` (unless a complete copy
    exists) and return its folder.

    Layout: ``<root>/<class name>/<elevPrefix>_<deg:04d>.png`` + ``manifest.json``.
    The same config always gives the same bytes. A folder at ``root`` that is not
    a synthetic set is never overwritten (DatasetError); a stale or damaged
    synthetic set there is replaced.
    """
    _check(cfg)
    root = synthetic_root(cfg, camera, root)
    if is_complete(root, cfg, camera):
        return root
    if root.exists() and read_manifest(root) is None and (not root.is_dir() or any(root.iterdir())):
        raise DatasetError(
            f"{root} is not an empty folder and holds no synthetic-set manifest; refusing to overwrite it. "
            "Choose another data.root or empty the folder."
        )
    # a plain mkdir (not mkdtemp, which is private 0700) so the set gets the user's umask;
    # a leftover with our pid is from an earlier, killed process of the same id
    staging = root.parent / f".{root.name}.partial-{os.getpid()}"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    try:
        _render_into(staging, cfg, camera)
        # re-checked here: a concurrent build (parallel sweep trials) may have finished meanwhile
        if not is_complete(root, cfg, camera):
            if root.exists():
                shutil.rmtree(root)  # empty, stale or damaged; checked above that it is ours
            try:
                os.replace(staging, root)  # atomic: root never holds a half-written set
            except OSError:
                if not is_complete(root, cfg, camera):  # else the concurrent build won the race
                    raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return root
