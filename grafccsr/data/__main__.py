"""``python -m grafccsr.data``: see :mod:`grafccsr.cli.data`."""

import sys

from grafccsr.cli.data import main

if __name__ == "__main__":
    sys.exit(main())
