"""``python -m grafccsr.bench``: see :mod:`grafccsr.cli.bench`."""

import sys

from grafccsr.cli.bench import main

if __name__ == "__main__":
    sys.exit(main())
