"""``python -m fxfactorize``: the command line (see :mod:`fxfactorize.cli`)."""

import sys

from fxfactorize.cli import main

if __name__ == "__main__":
    sys.exit(main())
