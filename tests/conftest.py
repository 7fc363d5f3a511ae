"""Shared fixtures: tiny checkpoints in the published layout, built from ../shared/golden."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))  # make nvila_testing importable from every test dir

from nvila_testing import SHARED_GOLDEN  # noqa: E402


def _builder():
    if not (SHARED_GOLDEN / "make_tiny_checkpoint.py").is_file():
        pytest.fail(f"{SHARED_GOLDEN} is missing: the tiny-checkpoint builder lives in ../shared/golden")
    sys.path.insert(0, str(SHARED_GOLDEN))
    import make_tiny_checkpoint

    return make_tiny_checkpoint


@pytest.fixture(scope="session")
def tiny_checkpoints(tmp_path_factory):
    """{variant: path} for the three golden variants (nvila, nvila-lite, nvila-video), default seeds."""
    mk = _builder()
    root = tmp_path_factory.mktemp("ckpt")
    return {v: Path(mk.build_checkpoint(v, root / v)) for v in ("nvila", "nvila-lite", "nvila-video")}
