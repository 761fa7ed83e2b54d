"""``python -m beyond_cls``: the ``beyond-cls`` command."""

import sys

from beyond_cls.cli import main

if __name__ == "__main__":
    sys.exit(main())
