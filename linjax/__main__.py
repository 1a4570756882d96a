"""``python -m linjax``: same as the ``linjax`` console script."""

import sys

from linjax.cli import main

if __name__ == "__main__":
    sys.exit(main())
