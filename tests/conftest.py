"""Shared fixtures: tiny checkpoints in the published layout, built from ../shared/golden."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED_GOLDEN = REPO.parent / "shared" / "golden"
ASSETS = REPO / "tests" / "assets"
GOLDEN = ASSETS / "golden"


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


def golden_case(name: str) -> tuple[dict, dict[str, np.ndarray]]:
    with open(GOLDEN / "expected" / f"{name}.json", encoding="utf-8") as f:
        case = json.load(f)
    with np.load(GOLDEN / "expected" / f"{name}.npz", allow_pickle=False) as z:
        arrays = {k: z[k] for k in z.files}
    return case, arrays
