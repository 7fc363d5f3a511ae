"""Image tiling: grid geometry, tile crops and the pixel tensors fed to the vision tower.

Reproduces the reference (NVlabs/VILA ``llava/mm_utils.py``) preprocessing pixel for pixel: every
resize is a PIL bicubic resize, grids are chosen by ``find_closest_aspect_ratio`` with the
reference's candidate order and tie rule, and tiles are cut row-major. Grids are written
``(i, j)`` = (tiles across, tiles down) where the reference uses them, and block sizes are
``(rows, cols)``.

This module knows image geometry and the SigLIP rescale/normalise arithmetic. It knows nothing about
files (see ``media.py``), tokens or the number of visual tokens per tile (see ``processor.py``),
or models.
"""

from __future__ import annotations

import math
from typing import Callable, Sequence

import numpy as np
import torch
from PIL import Image

_RESCALE = 0.00392156862745098  # 1/255 as a float64 literal, as HF `rescale` uses it


# ------------------------------------------------------------------------------------ geometry
def candidate_grids(min_num: int, max_num: int) -> list[tuple[int, int]]:
    """Candidate grids ``(i, j)`` with ``min_num <= i * j <= max_num``, in the reference order.

    The reference builds a Python ``set`` and sorts it (stably) by tile count, so grids with the same
    tile count keep the set's iteration order. That order decides ties in
    :func:`find_closest_aspect_ratio`, so it is reproduced here by building the set the same way.

    Args:
        min_num: Fewest tiles allowed.
        max_num: Most tiles allowed.

    Returns:
        Grids ``(tiles across, tiles down)``, sorted by ``i * j``.
    """
    grids = set(
        (i, j)
        for n in range(min_num, max_num + 1)
        for i in range(1, n + 1)
        for j in range(1, n + 1)
        if min_num <= i * j <= max_num
    )
    return sorted(grids, key=lambda g: g[0] * g[1])


def find_closest_aspect_ratio(aspect: float, grids: Sequence[tuple[int, int]], width: int, height: int,
                              tile: int) -> tuple[int, int]:
    """The grid whose aspect ratio ``i / j`` is closest to ``aspect`` (reference tie rule).

    A strictly smaller difference wins. On an exact tie the later candidate replaces the current best
    only if the image area exceeds half the area of that candidate's grid.

    Args:
        aspect: Image aspect ratio ``width / height``.
        grids: Candidates ``(i, j)`` in order, from :func:`candidate_grids`.
        width: Image width in pixels.
        height: Image height in pixels.
        tile: Tile side in pixels.

    Returns:
        The chosen ``(tiles across, tiles down)``; ``(1, 1)`` if ``grids`` is empty.
    """
    best, best_diff = (1, 1), math.inf
    area = width * height
    for i, j in grids:
        diff = abs(aspect - i / j)
        if diff < best_diff:
            best, best_diff = (i, j), diff
        elif diff == best_diff and area > 0.5 * tile * tile * i * j:
            best = (i, j)
    return best


def dynamic_s2_grid(width: int, height: int, scales: Sequence[int], max_tiles: int) -> tuple[int, int]:
    """Block size of the last (largest) dynamic-S2 scale.

    Args:
        width: Image width in pixels.
        height: Image height in pixels.
        scales: S2 scales, e.g. ``(448, 896, 1344)``; ``scales[0]`` is the tile side.
        max_tiles: Most tiles at the last scale.

    Returns:
        ``(rows, cols)`` of the last scale.

    Raises:
        ValueError: ``max_tiles`` is below ``(scales[-1] // scales[0]) ** 2``, the fewest tiles the last
            scale needs (the reference silently falls back to a 1x1 grid there).
    """
    tile = scales[0]
    min_num = (scales[-1] // tile) ** 2
    if max_tiles < min_num:
        raise ValueError(f"max_tiles={max_tiles} is below the {min_num} tiles that the largest S2 scale "
                         f"{scales[-1]} needs with {tile}-pixel tiles")
    cols, rows = find_closest_aspect_ratio(width / height, candidate_grids(min_num, max_tiles), width, height, tile)
    return rows, cols


def dynamic_s2_num_tiles(block_size: tuple[int, int] | None, scales: Sequence[int], tile: int) -> int:
    """Tiles one image becomes under dynamic-S2: (s/tile)^2 per scale but the last, then rows*cols
    for the last (1 + 4 + rows*cols for 448/896/1344); 1 for an image without a block size."""
    if block_size is None:
        return 1
    return sum((s // tile) ** 2 for s in scales[:-1]) + block_size[0] * block_size[1]


def dynamic_grid(width: int, height: int, min_tiles: int, max_tiles: int, tile: int) -> tuple[int, int]:
    """Tile grid of NVILA-Lite's ``dynamic`` mode.

    Args:
        width: Image width in pixels.
        height: Image height in pixels.
        min_tiles: Fewest tiles.
        max_tiles: Most tiles.
        tile: Tile side in pixels.

    Returns:
        ``(rows, cols)``.
    """
    cols, rows = find_closest_aspect_ratio(width / height, candidate_grids(min_tiles, max_tiles), width, height, tile)
    return rows, cols


# ------------------------------------------------------------------------------------ tiles
def _resize(image: Image.Image, width: int, height: int) -> Image.Image:
    return image.resize((width, height), Image.BICUBIC)


def _cut(image: Image.Image, rows: int, cols: int, tile: int) -> list[Image.Image]:
    """Row-major tiles of an image that is exactly ``(cols * tile) x (rows * tile)``."""
    return [
        image.crop((c * tile, r * tile, (c + 1) * tile, (r + 1) * tile))
        for r in range(rows)
        for c in range(cols)
    ]


def dynamic_s2_tiles(image: Image.Image, scales: Sequence[int],
                     max_tiles: int) -> tuple[list[Image.Image], tuple[int, int]]:
    """Dynamic-S2 tiles of one image (spec §4.1).

    Every scale but the last resizes the whole image to a square ``s x s`` (aspect ignored) and cuts
    ``(s / S) ** 2`` tiles; the last scale resizes to ``(cols * S) x (rows * S)`` with the grid from
    :func:`dynamic_s2_grid` and cuts ``rows * cols`` tiles. ``S = scales[0]``.

    Args:
        image: RGB image.
        scales: S2 scales, each a multiple of ``scales[0]``.
        max_tiles: Most tiles at the last scale.

    Returns:
        The tiles (``1 + 4 + rows * cols`` for scales 448/896/1344), each ``S x S``, scale by scale and
        row-major within a scale; and ``(rows, cols)`` of the last scale.
    """
    tile = scales[0]
    tiles: list[Image.Image] = []
    for s in scales[:-1]:
        k = s // tile
        tiles += _cut(_resize(image, k * tile, k * tile), k, k, tile)
    rows, cols = dynamic_s2_grid(image.width, image.height, scales, max_tiles)
    tiles += _cut(_resize(image, cols * tile, rows * tile), rows, cols, tile)
    return tiles, (rows, cols)


def dynamic_tiles(image: Image.Image, min_tiles: int, max_tiles: int, tile: int) -> list[Image.Image]:
    """NVILA-Lite ``dynamic`` tiles of one image (spec §4.3).

    Args:
        image: RGB image.
        min_tiles: Fewest tiles.
        max_tiles: Most tiles.
        tile: Tile side in pixels.

    Returns:
        ``rows * cols`` row-major tiles, followed by a thumbnail (the whole image resized to
        ``tile x tile``) unless the grid is 1x1.
    """
    rows, cols = dynamic_grid(image.width, image.height, min_tiles, max_tiles, tile)
    tiles = _cut(_resize(image, cols * tile, rows * tile), rows, cols, tile)
    if rows * cols != 1:
        tiles.append(_resize(image, tile, tile))
    return tiles


def pad_to_square(image: Image.Image, fill: tuple[int, int, int] = (127, 127, 127)) -> Image.Image:
    """Centre the image on a square canvas of side ``max(W, H)`` (spec §4.4, ``pad`` mode).

    Args:
        image: RGB image.
        fill: Canvas colour; the reference uses ``int(255 * mean)`` per channel.

    Returns:
        The square image (the input itself if it is already square).
    """
    w, h = image.size
    if w == h:
        return image
    side = max(w, h)
    canvas = Image.new(image.mode, (side, side), fill)
    canvas.paste(image, ((side - w) // 2, (side - h) // 2))
    return canvas


def to_pixels(tiles: Sequence[Image.Image], tile: int, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """Tiles -> normalised pixel tensor, with the arithmetic of HF ``SiglipImageProcessor``.

    Each tile is resized (bicubic) to ``tile x tile`` if it is not already that size, rescaled by 1/255
    in float64 and cast to float32, then normalised as ``(x - mean) / std`` in float32.

    Args:
        tiles: RGB images.
        tile: Output side in pixels.
        mean: Per-channel mean.
        std: Per-channel standard deviation.

    Returns:
        ``[N, 3, tile, tile]`` float32.
    """
    mean32 = np.asarray(mean, dtype=np.float32)
    std32 = np.asarray(std, dtype=np.float32)
    out = np.empty((len(tiles), 3, tile, tile), dtype=np.float32)
    for n, im in enumerate(tiles):
        if im.size != (tile, tile):
            im = _resize(im, tile, tile)
        u8 = np.asarray(im.convert("RGB"), dtype=np.uint8)  # (tile, tile, 3)
        x = (u8.astype(np.float64) * _RESCALE).astype(np.float32)
        out[n] = ((x - mean32) / std32).transpose(2, 0, 1)  # (3, tile, tile)
    return torch.from_numpy(out)


# ------------------------------------------------------------------------------------ dispatch
# Each mode: (image, *, tile, scales, min_tiles, max_tiles, single, fill) -> (tiles, block size or None).
_Mode = Callable[..., tuple[list[Image.Image], "tuple[int, int] | None"]]


def _mode_dynamic_s2(image, *, tile, scales, min_tiles, max_tiles, single, fill):
    if not single:
        return [_resize(image, tile, tile)], None
    if not scales or scales[0] != tile:
        raise ValueError(f"dynamic_s2 needs scales starting with the tile size {tile}, got {scales}")
    return dynamic_s2_tiles(image, scales, max_tiles)


def _mode_dynamic(image, *, tile, scales, min_tiles, max_tiles, single, fill):
    if not single:
        return [_resize(image, tile, tile)], None
    return dynamic_tiles(image, min_tiles, max_tiles, tile), None


def _mode_resize(image, *, tile, scales, min_tiles, max_tiles, single, fill):
    return [_resize(image, tile, tile)], None


def _mode_pad(image, *, tile, scales, min_tiles, max_tiles, single, fill):
    return [_resize(pad_to_square(image, fill), tile, tile)], None


# "resize" resizes in the tiling step, "plain" in the processor's own resize: same bicubic op.
PREPROCESSORS: dict[str, _Mode] = {
    "dynamic_s2": _mode_dynamic_s2,
    "dynamic": _mode_dynamic,
    "resize": _mode_resize,
    "pad": _mode_pad,
    "plain": _mode_resize,
}


def preprocess_image(image: Image.Image, mode: str, *, tile: int, scales: Sequence[int] | None = None,
                     min_tiles: int = 1, max_tiles: int = 12, single: bool,
                     fill: tuple[int, int, int] = (127, 127, 127)) -> tuple[list[Image.Image], tuple[int, int] | None]:
    """Tiles of one image for the configured ``image_aspect_ratio`` mode.

    ``dynamic_s2`` and ``dynamic`` tile only an image that is alone in its conversation
    (``single=True``); other images and video frames get a plain resize to one tile (spec §4.2).

    Args:
        image: RGB image.
        mode: ``"dynamic_s2"``, ``"dynamic"``, ``"resize"``, ``"pad"`` or ``"plain"``.
        tile: Tile side in pixels.
        scales: S2 scales (``dynamic_s2`` only).
        min_tiles: Fewest tiles (``dynamic`` only).
        max_tiles: Most tiles (``dynamic_s2``: at the last scale).
        single: Whether this image is the only medium of the conversation.
        fill: Canvas colour of ``pad`` mode, ``int(255 * mean)`` per channel.

    Returns:
        The tiles, each ``tile x tile``, and the block size ``(rows, cols)`` for a single-image
        ``dynamic_s2`` image, else ``None``.

    Raises:
        ValueError: Unknown ``mode``, or ``dynamic_s2`` without suitable ``scales``.
    """
    if mode not in PREPROCESSORS:
        raise ValueError(f"unknown image_aspect_ratio {mode!r}; valid: {', '.join(PREPROCESSORS)}")
    return PREPROCESSORS[mode](image, tile=tile, scales=scales, min_tiles=min_tiles, max_tiles=max_tiles,
                               single=single, fill=fill)
