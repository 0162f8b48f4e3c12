"""``train.compile``: torch.compile the radiance field, with a fallback to eager."""

from __future__ import annotations

import sys

import torch


def compile_field(generator: torch.nn.Module) -> bool:
    """Compile ``generator.field`` in place; False (and eager) when compiling fails.

    torch.compile only fails when the compiled function first runs, so a tiny
    forward pass is made here: a missing compiler or an unsupported platform then
    shows up at start-up instead of in the first training step.
    """
    field = generator.field
    try:
        compiled = torch.compile(field)
        param = next(field.parameters())
        zs, za = field.cfg.z_shape_dim, field.cfg.z_appearance_dim
        points = torch.zeros(1, 2, 3, device=param.device)
        dirs = torch.nn.functional.normalize(torch.ones(1, 2, 3, device=param.device), dim=-1)
        with torch.no_grad():
            compiled(points, dirs, torch.zeros(1, zs, device=param.device), torch.zeros(1, za, device=param.device))
    except Exception as err:  # platforms without a working compiler
        print(f"torch.compile unavailable ({type(err).__name__}: {str(err).splitlines()[0]}); running eager",
              file=sys.stderr)
        return False
    generator.field = compiled
    return True
