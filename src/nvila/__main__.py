"""``python -m nvila``: the ``nvila`` command line (see cli.py)."""

import sys

from .cli import main

sys.exit(main())
