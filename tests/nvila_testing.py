"""Paths and golden-case loading shared by the tests (import as ``from nvila_testing import ...``)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
ASSETS = REPO / "tests" / "assets"
GOLDEN = ASSETS / "golden"  # copy of the golden parity set: expected/, inputs/, tokenizer/ (xz)
CONFIGS = ASSETS / "configs"  # published top-level config.json of NVILA-8B, -15B, -Lite-2B, -Lite-8B, -8B-Video


def golden_case(name: str) -> tuple[dict, dict[str, np.ndarray]]:
    with open(GOLDEN / "expected" / f"{name}.json", encoding="utf-8") as f:
        case = json.load(f)
    with np.load(GOLDEN / "expected" / f"{name}.npz", allow_pickle=False) as z:
        arrays = {k: z[k] for k in z.files}
    return case, arrays
