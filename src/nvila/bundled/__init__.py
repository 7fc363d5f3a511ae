"""What ships inside the package: SynthVILA, the project's own small NVILA model, and the demo's examples.

Contract: ``default_model_path()`` is the directory of the bundled checkpoint (published layout:
``config.json``, ``llm/``, ``vision_tower/``, ``mm_projector/``, plus the training script's logs and
eval reports); ``examples_path()`` the demo's held-out examples. Both are found through ``importlib.resources``, so it works for editable and regular
installs alike; an install that does not unpack to the file system (a zip) or that lost the files
raises ``BundledModelError``, which the ``nvila`` command line reports as bad input (exit 2). This
module knows where the files are, not what is in them: loading is ``checkpoint``'s job.
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path

from ..checkpoint import CheckpointError

NAME = "synthvila"
EXAMPLES = "examples"
REQUIRED = ("config.json", "llm", "vision_tower", "mm_projector")


class BundledModelError(CheckpointError):
    """The bundled checkpoint is not there (an install without package data, or a zip install)."""


def _package_dir(name: str, required: tuple[str, ...], what: str, hint: str) -> Path:
    """``nvila/bundled/<name>`` as a directory holding ``required``, or ``BundledModelError`` saying why not."""
    root = resources.files(__name__) / name
    if not isinstance(root, Path):
        raise BundledModelError(f"{what} is inside an archive ({root}), not a directory; {hint}")
    missing = [n for n in required if not (root / n).exists()]
    if missing:
        raise BundledModelError(f"{what} is missing from {root} (no {', '.join(missing)}); {hint}")
    return root


def default_model_path() -> Path:
    """The bundled SynthVILA checkpoint directory, the default ``--model`` of ``nvila infer/serve/eval``.

    Returns:
        An existing directory in the published layout.
    Raises:
        BundledModelError: the directory or one of its parts is missing; the message says how to
            pass a checkpoint explicitly instead.
    """
    return _package_dir(NAME, REQUIRED, f"the bundled {NAME} model",
                        "pass a checkpoint directory with --model PATH, or reinstall nvila with its package data")


def examples_path() -> Path:
    """The demo's held-out SynthVILA examples (``examples.json`` and their media), shipped with nvila.

    Raises:
        BundledModelError: the directory or ``examples.json`` is missing.
    """
    return _package_dir(EXAMPLES, ("examples.json",), "the bundled demo examples",
                        "pass --assets DIR, or reinstall nvila with its package data")
