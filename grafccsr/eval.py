"""``python -m grafccsr.eval``: see :mod:`grafccsr.cli.eval`."""

import sys

from grafccsr.cli.eval import main

if __name__ == "__main__":
    sys.exit(main())
