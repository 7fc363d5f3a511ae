"""What every ``nvila`` subcommand shares: argparse value types (one-line messages for bad values), the
hub-id help text and the aligned text table of the human reports."""

from __future__ import annotations

import argparse
from collections.abc import Callable
from typing import Any

HUB_HELP = ("a Hugging Face Hub id ORG/NAME[@REVISION] (e.g. Efficient-Large-Model/NVILA-8B) when no such local path "
            "exists, fetched into the Hugging Face cache; HF_HUB_OFFLINE=1 uses the cache only")


def int_at_least(low: int) -> Callable[[str], int]:
    """An integer >= ``low``."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"must be >= {low}, got {value}")
        return value

    return parse


def float_in(low: float, high: float = float("inf"), *, low_open: bool = False) -> Callable[[str], float]:
    """A number in [low, high] (or (low, high] with ``low_open``)."""

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
        if not (value > low if low_open else value >= low) or value > high:
            bound = f"in ({low}, {high}]" if high != float("inf") else f"{'>' if low_open else '>='} {low}"
            raise argparse.ArgumentTypeError(f"must be {bound}, got {value}")
        return value

    return parse


positive_int = int_at_least(1)


def image_size(text: str) -> tuple[int, int]:
    """``"1000x700"`` -> (1000, 700)."""
    w, sep, h = text.lower().partition("x")
    if not sep or not w.isdigit() or not h.isdigit() or int(w) < 1 or int(h) < 1:
        raise argparse.ArgumentTypeError(f"expected WIDTHxHEIGHT with positive integers (e.g. 1000x700), got {text!r}")
    return int(w), int(h)


def text_table(headers: list[str], rows: list[list[Any]], right: set[int]) -> list[str]:
    """Aligned text columns (the ``right`` ones right-aligned); None prints as ``-``."""
    cells = [headers] + [["-" if v is None else str(v) for v in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    return ["  ".join(c.rjust(w) if i in right else c.ljust(w) for i, (c, w) in enumerate(zip(r, widths))).rstrip()
            for r in cells]
