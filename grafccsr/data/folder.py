"""Real multi-view data in graf_ccsr's layout, loaded and validated up front.

Layout: ``<root>/<class>/<elevPrefix>_<azimuthDeg>.<ext>``, e.g. ``0.5_0090.jpg``.
Sorted class-folder names give the class index; the prefix is looked up in
``data.elevation_prefixes`` (exact string match) and gives the elevation index;
the azimuth is a whole number of degrees in [0, 360). Every image is decoded at
construction, so a bad file stops the run at start-up with its path in the
message instead of crashing a training run hours later.
"""

from __future__ import annotations

import hashlib
import os
import re
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Sequence, Tuple

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from grafccsr.config import DataConfig
from grafccsr.data.errors import DatasetError
from grafccsr.data.holdout import describe_split, held_out_mask

IMAGE_EXTENSIONS = frozenset(
    {".png", ".jpg", ".jpeg", ".bmp", ".webp", ".tif", ".tiff", ".gif", ".ppm", ".pgm", ".pnm", ".tga"}
)
"""Files with these suffixes (any case) must be views; other files are ignored."""
_DEGREES = re.compile(r"[0-9]+")
_SIXTEEN_BIT_MODES = frozenset({"I;16", "I;16L", "I;16B", "I;16N"})


@dataclass(frozen=True)
class ViewFile:
    path: Path
    class_idx: int
    elev_idx: int
    azimuth_deg: int


def is_image_file(path: Path) -> bool:
    """A non-hidden file with an image suffix (``.DS_Store``, ``manifest.json`` are not)."""
    return not path.name.startswith(".") and path.suffix.lower() in IMAGE_EXTENSIONS


def parse_view_name(path: Path, prefixes: Sequence[str]) -> Tuple[int, int]:
    """``<elevPrefix>_<azimuthDeg>.<ext>`` -> (elevation index, azimuth degrees)."""
    prefix, sep, degrees = path.stem.rpartition("_")
    if not sep or not prefix or not _DEGREES.fullmatch(degrees):
        raise DatasetError(
            f"{path}: cannot parse the file name; expected <elevPrefix>_<azimuthDeg>.<ext> with "
            f"elevPrefix one of {list(prefixes)} (data.elevation_prefixes) and a whole-degree "
            f"azimuth in [0, 360), e.g. {prefixes[0]}_0090{path.suffix}"
        )
    if prefix not in prefixes:
        raise DatasetError(
            f"{path}: elevation prefix {prefix!r} is not one of data.elevation_prefixes {list(prefixes)}"
        )
    azimuth = int(degrees)
    if azimuth >= 360:
        raise DatasetError(f"{path}: azimuth {azimuth} is outside [0, 360)")
    return list(prefixes).index(prefix), azimuth


def scan_folder(root: Path, prefixes: Sequence[str]) -> Tuple[List[str], List[ViewFile]]:
    """Class names (sorted) and every view, ordered by (class, elevation, azimuth)."""
    if not root.is_dir():
        what = "is not a folder" if root.exists() else "does not exist"
        raise DatasetError(f"dataset folder {root} {what} (data.root)")
    top = _entries(root)
    class_dirs = [p for p, st in top if stat.S_ISDIR(st.st_mode)]
    if not class_dirs:
        loose = sum(1 for p, st in top if stat.S_ISREG(st.st_mode) and is_image_file(p))
        hint = f"; it holds {loose} images itself: point data.root at the folder above the class folders"
        raise DatasetError(
            f"dataset folder {root} has no class sub-folders "
            f"(expected <root>/<class>/<elevPrefix>_<azimuthDeg>.<ext>){hint if loose else ''}"
        )
    views: List[ViewFile] = []
    for class_idx, class_dir in enumerate(class_dirs):
        images = [p for p, st in _entries(class_dir) if is_image_file(p) and _regular(p, st)]
        if not images:
            raise DatasetError(
                f"class folder {class_dir} holds no images (expected <elevPrefix>_<azimuthDeg>.<ext>, "
                f"ext one of {sorted(IMAGE_EXTENSIONS)})"
            )
        seen: Dict[Tuple[int, int], Path] = {}
        for path in images:
            pose = parse_view_name(path, prefixes)
            if pose in seen:
                raise DatasetError(f"{path} and {seen[pose].name} name the same pose in {class_dir}")
            seen[pose] = path
            views.append(ViewFile(path, class_idx, *pose))
    views.sort(key=lambda f: (f.class_idx, f.elev_idx, f.azimuth_deg))
    return [p.name for p in class_dirs], views


def _entries(folder: Path) -> List[Tuple[Path, os.stat_result]]:
    """The non-hidden entries of ``folder`` (sorted), followed through symbolic links. One that
    cannot be followed or read (a dangling or looping link, no permission) stops the run with
    its name, like a corrupt image: it is never skipped silently."""
    try:
        paths = sorted(p for p in folder.iterdir() if not p.name.startswith("."))
    except OSError as err:
        raise DatasetError(f"{folder}: cannot list the folder ({err.strerror})") from err
    entries = []
    for path in paths:
        try:
            entries.append((path, path.stat()))
        except OSError as err:
            link = f" (a symbolic link to {os.readlink(path)})" if path.is_symlink() else ""
            raise DatasetError(f"{path}: cannot read it{link}: {err.strerror}") from err
    return entries


def _regular(path: Path, st: os.stat_result) -> bool:
    if not stat.S_ISREG(st.st_mode):
        raise DatasetError(f"{path}: named like an image but not a regular file")
    return True


def _to_rgb(img: Image.Image) -> Image.Image:
    """Any Pillow mode -> RGB; transparency is composited onto black (the background)."""
    if img.mode in _SIXTEEN_BIT_MODES:
        # convert() would clip 16-bit grey at 255 instead of rescaling it
        img = Image.fromarray((np.asarray(img).astype(np.uint16) >> 8).astype(np.uint8), "L")
    if "A" in img.getbands() or "transparency" in img.info:
        black = Image.new("RGBA", img.size, (0, 0, 0, 255))
        return Image.alpha_composite(black, img.convert("RGBA")).convert("RGB")
    return img.convert("RGB")


def load_image(path: Path, size: int, resize: str) -> torch.Tensor:
    """Decode one view -> uint8 (3, size, size). ``resize``: ``error`` or ``resize``."""
    try:
        with Image.open(path) as img:
            img.load()
            rgb = _to_rgb(img)
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as err:
        raise DatasetError(f"{path}: cannot read the image ({err})") from err
    width, height = rgb.size
    if (width, height) != (size, size):
        if resize == "error":
            raise DatasetError(
                f"{path}: image is {width}x{height} pixels but data.image_size={size}; "
                "set data.resize=resize to resize on load, or change data.image_size"
            )
        if width != height:
            raise DatasetError(
                f"{path}: image is {width}x{height}, not square; crop it first "
                "(resizing would change the camera's aspect ratio)"
            )
        # Pillow widens the bilinear kernel when shrinking, so this is antialiased
        rgb = rgb.resize((size, size), Image.BILINEAR)
    return torch.from_numpy(np.array(rgb)).permute(2, 0, 1)


class MultiViewFolder(Dataset):
    """Every view of every class, held in memory.

    Attributes:
        images: uint8 (N, 3, S, S), RGB.
        labels: int64 (N, 3) = (class index, elevation index, azimuth degrees).
        poses: float32 (N, 2) = (u, v) with u = deg / 360, v = data.elevation_v[elev].
        class_names: sorted class-folder names; ``num_classes`` of them.
        files: path of each view; ``image_size``: S.
        held_out: bool (N,), the views ``data.holdout`` (``holdout``) keeps out of training (the
            loader skips them, the pose-matched evaluation uses exactly them); ``holdout_record``
            says which.

    Items: ``dict(image=float32 (3, S, S) in [-1, 1], label=int64 (3,), pose=float32 (2,))``.
    """

    def __init__(self, root: Path | str, cfg: DataConfig):
        self.root = Path(root).expanduser()
        self.image_size = int(cfg.image_size)
        self.class_names, views = scan_folder(self.root, [str(p) for p in cfg.elevation_prefixes])
        self.num_classes = len(self.class_names)
        self.files = [view.path for view in views]
        self.images = torch.empty(len(views), 3, self.image_size, self.image_size, dtype=torch.uint8)
        for i, view in enumerate(views):
            self.images[i] = load_image(view.path, self.image_size, cfg.resize)
        self.labels = torch.tensor(
            [(view.class_idx, view.elev_idx, view.azimuth_deg) for view in views], dtype=torch.int64
        ).view(-1, 3)
        elevation_v = torch.tensor([float(v) for v in cfg.elevation_v], dtype=torch.float32)
        self.poses = torch.stack((self.labels[:, 2].float() / 360.0, elevation_v[self.labels[:, 1]]), dim=1)
        self.holdout = cfg.holdout
        self.held_out = held_out_mask(self.labels, cfg.holdout)
        self.holdout_record = describe_split(self.held_out, self.labels, [str(p) for p in cfg.elevation_prefixes])

    @property
    def train_indices(self) -> torch.Tensor:
        """Indices of the views training may see (all but ``held_out``)."""
        return (~self.held_out).nonzero().flatten()

    @property
    def holdout_indices(self) -> torch.Tensor:
        """Indices of the held-out views (``data.holdout``), ordered by (class, elevation, azimuth)."""
        return self.held_out.nonzero().flatten()

    @property
    def fingerprint(self) -> str:
        """16 hex digits of the decoded images, labels and class names (what training sees)."""
        if not hasattr(self, "_fingerprint"):
            h = hashlib.sha256("|".join(self.class_names).encode())
            h.update(self.labels.numpy().tobytes())
            h.update(self.images.numpy().tobytes())
            self._fingerprint = h.hexdigest()[:16]
        return self._fingerprint

    def __len__(self) -> int:
        return self.images.shape[0]

    def __getitem__(self, index: int) -> Dict[str, torch.Tensor]:
        return {
            "image": self.images[index].float() / 127.5 - 1.0,
            "label": self.labels[index],
            "pose": self.poses[index],
        }
