"""The command-line convention every tool follows.

* Config changes are Hydra overrides, given as positional ``key=value`` items (``+exp=NAME``
  and group choices like ``model=graf`` included) and composed with Hydra's compose API
  onto ``conf/`` (training uses ``@hydra.main``, which reads the same syntax).
* A tool's own options are ``--flags`` (argparse).
* Bad input is one line on stderr and a documented exit code (see
  :mod:`grafccsr.training.outcome`); a traceback means a bug.
"""

from __future__ import annotations

import argparse
import functools
import sys
from typing import Callable, Optional, Sequence

from grafccsr.config import ConfigError
from grafccsr.paths import program_name
from grafccsr.training.outcome import EXIT_CONFIG, EXIT_DATA, EXIT_INTERRUPTED, EXIT_OOM, is_out_of_memory


def error(message: str, code: int, prog: str = "grafccsr") -> int:
    """Print ``prog: error: message`` (one line) and return ``code``."""
    print(f"{prog}: error: {message}", file=sys.stderr)
    return code


def exit_code_for(err: BaseException, prog: str) -> Optional[int]:
    """The exit code for an expected failure (printed as one line), None for a bug."""
    # a DatasetError exists only where the data package was imported: importing it here would
    # pull in PIL, which the tools that need no images (and bare GPU machines) may lack
    data_errors = sys.modules.get("grafccsr.data.errors")
    if isinstance(err, ConfigError):
        return error(str(err), EXIT_CONFIG, prog)
    if data_errors is not None and isinstance(err, data_errors.DatasetError):
        return error(f"data: {err}", EXIT_DATA, prog)
    if isinstance(err, KeyboardInterrupt):
        return error("interrupted", EXIT_INTERRUPTED, prog)
    if is_out_of_memory(err):
        return error(f"out of memory: {str(err).strip().splitlines()[0]}", EXIT_OOM, prog)
    return None


def guarded(prog: str) -> Callable[[Callable[..., int]], Callable[..., int]]:
    """Decorate a ``main`` so that expected failures become one line and an exit code."""

    def wrap(main: Callable[..., int]) -> Callable[..., int]:
        @functools.wraps(main)
        def run(*args, **kwargs) -> int:
            try:
                return main(*args, **kwargs)
            except (Exception, KeyboardInterrupt) as err:
                code = exit_code_for(err, prog)
                if code is None:
                    raise
                return code

        return run

    return wrap


def add_overrides(parser: argparse.ArgumentParser, help_text: str = "Hydra overrides (key=value, +exp=NAME, model=graf)") -> None:
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help=help_text)


def parser(prog: str, description: str, epilog: Optional[str] = None) -> argparse.ArgumentParser:
    return argparse.ArgumentParser(prog=program_name(prog), description=description, epilog=epilog,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)


def check_overrides(overrides: Sequence[str]) -> None:
    """Reject items that are not ``key=value`` (a flag given after the overrides, a typo)."""
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"{item!r} is not a key=value override (flags start with --)")


def parse(parser: argparse.ArgumentParser, argv: Sequence[str]) -> argparse.Namespace:
    """Parse flags and ``key=value`` overrides in any order."""
    args = parser.parse_intermixed_args(list(argv))
    check_overrides(getattr(args, "overrides", []))
    return args


def run_subcommand(top: argparse.ArgumentParser, argv: Sequence[str]) -> int:
    """``prog COMMAND [flags and overrides in any order]``: dispatch to the subparser's ``func``."""
    subparsers = next(a for a in top._actions if isinstance(a, argparse._SubParsersAction))
    if not argv or argv[0] not in subparsers.choices:
        top.parse_args(list(argv))  # prints usage (or --help) and exits
    args = parse(subparsers.choices[argv[0]], argv[1:])
    return args.func(args)
