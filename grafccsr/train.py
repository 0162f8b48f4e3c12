"""``python -m grafccsr.train``: see :mod:`grafccsr.cli.train`."""

from grafccsr.cli.train import main

if __name__ == "__main__":
    main()
