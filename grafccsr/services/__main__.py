"""``python -m grafccsr.services``: see :mod:`grafccsr.cli.services`."""

import sys

from grafccsr.cli.services import main

if __name__ == "__main__":
    sys.exit(main())
