"""``python -m nvila.server [--model PATH] ...``: the same as ``nvila serve`` (see cli.py)."""

import argparse
import logging
import sys

from ..bundled import default_model_path
from .cli import HELP, add_arguments, run

parser = argparse.ArgumentParser(prog="python -m nvila.server", description=HELP[:1].upper() + HELP[1:] + ".")
add_arguments(parser)
args = parser.parse_args()
handler = logging.StreamHandler(sys.stderr)
handler.setFormatter(logging.Formatter("nvila: %(levelname)s: %(message)s"))
logging.getLogger("nvila").addHandler(handler)
logging.getLogger("nvila").setLevel(logging.WARNING)
try:
    if args.model is None:  # as `nvila serve`: the bundled model
        args.model = str(default_model_path())
    sys.exit(run(args))
except (ValueError, OSError) as e:
    sys.stderr.write(f"nvila serve: error: {e}\n")
    sys.exit(2)
except KeyboardInterrupt:
    sys.exit(130)
