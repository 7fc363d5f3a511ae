"""Shared helpers for the SynthVILA tests: a template reader for the 3x5 code and event coverage."""

from __future__ import annotations

import numpy as np

from nvila.data.synthetic import CODE_ALPHABET, GLYPH_H, GLYPH_W, glyph_bitmap


def read_code(image: np.ndarray, code: dict) -> str:
    """Read the code of ``code`` (a scene's code entry) from an (H, W, 3) image at native coordinates.

    A simple template matcher: binarise each glyph cell at mid-grey, average ``glyph_scale`` blocks,
    and take the glyph with the fewest differing pixels; an ambiguous cell (a tie) reads as "?".
    """
    g = code["glyph_scale"]
    x0, y0 = code["ink_xy"]
    grey = image.astype(np.float64).mean(axis=2)
    out = []
    for k in range(len(code["text"])):
        x = x0 + k * (GLYPH_W + 1) * g
        cell = grey[y0:y0 + GLYPH_H * g, x:x + GLYPH_W * g].reshape(GLYPH_H, g, GLYPH_W, g).mean(axis=(1, 3))
        ink = cell < 127.5
        dist = {ch: int((ink != glyph_bitmap(ch)).sum()) for ch in CODE_ALPHABET}
        best = min(dist.values())
        winners = [ch for ch, d in dist.items() if d == best]
        out.append(winners[0] if len(winners) == 1 else "?")
    return "".join(out)


def events_seen(events: list[dict], indices: list[int]) -> list[bool]:
    """For each event, whether any sampled frame index falls inside it."""
    return [any(e["start"] <= i < e["start"] + e["duration"] for i in indices) for e in events]
