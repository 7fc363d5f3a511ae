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


def golden_messages(case: dict) -> list[dict]:
    """A golden case's messages with media paths resolved under the golden inputs."""
    out = []
    for m in case["messages"]:
        parts = []
        for p in m["content"]:
            p = dict(p)
            if p["type"] in ("image", "video"):
                p[p["type"]] = str(GOLDEN / "inputs" / p[p["type"]])
            parts.append(p)
        out.append({"role": m["role"], "content": parts})
    return out


# A JSON schema with every field bounded, so that any model, random weights included, completes it
# within a few hundred tokens; and the response_format that asks for it (engine and server tests).
PERSON_SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 16},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "colour": {"enum": ["red", "green", "blue"]},
        "tags": {"type": "array", "items": {"type": "string", "maxLength": 8}, "maxItems": 3},
    },
    "required": ["name", "age", "colour", "tags"],
    "additionalProperties": False,
}
PERSON_FORMAT = {"type": "json_schema", "json_schema": {"name": "person", "schema": PERSON_SCHEMA, "strict": True}}
