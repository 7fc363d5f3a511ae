"""``python -m nvila.train`` / ``torchrun --nproc_per_node N -m nvila.train``: see cli.py."""

import sys

from .cli import main

sys.exit(main())
