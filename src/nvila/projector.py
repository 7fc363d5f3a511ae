"""The multimodal projector: vision features -> LLM-width tokens.

Every projector type named by a published ``mm_projector_type`` is a small ``nn.Sequential`` whose
indices are the checkpoint's key prefixes (``layers.<i>.weight|bias``); parameter-free stages (the
space-to-channel block, GELU) still occupy their index so that the keys line up. The downsampling
types first fold each k x k neighbourhood of the square token grid into one token (space to channel),
then run LayerNorm / Linear / GELU stages.

This module knows one tile's square feature grid and the layer stacks. It does not know about images,
tiles, scales, tokenizers or where the tokens go in the prompt.
"""

from __future__ import annotations

import math
import re
from functools import partial
from typing import Callable

from torch import Tensor, nn

__all__ = [
    "PROJECTORS",
    "MultimodalProjector",
    "SpaceToChannel",
    "build_projector",
    "downsample_factor",
    "space_to_channel",
    "tokens_per_tile",
]


def _square_side(n: int) -> int:
    side = math.isqrt(n)
    if side * side != n:
        raise ValueError(f"expected a square token grid, got {n} tokens")
    return side


def space_to_channel(x: Tensor, k: int) -> Tensor:
    """Fold every k x k neighbourhood of a square token grid into one token.

    Tokens are read row-major (token n is at row ``n // s``, column ``n % s``). The grid is padded with
    zeros at the bottom and right up to the next multiple of k. The channel vector of output cell
    (i, j) is the concatenation over row offset m = 0..k-1 (outer) and column offset n = 0..k-1
    (inner) of ``x[k*i + m, k*j + n]``.

    Args:
        x: (B, N, C) tokens, N = s*s.
        k: neighbourhood side.

    Returns:
        (B, (s'/k)**2, k*k*C) tokens, row-major over the output grid, with s' = k * ceil(s / k).
    """
    b, n, c = x.shape
    s = _square_side(n)
    pad = -s % k
    grid = x.reshape(b, s, s, c)  # (B, s, s, C)
    if pad:
        grid = nn.functional.pad(grid, (0, 0, 0, pad, 0, pad))  # (B, s', s', C)
    g = (s + pad) // k
    grid = grid.reshape(b, g, k, g, k, c)  # (B, i, m, j, n, C)
    return grid.permute(0, 1, 3, 2, 4, 5).reshape(b, g * g, k * k * c)  # (B, g*g, k*k*C)


class SpaceToChannel(nn.Module):
    """Parameter-free stage wrapping :func:`space_to_channel`."""

    def __init__(self, k: int) -> None:
        super().__init__()
        self.k = k

    def forward(self, x: Tensor) -> Tensor:
        return space_to_channel(x, self.k)  # (B, N, C) -> (B, N / k², k²·C)

    def extra_repr(self) -> str:
        return f"k={self.k}"


def _downsample_mlp(k: int, widths: Callable[[int], tuple[int, ...]], in_dim: int, out_dim: int) -> nn.Module:
    """``SpaceToChannel(k)``; ``LayerNorm(w), Linear(w -> w'), GELU`` for each step along
    ``widths(in_dim) + (D,)``; then ``Linear(D -> D)``. GELU is exact (erf), LayerNorm eps 1e-5.
    """
    dims = (*widths(in_dim), out_dim)
    stages: list[nn.Module] = [SpaceToChannel(k)]
    for w_in, w_out in zip(dims[:-1], dims[1:]):
        stages += [nn.LayerNorm(w_in, eps=1e-5), nn.Linear(w_in, w_out), nn.GELU()]
    stages.append(nn.Linear(out_dim, out_dim))
    return nn.Sequential(*stages)


def _mlp_gelu(depth: int, in_dim: int, out_dim: int) -> nn.Module:
    """``Linear(Cin -> D)`` followed by ``depth - 1`` times ``GELU, Linear(D -> D)``."""
    stages: list[nn.Module] = [nn.Linear(in_dim, out_dim)]
    for _ in range(depth - 1):
        stages += [nn.GELU(), nn.Linear(out_dim, out_dim)]
    return nn.Sequential(*stages)


def _linear(in_dim: int, out_dim: int) -> nn.Module:
    # The reference stores this one as a bare Linear: keys `layers.weight|bias`, no index.
    return nn.Linear(in_dim, out_dim)


def _identity(in_dim: int, out_dim: int) -> nn.Module:
    if in_dim != out_dim:
        raise ValueError(f"the identity projector needs equal widths, got {in_dim} -> {out_dim}")
    return nn.Identity()


# type -> (space-to-channel side, hidden widths as a function of the input width Cin).
_DOWNSAMPLE_MLPS: dict[str, tuple[int, Callable[[int], tuple[int, ...]]]] = {
    "mlp_downsample": (2, lambda c: (4 * c,)),
    "mlp_downsample_2x2_fix": (2, lambda c: (4 * c,)),
    "mlp_downsample_3x3_fix": (3, lambda c: (9 * c, 3 * c)),
    "mlp_downsample_3x3_s2": (3, lambda c: (9 * c, 3 * c, c, c // 3)),
    "mlp_downsample_3x3_s2_new": (3, lambda c: (9 * c, 4 * c, 2 * c, c, c // 3)),
}

ProjectorBuilder = Callable[[int, int], nn.Module]

# `mm_projector_type` -> builder of the `layers` module from (Cin, D). The family `mlp<N>x_gelu`
# (N >= 1) is matched by `_MLP_GELU`; `mlp2x_gelu` is listed as its common member.
PROJECTORS: dict[str, ProjectorBuilder] = {
    **{name: partial(_downsample_mlp, k, widths) for name, (k, widths) in _DOWNSAMPLE_MLPS.items()},
    "linear": _linear,
    "mlp2x_gelu": partial(_mlp_gelu, 2),
    "identity": _identity,
}
_MLP_GELU = re.compile(r"^mlp([1-9][0-9]*)x_gelu$")


def _builder(projector_type: str) -> ProjectorBuilder:
    if projector_type in PROJECTORS:
        return PROJECTORS[projector_type]
    match = _MLP_GELU.match(projector_type)
    if match:
        return partial(_mlp_gelu, int(match.group(1)))
    valid = ", ".join([*sorted(PROJECTORS), "mlp<N>x_gelu (N >= 1)"])
    raise ValueError(f"unknown mm_projector_type {projector_type!r}; valid: {valid}")


class MultimodalProjector(nn.Module):
    """Maps one batch of square vision-feature grids to LLM-width tokens.

    Args:
        projector_type: a published ``mm_projector_type`` (see ``PROJECTORS``).
        in_dim: input width Cin (``mm_hidden_size``).
        out_dim: LLM hidden width D.
    """

    def __init__(self, projector_type: str, in_dim: int, out_dim: int) -> None:
        super().__init__()
        self.projector_type = projector_type
        self.layers = _builder(projector_type)(in_dim, out_dim)

    def forward(self, x: Tensor) -> Tensor:
        """(B, N, Cin) -> (B, N', D); N' = N for MLP types, (ceil(√N / k))² for k x k downsampling."""
        return self.layers(x)


def build_projector(projector_type: str, in_dim: int, out_dim: int) -> MultimodalProjector:
    """Build the projector for a config's ``mm_projector_type``.

    Args:
        projector_type: e.g. ``"mlp_downsample"`` (NVILA) or ``"mlp_downsample_3x3_fix"`` (Lite).
        in_dim: input width Cin (``mm_hidden_size``).
        out_dim: LLM hidden width D.

    Returns:
        The projector (parameters on the current default device and dtype).

    Raises:
        ValueError: unknown type; the message lists the valid ones.
    """
    return MultimodalProjector(projector_type, in_dim, out_dim)


def tokens_per_tile(projector_type: str, grid: int) -> int:
    """How many tokens the projector makes of one grid x grid feature map.

    Args:
        projector_type: a published ``mm_projector_type``.
        grid: patches per side of one tile (32 for SigLIP 448/14).

    Returns:
        ``ceil(grid / k) ** 2`` for k x k downsampling types (256 for 2x2, 121 for 3x3 at grid 32),
        else ``grid ** 2``.

    Raises:
        ValueError: unknown type.
    """
    k = downsample_factor(projector_type)
    return (-(-grid // k)) ** 2


def downsample_factor(projector_type: str) -> int:
    """The side k of the k x k neighbourhoods a projector folds into one token (1: no folding), so
    its first layer takes ``k * k * Cin`` features.

    Raises:
        ValueError: unknown type.
    """
    _builder(projector_type)
    return _DOWNSAMPLE_MLPS[projector_type][0] if projector_type in _DOWNSAMPLE_MLPS else 1
