"""How the C library hands host memory back to the OS: ``memory.retain_host_memory``.

glibc serves blocks over its mmap threshold (at most 32 MiB) with ``mmap`` and unmaps
them on ``free``. A CPU training step allocates and frees many tensors of 100 MB and
more (a 131072 x 256 fp32 activation is 134 MB), so every iteration the kernel faults
in and zeroes those pages again: on this project's 2-core CPU a third of the step's time
was system time. Retaining freed memory (no mmap, no trimming of the heap) turns those
allocations into reuse of pages the process already owns. The price: the process's
resident size stays at its peak.

Process-wide and reversible (the benchmark switches it per row). Only glibc has
``mallopt``; elsewhere :func:`set_retain_host_memory` returns False and changes nothing.
"""

from __future__ import annotations

import ctypes
import platform
import warnings

# mallopt parameters (malloc.h)
M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
M_MMAP_MAX = -4

_INT_MAX = 2**31 - 1
_SYSTEM = {
    # glibc's steady state once a block of >= 32 MiB has been freed (its dynamic
    # threshold climbs to that maximum): what a long-running process of the
    # original code runs with
    M_MMAP_MAX: 65536,
    M_MMAP_THRESHOLD: 32 * 1024 * 1024,
    M_TRIM_THRESHOLD: 64 * 1024 * 1024,
}
_RETAIN = {M_MMAP_MAX: 0, M_TRIM_THRESHOLD: _INT_MAX}

_libc = None
_current: bool | None = None


def _mallopt():
    global _libc
    if _libc is None:
        if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
            _libc = False
        else:
            try:
                _libc = ctypes.CDLL("libc.so.6")
                _libc.mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
            except (OSError, AttributeError):
                _libc = False
    return _libc.mallopt if _libc else None


def host_allocator_supported() -> bool:
    return _mallopt() is not None


def set_retain_host_memory(retain: bool, warn: bool = True) -> bool:
    """Retain freed host memory in the process (True) or give large blocks back to the
    OS as glibc does by default (False). Returns whether the setting is in effect."""
    global _current
    mallopt = _mallopt()
    if mallopt is None:
        if retain and warn:
            warnings.warn("memory.retain_host_memory=true needs glibc's mallopt (Linux); "
                          "not available here, so the C library's default stays", stacklevel=2)
        return False
    if _current is retain:
        return True
    for param, value in (_RETAIN if retain else _SYSTEM).items():
        if mallopt(param, value) != 1:
            raise RuntimeError(f"mallopt({param}, {value}) failed")
    if _current and not retain:
        _libc.malloc_trim(0)  # give back what was retained, so the next user starts lean
    _current = retain
    return True


def retaining_host_memory() -> bool | None:
    """The last setting applied by this module (None: never set, the C library's default)."""
    return _current
