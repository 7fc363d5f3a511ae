"""Video encoders: how the per-frame projector outputs of one video become visual tokens.

Two kinds (spec §9.3):

* ``basic``: every frame keeps all its tokens.
* ``tsp`` (temporal-spatial pooling): for each ``(pt, ph, pw)`` in ``pool_sizes``, average
  non-overlapping groups of ``pt`` consecutive frames, ``ph`` rows and ``pw`` columns of the square
  token grid. Each pool size gives one granularity; granularities are concatenated in order.

Contract with the processor: it inserts every start / end / separator token of a video as a real
token id (per pooled frame, per granularity) and uses :func:`video_layout` to count the media tokens
between them. The model only scatters the flat output of :func:`encode_video_features` into the media
positions, so both functions enumerate tokens in the same order: granularity, then frame, then token.

This module knows frame counts, token grids and pooling. It does not know tokenizers, embeddings or
how frames were sampled.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from nvila.config import VideoEncoderConfig

__all__ = ["encode_video_features", "video_layout"]


def video_layout(num_frames: int, tokens_per_frame: int, cfg: VideoEncoderConfig) -> list[tuple[int, int]]:
    """Frames and tokens per frame of every output granularity of one video.

    Args:
        num_frames: T, frames of the video.
        tokens_per_frame: n, projector tokens per frame (a square for ``tsp``).
        cfg: the video encoder.

    Returns:
        ``[(T, n)]`` for ``basic``; for ``tsp`` one ``(T/pt, n/(ph*pw))`` per pool size, in order.

    Raises:
        ValueError: unknown encoder kind, or a pool size that does not divide the frames / the grid.
    """
    if cfg.kind == "basic":
        return [(num_frames, tokens_per_frame)]
    if cfg.kind != "tsp":
        raise ValueError(f"unknown video encoder kind {cfg.kind!r}; valid: basic, tsp")
    side = math.isqrt(tokens_per_frame)
    if side * side != tokens_per_frame:
        raise ValueError(f"TSP pooling needs a square token grid per frame, got {tokens_per_frame} tokens")
    layout = []
    for pt, ph, pw in cfg.pool_sizes:
        if num_frames % pt:
            raise ValueError(f"TSP pool size {(pt, ph, pw)}: {num_frames} frames are not divisible by the "
                             f"temporal pool {pt}")
        if side % ph or side % pw:
            raise ValueError(f"TSP pool size {(pt, ph, pw)}: the {side}x{side} token grid is not divisible "
                             f"by the spatial pool {ph}x{pw}")
        layout.append((num_frames // pt, (side // ph) * (side // pw)))
    return layout


def _pool(x: Tensor, size: int, dim: int) -> Tensor:
    """Mean over non-overlapping groups of ``size`` along ``dim``."""
    return x.reshape(*x.shape[:dim], -1, size, *x.shape[dim + 1:]).mean(dim + 1)


def encode_video_features(feats: Tensor, cfg: VideoEncoderConfig) -> Tensor:
    """Turn the per-frame features of one video into its flat visual tokens.

    Args:
        feats: (T, n, D) projector outputs, frames in time order, tokens row-major.
        cfg: the video encoder.

    Returns:
        (sum of T'*n' over :func:`video_layout`, D): granularities in ``pool_sizes`` order, frame-major
        within each.

    Raises:
        ValueError: as :func:`video_layout`.
    """
    t, n, d = feats.shape
    layout = video_layout(t, n, cfg)
    if cfg.kind == "basic":
        return feats.reshape(t * n, d)  # (T*n, D)
    side = math.isqrt(n)
    outputs = []
    for pool_size, (frames, tokens) in zip(cfg.pool_sizes, layout):
        pooled = feats.reshape(t, side, side, d)  # (T, √n, √n, D)
        for dim, p in enumerate(pool_size):
            pooled = _pool(pooled, p, dim)  # frames, then rows, then columns
        outputs.append(pooled.reshape(frames * tokens, d))  # (T'*n', D)
    return torch.cat(outputs, dim=0)
