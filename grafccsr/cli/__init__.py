"""Command-line entry points: one convention for every tool (see :mod:`grafccsr.cli.common`)."""
