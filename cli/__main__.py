"""``python -m repdissect.cli`` = the ``repdissect`` command."""

import sys

from . import main

if __name__ == "__main__":
    sys.exit(main())
