"""``python -m grafccsr.sweep``: see :mod:`grafccsr.cli.sweep`."""

import sys

from grafccsr.cli.sweep import main

if __name__ == "__main__":
    sys.exit(main())
