"""The SigLIP vision tower and the dynamic-S2 multi-scale feature merge.

``VisionTower`` turns preprocessed 448 x 448 tiles into per-tile patch features: the hidden state
selected by ``VisionConfig.select_layer`` (NVILA: ``hidden_states[-2]``, the output of the second-to-
last encoder layer, without ``post_layernorm``). Only the encoder layers needed for that hidden state
run. Its parameters carry the published ``vision_model.*`` checkpoint keys.

The pure functions below implement dynamic S2 (spec §6): the tiles of one image, cut at several
scales, are stitched back into one feature map per scale (chessboard merge), resized to a common size
(area interpolation in float32), concatenated along channels in scale order and cut again into
grid x grid blocks for the projector; ``s2_unblock`` stitches the projected blocks back together.

This module knows tile features and tile geometry. It does not know how images are decoded, resized
or tiled (the processor decides the tile order and the block size), nor anything about the projector
or tokens.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn
from transformers import AttentionInterface, SiglipVisionConfig
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.models.siglip.modeling_siglip import SiglipVisionModel

from nvila.config import VisionConfig

VISION_ATTENTION = "nvila_vision"

__all__ = [
    "VisionTower",
    "eager_attention_chunked",
    "merge_chessboard",
    "s2_blocks",
    "s2_output_grid",
    "s2_unblock",
    "split_chessboard",
    "to_siglip_config",
]


def _block(flat: Tensor, shape: tuple[int, ...]) -> Tensor:
    """A contiguous ``shape`` view of the start of the 1-D buffer ``flat``."""
    return flat[:math.prod(shape)].view(shape)


def eager_attention_chunked(module: nn.Module, query: Tensor, key: Tensor, value: Tensor,
                            attention_mask: Tensor | None, scaling: float, dropout: float = 0.0,
                            chunk: int = 128, **kwargs) -> tuple[Tensor, None]:
    """transformers' eager attention math (``softmax(q k^T * scale) v``, softmax in float32), one
    block of ``chunk`` query rows at a time.

    Bit-identical to the eager function the reference ran with: the same products, scaling, mask
    addition and softmax, element for element. What differs is where they are written:

    * the (·, H, chunk, L) score block stays in cache (~8x less peak memory than whole rows);
    * a call goes one image (tile) at a time, and in float32 without autograd the score,
      probability and output blocks are allocated once per call and reused. A fresh score block
      per chunk for a batch of tiles (42 MB at 5 so400m tiles) can go through mmap and page faults
      every time: the whole tower on the caller's thread took 26-29 s against 19-20 s for 5 tiles
      at 2 threads (the engine's scheduler thread was as fast either way; RESULTS.md issue 23).

    (SDPA's fused kernel is faster still, but in float32 on the CPU its different summation order
    moves the golden logits past 1e-4; ``vision_attention`` runs it everywhere else.)

    Args:
        query, key, value: (B, H, L, D).
        attention_mask: additive mask broadcastable to (B, H, L, L), or None.
    Returns:
        ((B, L, H, D) output, None)
    """
    if dropout and module.training:
        raise ValueError("attention dropout is not supported by the chunked eager attention")
    b, heads, length, _ = query.shape
    result = query.new_empty(b, length, heads, value.shape[-1])  # (B, L, H, D)
    out = result.transpose(1, 2)  # (B, H, L, D) view of it
    in_place = (query.dtype == torch.float32 and (attention_mask is None or attention_mask.dtype == torch.float32)
                and not (torch.is_grad_enabled() and (query.requires_grad or key.requires_grad or value.requires_grad)))
    if in_place:  # flat buffers: every block taken from them is contiguous, as a fresh tensor is
        rows_max = min(chunk, length)
        scores = query.new_empty(heads * rows_max * key.shape[2])
        probs = torch.empty_like(scores)
        block = query.new_empty(heads * rows_max * value.shape[-1])
    for i in range(b):
        images = slice(i, i + 1)  # one image, kept as a batch of 1
        keys_t = key[images].transpose(-1, -2)  # (1, H, D, L)
        mask = None
        if attention_mask is not None:
            mask = attention_mask[images] if attention_mask.shape[0] > 1 else attention_mask
        for start in range(0, length, chunk):
            rows = slice(start, start + chunk)
            if in_place:
                shape = (1, heads, min(chunk, length - start), key.shape[2])
                weights = torch.matmul(query[images, :, rows], keys_t, out=_block(scores, shape))
                weights.mul_(scaling)
                if mask is not None:
                    weights.add_(mask[..., rows, :])
                weights = torch.ops.aten._softmax.out(weights, -1, False, out=_block(probs, shape))
                block_shape = shape[:3] + value.shape[-1:]
                out[images, :, rows] = torch.matmul(weights, value[images], out=_block(block, block_shape))
                continue
            weights = torch.matmul(query[images, :, rows], keys_t) * scaling  # (1, H, chunk, L)
            if mask is not None:
                weights = weights + mask[..., rows, :]
            weights = torch.softmax(weights, dim=-1, dtype=torch.float32).to(query.dtype)
            out[images, :, rows] = torch.matmul(weights, value[images])
    return result, None


def vision_attention(module: nn.Module, query: Tensor, key: Tensor, value: Tensor,
                     attention_mask: Tensor | None, scaling: float, dropout: float = 0.0,
                     **kwargs) -> tuple[Tensor, None]:
    """The tower's attention (registered as ``VISION_ATTENTION``): in float32 on the CPU the chunked
    eager math, bitwise the reference's, which keeps the golden logits within 1e-4; otherwise
    transformers' SDPA attention, a fused kernel as the reference's hard-coded flash-attention 2 on
    GPUs is (spec §2.2). Its summation order moves results by far less than bf16/fp16 rounding does.

    Measured (RESULTS.md, issue 23), the 5-tile tower of an 896x896 image:
    * H200, bf16: 10.8 ms against 45.4 ms for the chunked eager math, TTFT 0.101 against 0.228 s; in
      float32 there SDPA kept the golden logits within 1.11e-4, against 1.44e-4 for the eager math;
    * CPU (2 threads, AMX), bf16: 4.8 s against 7.7 s.
    Same arguments and result as ``eager_attention_chunked``.
    """
    if query.device.type == "cpu" and query.dtype == torch.float32:
        return eager_attention_chunked(module, query, key, value, attention_mask, scaling, dropout, **kwargs)
    return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                  **kwargs)


AttentionInterface.register(VISION_ATTENTION, vision_attention)


def to_siglip_config(config: VisionConfig) -> SiglipVisionConfig:
    """Our ``VisionConfig`` as a transformers ``SiglipVisionConfig`` (no pooling head; attention by
    ``vision_attention``: in float32 on the CPU the eager math, as the reference was run (spec §14): in
    float32 it keeps the golden logits within 7.8e-5, where SDPA's fused kernel drifts to 1.2e-4 on
    the Lite case)."""
    return SiglipVisionConfig(
        hidden_size=config.hidden_size,
        intermediate_size=config.intermediate_size,
        num_hidden_layers=config.num_hidden_layers,
        num_attention_heads=config.num_attention_heads,
        num_channels=config.num_channels,
        image_size=config.image_size,
        patch_size=config.patch_size,
        hidden_act=config.hidden_act,
        layer_norm_eps=config.layer_norm_eps,
        attention_dropout=0.0,
        vision_use_head=False,
        attn_implementation=VISION_ATTENTION,
    )


class VisionTower(nn.Module):
    """SigLIP tiles -> selected hidden state.

    ``vision_model`` is transformers' ``SiglipVisionModel`` (in transformers 5 it holds the
    embeddings, encoder and post-LayerNorm directly), so the state-dict keys are the published
    ``vision_model.embeddings.*``, ``vision_model.encoder.layers.<i>.*`` and
    ``vision_model.post_layernorm.*``. The post-LayerNorm and the encoder layers past the selected one
    are kept for the keys but never run.

    Args:
        config: the tower's geometry and feature selection.
    """

    def __init__(self, config: VisionConfig) -> None:
        super().__init__()
        self.config = config
        self.vision_model = SiglipVisionModel(to_siglip_config(config))

    @property
    def dtype(self) -> torch.dtype:
        return self.vision_model.embeddings.patch_embedding.weight.dtype

    def reset_buffers(self, device: torch.device | str) -> None:
        """Rebuild the non-persistent ``position_ids`` buffer after ``to_empty`` (meta-device loading)."""
        emb = self.vision_model.embeddings
        emb.position_ids = torch.arange(emb.num_positions, device=device).expand((1, -1))

    def forward(self, pixels: Tensor) -> Tensor:
        """Encode tiles.

        Args:
            pixels: (N, 3, S, S) normalised tiles, S = ``config.image_size``.

        Returns:
            (N, grid*grid, C) features, row-major over the patch grid (``cls_patch``), or
            (N, grid*grid - 1, C) for ``select_feature == "patch"``.
        """
        emb = self.vision_model.embeddings
        patches = emb.patch_embedding(pixels.to(emb.patch_embedding.weight.dtype))  # (N, C, g, g)
        # Position ids are arange(g*g), so the lookup is the whole table; reading the weight directly
        # avoids the non-persistent `position_ids` buffer, which meta-device loading leaves unset.
        # contiguous: the transposed view would otherwise make every later op (LayerNorm, the quantized
        # linears' reshape) copy it again; the values are bitwise the same (RESULTS.md, issue 23).
        h = (patches.flatten(2).transpose(1, 2) + emb.position_embedding.weight).contiguous()  # (N, g*g, C)
        for layer in self.vision_model.encoder.layers[: self.config.num_layers_used]:
            h = layer(h, None)  # (N, g*g, C)
        if self.config.select_feature == "patch":
            h = h[:, 1:]
        return h


# ------------------------------------------------------------------------------------ dynamic S2
def merge_chessboard(x: Tensor, nh: int, nw: int) -> Tensor:
    """Place nh*nw groups of tiles on an nh x nw board.

    Args:
        x: (nh*nw*b, C, h, w); tile group t = i*nw + j (row-major) occupies rows t*b .. t*b + b - 1.
        nh: board rows.
        nw: board columns.

    Returns:
        (b, C, nh*h, nw*w), group (i, j) at block row i, block column j.
    """
    n, c, h, w = x.shape
    b = n // (nh * nw)
    board = x.reshape(nh, nw, b, c, h, w).permute(2, 3, 0, 4, 1, 5)  # (b, C, nh, h, nw, w)
    return board.reshape(b, c, nh * h, nw * w)


def split_chessboard(x: Tensor, nh: int, nw: int) -> Tensor:
    """Inverse of :func:`merge_chessboard`.

    Args:
        x: (b, C, H, W) with H divisible by nh and W by nw.
        nh: board rows.
        nw: board columns.

    Returns:
        (nh*nw*b, C, H/nh, W/nw), tiles row-major (i outer, j inner), each group of b contiguous.
    """
    b, c, hh, ww = x.shape
    h, w = hh // nh, ww // nw
    tiles = x.reshape(b, c, nh, h, nw, w).permute(2, 4, 0, 1, 3, 5)  # (nh, nw, b, C, h, w)
    return tiles.reshape(nh * nw * b, c, h, w)


def _scale_grids(block_size: tuple[int, int], scales: tuple[int, ...], tile: int) -> list[tuple[int, int]]:
    """Tile grid (rows, cols) of every scale: (s/tile)² for all but the last, ``block_size`` for it."""
    bad = [s for s in scales if s % tile]
    if bad:
        raise ValueError(f"scales {bad} are not multiples of the tile size {tile}")
    return [(s // tile, s // tile) for s in scales[:-1]] + [tuple(block_size)]


def s2_output_grid(block_size: tuple[int, int] | None, scales: tuple[int, ...], tile: int,
                   resize_idx: int = -1) -> tuple[int, int]:
    """The (rows, cols) grid of projector blocks that :func:`s2_blocks` returns for one image.

    Args:
        block_size: the image's (rows, cols) at the last scale, or None for a single tile.
        scales: S2 scales in pixels, e.g. (448, 896, 1344).
        tile: tile side in pixels (448).
        resize_idx: index of the scale whose map size all scales are resized to.

    Returns:
        ``block_size`` for the last scale, ``(s/tile, s/tile)`` for another scale s, (1, 1) for None.
    """
    if block_size is None:
        return (1, 1)
    return _scale_grids(block_size, scales, tile)[resize_idx]


def s2_blocks(feats: Tensor, block_size: tuple[int, int] | None, scales: tuple[int, ...], tile: int,
              resize_idx: int = -1) -> Tensor:
    """Merge the multi-scale tile features of ONE image into projector blocks (spec §6.2, §6.3).

    Args:
        feats: (n_tiles, g*g, C) tower outputs in preprocessing order: the tiles of each scale but the
            last ((s/tile)² each, row-major), then rows*cols tiles of the last scale (row-major).
            With ``block_size`` None: (1, g*g, C), one tile.
        block_size: (rows, cols) of the last scale, or None.
        scales: S2 scales in pixels, e.g. (448, 896, 1344).
        tile: tile side in pixels (448).
        resize_idx: index of the scale whose map size all scales are resized to (-1: the last).

    Returns:
        (n_blocks, g*g, C*len(scales)) with n_blocks = product of :func:`s2_output_grid`, blocks
        row-major, tokens of each block row-major, channels in scale order. With ``block_size`` None
        the single tile's channels are repeated len(scales) times: (1, g*g, C*len(scales)).
    """
    n, t, c = feats.shape
    g = math.isqrt(t)
    if g * g != t:
        raise ValueError(f"expected a square token grid per tile, got {t} tokens")
    if block_size is None:
        if n != 1:
            raise ValueError(f"an image without block size must be one tile, got {n}")
        return feats.repeat(1, 1, len(scales))  # (1, g*g, C*S)
    grids = _scale_grids(block_size, scales, tile)
    counts = [rows * cols for rows, cols in grids]
    if n != sum(counts):
        raise ValueError(f"block size {tuple(block_size)} at scales {tuple(scales)} needs {sum(counts)} "
                         f"tiles ({' + '.join(map(str, counts))}), got {n}")
    maps = feats.transpose(1, 2).reshape(n, c, g, g)  # (n_tiles, C, g, g)
    per_scale = [merge_chessboard(m, rows, cols) for m, (rows, cols) in zip(maps.split(counts), grids)]
    size = per_scale[resize_idx].shape[-2:]
    resized = [nn.functional.interpolate(m.to(torch.float32), size=size, mode="area").to(m.dtype)
               for m in per_scale]  # each (1, C, H, W)
    merged = torch.cat(resized, dim=1)  # (1, C*S, H, W)
    blocks = split_chessboard(merged, *grids[resize_idx])  # (n_blocks, C*S, g, g)
    return blocks.flatten(2).transpose(1, 2)  # (n_blocks, g*g, C*S)


def s2_unblock(tokens: Tensor, block_size: tuple[int, int]) -> Tensor:
    """Stitch projected blocks back into one row-major token sequence (spec §6.2 step 6).

    Args:
        tokens: (rows*cols, t, D) projector outputs, blocks row-major, t = side² tokens each.
        block_size: (rows, cols) block grid (see :func:`s2_output_grid`).

    Returns:
        (rows*cols*t, D): the (rows*side) x (cols*side) map, flattened row-major.
    """
    n, t, d = tokens.shape
    rows, cols = block_size
    side = math.isqrt(t)
    if side * side != t or n != rows * cols:
        raise ValueError(f"expected {rows}*{cols} blocks of a square token grid, got {n} blocks of {t}")
    board = tokens.reshape(rows, cols, side, side, d).permute(0, 2, 1, 3, 4)  # (rows, side, cols, side, D)
    return board.reshape(n * t, d)
