"""The checkpoint shipped inside the package: SynthVILA, the project's own small NVILA model.

Contract: ``default_model_path()`` is the directory of the bundled checkpoint (published layout:
``config.json``, ``llm/``, ``vision_tower/``, ``mm_projector/``, plus the training script's logs and
eval reports). It is found through ``importlib.resources``, so it works for editable and regular
installs alike; an install that does not unpack to the file system (a zip) or that lost the files
raises ``BundledModelError``, which the ``nvila`` command line reports as bad input (exit 2). This
module knows where the files are, not what is in them: loading is ``checkpoint``'s job.
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path

from ..checkpoint import CheckpointError

NAME = "synthvila"
REQUIRED = ("config.json", "llm", "vision_tower", "mm_projector")


class BundledModelError(CheckpointError):
    """The bundled checkpoint is not there (an install without package data, or a zip install)."""


def default_model_path() -> Path:
    """The bundled SynthVILA checkpoint directory, the default ``--model`` of ``nvila infer/serve/eval``.

    Returns:
        An existing directory in the published layout.
    Raises:
        BundledModelError: the directory or one of its parts is missing; the message says how to
            pass a checkpoint explicitly instead.
    """
    root = resources.files(__name__) / NAME
    hint = "pass a checkpoint directory with --model PATH, or reinstall nvila with its package data"
    if not isinstance(root, Path):
        raise BundledModelError(f"the bundled {NAME} model is inside an archive ({root}), not a directory; {hint}")
    missing = [n for n in REQUIRED if not (root / n).exists()]
    if missing:
        raise BundledModelError(f"the bundled {NAME} model is missing from {root} (no {', '.join(missing)}); {hint}")
    return root
