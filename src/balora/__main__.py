"""``python -m balora ...`` is the ``balora`` command (and ``accelerate launch -m balora train CONFIG``)."""

import sys

from balora.cli import main

if __name__ == "__main__":
    sys.exit(main())
