"""``python -m repdissect.pipeline`` = the ``repdissect`` command."""

import sys

from ._cli import main

if __name__ == "__main__":
    sys.exit(main())
