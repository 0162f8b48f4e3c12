"""``train.compile``: torch.compile the radiance field(s), with a fallback to eager."""

from __future__ import annotations

import sys
from contextlib import contextmanager
from typing import Iterator, List, Tuple

import torch


def field_slots(generator: torch.nn.Module) -> List[Tuple[torch.nn.Module, str]]:
    """(owner, attribute) of every radiance field of ``generator``: its ``field`` and, with a fine
    network, ``generator.fine.field``."""
    slots = [(generator, "field")]
    if getattr(generator, "fine", None) is not None:
        slots.append((generator.fine, "field"))
    return slots


def compile_field(generator: torch.nn.Module) -> bool:
    """Compile the generator's fields in place; False (and eager) when compiling fails.

    torch.compile only fails when the compiled function first runs, so a tiny
    forward pass is made here: a missing compiler or an unsupported platform then
    shows up at start-up instead of in the first training step.
    """
    compiled = []
    try:
        for owner, name in field_slots(generator):
            field = getattr(owner, name)
            fn = torch.compile(field)
            param = next(field.parameters())
            zs, za = field.shape_input_dim, field.cfg.z_appearance_dim
            points = torch.zeros(1, 2, 3, device=param.device)
            dirs = torch.nn.functional.normalize(torch.ones(1, 2, 3, device=param.device), dim=-1)
            with torch.no_grad():
                fn(points, dirs, torch.zeros(1, zs, device=param.device), torch.zeros(1, za, device=param.device))
            compiled.append((owner, name, fn))
    except Exception as err:  # platforms without a working compiler
        print(f"torch.compile unavailable ({type(err).__name__}: {str(err).splitlines()[0]}); running eager",
              file=sys.stderr)
        return False
    for owner, name, fn in compiled:
        setattr(owner, name, fn)
    return True


def is_compiled(generator: torch.nn.Module) -> bool:
    return any(hasattr(getattr(owner, name), "_orig_mod") for owner, name in field_slots(generator))


def uncompile(generator: torch.nn.Module) -> None:
    """Put the eager fields back (a compiled field that failed on its first real call)."""
    for owner, name in field_slots(generator):
        field = getattr(owner, name)
        setattr(owner, name, getattr(field, "_orig_mod", field))


@contextmanager
def eager_fields(generator: torch.nn.Module) -> Iterator[None]:
    """Run the eager fields for the duration (FLOP counting: Inductor's kernels bypass the
    counter; the same maths), then restore what was there."""
    saved = [(owner, name, getattr(owner, name)) for owner, name in field_slots(generator)]
    uncompile(generator)
    try:
        yield
    finally:
        for owner, name, field in saved:
            setattr(owner, name, field)
