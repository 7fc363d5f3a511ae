"""Shared fixtures: the golden tiny checkpoints in the published layout, built by tests/golden_checkpoints.py."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))  # make tests/*.py helpers importable from every test dir

from golden_checkpoints import VARIANTS, build_checkpoint, unpack_tokenizer  # noqa: E402


@pytest.fixture(scope="session")
def tiny_checkpoints(tmp_path_factory):
    """{variant: path} for the three golden variants (nvila, nvila-lite, nvila-video), byte-identical to the
    checkpoints the golden cases were computed on."""
    root = tmp_path_factory.mktemp("ckpt")
    tokenizer = unpack_tokenizer(root / "tokenizer")
    return {v: build_checkpoint(v, root / v, tokenizer) for v in VARIANTS}


@pytest.fixture(scope="session")
def tiny_hf_checkpoints(tiny_checkpoints, tmp_path_factory):
    """{variant: path} the three golden checkpoints converted to the hf layout by ``nvila convert``."""
    from nvila.convert import convert_checkpoint

    root = tmp_path_factory.mktemp("ckpt-hf")
    return {v: convert_checkpoint(path, root / v, "hf") for v, path in tiny_checkpoints.items()}
