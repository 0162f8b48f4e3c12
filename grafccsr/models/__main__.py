"""``python -m grafccsr.models``: see :mod:`grafccsr.cli.models`."""

import sys

from grafccsr.cli.models import main

if __name__ == "__main__":
    sys.exit(main())
