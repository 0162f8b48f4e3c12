"""``python -m grafccsr.memory``: see :mod:`grafccsr.cli.memory`."""

import sys

from grafccsr.cli.memory import main

if __name__ == "__main__":
    sys.exit(main())
