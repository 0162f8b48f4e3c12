"""Files of a run folder: written whole or not at all, and one error for a file system that
refuses them (full, a file-size limit, read-only, permission denied, an I/O error)."""

from __future__ import annotations

import errno
import logging
import os
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import BinaryIO, Callable, Iterator, List, Optional

PARTIAL_SUFFIX = ".tmp"
"""``<name>.tmp``: a file being written; it replaces ``<name>`` only once complete."""
DISK_ERRNOS = frozenset({errno.ENOSPC, errno.EFBIG, errno.EDQUOT, errno.EROFS, errno.EIO, errno.EACCES,
                         errno.EPERM})
"""What the file system answers when it cannot take a file: the run's fault is elsewhere."""


class WriteFailed(OSError):
    """A run file could not be written; names the file (the final name, not its ``.tmp``) and
    the OS error."""

    def __init__(self, path: Path, err: OSError) -> None:
        super().__init__(err.errno, err.strerror or str(err), str(path))
        self.path = Path(path)

    def __str__(self) -> str:
        return f"could not write {self.path}: [Errno {self.errno}] {self.strerror}"


def is_write_failure(err: BaseException) -> bool:
    """An OS error a full, limited, read-only or refusing file system raises."""
    return isinstance(err, OSError) and err.errno in DISK_ERRNOS


@contextmanager
def writing(path: Path) -> Iterator[None]:
    """Turn a file-system refusal inside the block into :class:`WriteFailed` naming ``path``."""
    try:
        yield
    except OSError as err:
        if isinstance(err, WriteFailed) or err.errno not in DISK_ERRNOS:
            raise
        raise WriteFailed(path, err) from None


def write_atomic(path: Path, write: Callable[[BinaryIO], None], sync: bool = True) -> Path:
    """Write ``path`` through ``<path>.tmp`` and a rename: a crash or a full disk mid-write
    leaves the previous file intact, and the partial file is removed."""
    path = Path(path)
    tmp = path.with_name(path.name + PARTIAL_SUFFIX)
    try:
        with writing(path):
            path.parent.mkdir(parents=True, exist_ok=True)
            with open(tmp, "wb") as fh:
                write(fh)
                fh.flush()
                if sync:
                    os.fsync(fh.fileno())
            os.replace(tmp, path)
    except BaseException:
        try:
            tmp.unlink(missing_ok=True)
        except OSError:  # a read-only file system keeps nothing partial anyway
            pass
        raise
    return path


def unwritable(folder: Path) -> Optional[str]:
    """Why files cannot be created in ``folder`` (or, when it does not exist yet, in the nearest
    folder above it that does), or None when they can. Tried for real, with a probe file: the
    permission bits say nothing about a read-only file system, nor about root."""
    target = Path(folder).absolute()
    existing = target
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        return f"{existing} is not a folder"
    try:
        fd, probe = tempfile.mkstemp(prefix=".grafccsr-probe-", dir=existing)
    except OSError as err:
        return f"[Errno {err.errno}] {err.strerror}: {existing}"
    os.close(fd)
    os.unlink(probe)
    return None


def log_files() -> List[Path]:
    """The files the root logger writes to: Hydra's ``<run folder>/train.log`` (none when the
    trainer runs without Hydra's logging, as in tests that call it directly)."""
    return [Path(h.baseFilename) for h in logging.getLogger().handlers if isinstance(h, logging.FileHandler)]
