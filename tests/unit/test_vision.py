"""Vision tower (spec §5) and dynamic-S2 merge (spec §6) on tiny fixtures."""

import math

import pytest
import torch

from nvila.config import VisionConfig
from nvila.vision import (  # noqa: I001
    VISION_ATTENTION,
    eager_attention_chunked,
    VisionTower,
    merge_chessboard,
    s2_blocks,
    s2_output_grid,
    s2_unblock,
    split_chessboard,
    to_siglip_config,
)
from transformers.models.siglip.modeling_siglip import SiglipVisionModel

SCALES = (448, 896, 1344)
TILE = 448


def _tiny(**kw) -> VisionConfig:
    return VisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
                        image_size=56, patch_size=14, **kw)


def _reference(cfg: VisionConfig, tower: VisionTower) -> SiglipVisionModel:
    ref = SiglipVisionModel(to_siglip_config(cfg)).eval()
    prefix = "vision_model."
    ref.load_state_dict({k[len(prefix):]: v for k, v in tower.state_dict().items()})
    return ref


# ------------------------------------------------------------------------------------- tower
def test_state_dict_keys_are_published_names():
    cfg = _tiny()
    keys = set(VisionTower(cfg).state_dict())
    ref_keys = {"vision_model." + k for k in SiglipVisionModel(to_siglip_config(cfg)).state_dict()}
    assert keys == ref_keys
    for k in ("vision_model.embeddings.patch_embedding.weight", "vision_model.embeddings.position_embedding.weight",
              "vision_model.encoder.layers.0.self_attn.q_proj.weight", "vision_model.encoder.layers.2.mlp.fc2.bias",
              "vision_model.post_layernorm.weight", "vision_model.post_layernorm.bias"):
        assert k in keys
    assert not any(".head." in k for k in keys)


def test_attention_is_bit_identical_to_eager_like_the_reference():
    torch.manual_seed(0)
    tower = VisionTower(_tiny()).eval()
    assert tower.vision_model.config._attn_implementation == VISION_ATTENTION
    x = torch.randn(2, 3, 56, 56)
    with torch.no_grad():
        ours = tower(x)
        for layer in tower.vision_model.encoder.layers:
            layer.self_attn.config._attn_implementation = "eager"
        eager = tower(x)
    assert torch.equal(ours, eager)


def test_vision_attention_is_chunked_eager_in_float32_on_cpu_and_sdpa_otherwise(monkeypatch):
    import nvila.vision as V

    torch.manual_seed(2)
    q, k, v = (torch.randn(2, 3, 19, 8) for _ in range(3))
    module = torch.nn.Module().eval()
    assert torch.equal(V.vision_attention(module, q, k, v, None, 0.35)[0],
                       eager_attention_chunked(module, q, k, v, None, 0.35)[0])
    calls = []

    def sdpa(module, query, key, value, mask, dropout=0.0, scaling=None, **kwargs):
        calls.append((query.device.type, query.dtype, scaling, dropout))
        return query.transpose(1, 2), None

    monkeypatch.setattr(V, "sdpa_attention_forward", sdpa)
    out, _ = V.vision_attention(module, *(t.to("meta") for t in (q, k, v)), None, 0.35)
    half, _ = V.vision_attention(module, *(t.bfloat16() for t in (q, k, v)), None, 0.35)
    assert calls == [("meta", torch.float32, 0.35, 0.0), ("cpu", torch.bfloat16, 0.35, 0.0)]
    assert out.shape == half.shape == (2, 19, 3, 8)


def test_chunked_eager_attention_matches_eager_with_mask_and_ragged_chunks():
    from transformers.models.siglip.modeling_siglip import eager_attention_forward

    torch.manual_seed(1)
    q, k, v = (torch.randn(2, 3, 37, 8) for _ in range(3))
    mask = torch.zeros(2, 1, 37, 37).masked_fill(torch.rand(2, 1, 37, 37) < 0.2, float("-inf"))
    module = torch.nn.Module().eval()
    ref, _ = eager_attention_forward(module, q, k, v, mask, 0.35)
    ours, _ = eager_attention_chunked(module, q, k, v, mask, 0.35, chunk=16)
    assert torch.allclose(ours, ref, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_chunked_attention_with_reused_buffers_is_bitwise_the_per_chunk_expression(dtype):
    """Every path goes one image at a time and the float32 one writes into buffers reused across
    chunks; every element must still be what the plain per-chunk expression gives (the form that
    is bitwise the reference's eager attention), for ragged chunks, per-image and shared masks."""
    def plain(q, k, v, mask, scaling, chunk):
        out = torch.empty_like(q)
        for start in range(0, q.shape[2], chunk):
            rows = slice(start, start + chunk)
            w = torch.matmul(q[:, :, rows], k.transpose(-1, -2)) * scaling
            if mask is not None:
                w = w + mask[..., rows, :]
            out[:, :, rows] = torch.matmul(torch.softmax(w, dim=-1, dtype=torch.float32).to(q.dtype), v)
        return out.transpose(1, 2).contiguous()

    torch.manual_seed(2)
    module = torch.nn.Module().eval()
    q, k, v = (torch.randn(3, 4, 75, 16).to(dtype) for _ in range(3))
    masks = [None, torch.randn(3, 1, 75, 75), torch.randn(1, 1, 75, 75).to(dtype)]
    for mask in masks:
        for chunk in (16, 32, 128):
            ours, _ = eager_attention_chunked(module, q, k, v, mask, 0.25, chunk=chunk)
            assert ours.is_contiguous() and ours.shape == (3, 75, 4, 16)
            assert torch.equal(ours, plain(q, k, v, mask, 0.25, chunk)), (mask is None, chunk)
    q.requires_grad_()  # training (the LayerNorm-only ViT recipe): the autograd path, same values
    ours, _ = eager_attention_chunked(module, q, k, v, masks[1], 0.25, chunk=32)
    ours.float().sum().backward()
    assert torch.equal(ours.detach(), plain(q.detach(), k, v, masks[1], 0.25, 32)) and q.grad is not None


@pytest.mark.parametrize("select_layer", [-2, -1, 0, 1, -4])
def test_forward_matches_hidden_states(select_layer):
    torch.manual_seed(0)
    cfg = _tiny(select_layer=select_layer)
    tower = VisionTower(cfg).eval()
    pixels = torch.randn(3, 3, 56, 56)
    with torch.no_grad():
        ref = _reference(cfg, tower)(pixels, output_hidden_states=True).hidden_states[select_layer]
        out = tower(pixels)
    assert out.shape == (3, 16, 32)
    assert (out - ref).abs().max() <= 1e-5


def test_patch_feature_drops_first_token():
    torch.manual_seed(0)
    cfg = _tiny(select_feature="patch")
    tower = VisionTower(cfg).eval()
    pixels = torch.randn(2, 3, 56, 56)
    with torch.no_grad():
        ref = _reference(cfg, tower)(pixels, output_hidden_states=True).hidden_states[-2]
        out = tower(pixels)
    assert out.shape == (2, 15, 32)
    torch.testing.assert_close(out, ref[:, 1:], rtol=0, atol=1e-5)


def test_unused_layer_does_not_run():
    tower = VisionTower(_tiny()).eval()

    def fail(*_):
        raise AssertionError("the last encoder layer must not run")

    tower.vision_model.encoder.layers[-1].register_forward_pre_hook(fail)
    tower.vision_model.post_layernorm.register_forward_pre_hook(fail)
    with torch.no_grad():
        tower(torch.randn(1, 3, 56, 56))


def test_meta_construction_then_assign_load():
    cfg = _tiny()
    real = VisionTower(cfg).eval()
    with torch.device("meta"):
        tower = VisionTower(cfg)
    assert tower.vision_model.embeddings.patch_embedding.weight.is_meta
    tower.load_state_dict(real.state_dict(), assign=True, strict=True)
    pixels = torch.randn(2, 3, 56, 56)
    with torch.no_grad():
        torch.testing.assert_close(tower.eval()(pixels), real(pixels), rtol=0, atol=0)


# ------------------------------------------------------------------------------- chessboards
def _naive_merge(x: torch.Tensor, nh: int, nw: int) -> torch.Tensor:
    b = x.shape[0] // (nh * nw)
    rows = [torch.cat([x[(i * nw + j) * b:(i * nw + j + 1) * b] for j in range(nw)], dim=-1) for i in range(nh)]
    return torch.cat(rows, dim=-2)


@pytest.mark.parametrize("nh,nw,b", [(1, 1, 1), (2, 2, 1), (3, 4, 2), (1, 12, 1), (5, 2, 3)])
def test_chessboard_merge_and_split(nh, nw, b):
    x = torch.randn(nh * nw * b, 3, 4, 5)
    merged = merge_chessboard(x, nh, nw)
    assert torch.equal(merged, _naive_merge(x, nh, nw))
    assert torch.equal(split_chessboard(merged, nh, nw), x)


# ---------------------------------------------------------------------------------- dynamic S2
def _area_resize(m: torch.Tensor, h_out: int, w_out: int) -> torch.Tensor:
    """Area interpolation written out: cell (y, x) averages rows [floor(y*H/h), ceil((y+1)*H/h))."""
    c, h_in, w_in = m.shape
    out = torch.zeros(c, h_out, w_out, dtype=torch.float64)
    for y in range(h_out):
        y0, y1 = (y * h_in) // h_out, -(-((y + 1) * h_in) // h_out)
        for x in range(w_out):
            x0, x1 = (x * w_in) // w_out, -(-((x + 1) * w_in) // w_out)
            out[:, y, x] = m[:, y0:y1, x0:x1].double().mean(dim=(1, 2))
    return out


def _naive_s2_blocks(feats, block_size, scales, tile, resize_idx):
    n, t, c = feats.shape
    g = math.isqrt(t)
    tiles = [feats[i].t().reshape(c, g, g) for i in range(n)]
    grids = [(s // tile, s // tile) for s in scales[:-1]] + [block_size]
    maps, pos = [], 0
    for rows, cols in grids:
        m = torch.zeros(c, rows * g, cols * g, dtype=feats.dtype)
        for r in range(rows):
            for q in range(cols):
                m[:, r * g:(r + 1) * g, q * g:(q + 1) * g] = tiles[pos]
                pos += 1
        maps.append(m)
    assert pos == n
    h, w = maps[resize_idx].shape[1:]
    big = torch.cat([_area_resize(m.float(), h, w).to(feats.dtype) for m in maps])  # (C*S, H, W)
    out = []
    brows, bcols = grids[resize_idx]
    for r in range(brows):
        for q in range(bcols):
            blk = big[:, r * g:(r + 1) * g, q * g:(q + 1) * g]
            out.append(torch.stack([blk[:, y, x] for y in range(g) for x in range(g)]))
    return torch.stack(out)


@pytest.mark.parametrize("block_size", [(3, 4), (2, 5), (1, 12), (3, 3), (4, 3)])
@pytest.mark.parametrize("resize_idx", [-1, 0, 1])
def test_s2_blocks_matches_naive(block_size, resize_idx):
    torch.manual_seed(0)
    g, c = 4, 3
    n = 1 + 4 + block_size[0] * block_size[1]
    feats = torch.randn(n, g * g, c)
    out = s2_blocks(feats, block_size, SCALES, TILE, resize_idx)
    grid = s2_output_grid(block_size, SCALES, TILE, resize_idx)
    assert out.shape == (grid[0] * grid[1], g * g, 3 * c)
    torch.testing.assert_close(out, _naive_s2_blocks(feats, block_size, SCALES, TILE, resize_idx),
                               rtol=0, atol=1e-5)


def test_s2_blocks_resizes_in_float32_and_keeps_dtype():
    torch.manual_seed(0)
    feats = torch.randn(1 + 4 + 6, 16, 3).to(torch.bfloat16)
    out = s2_blocks(feats, (2, 3), SCALES, TILE)
    assert out.dtype == torch.bfloat16
    assert torch.equal(out, _naive_s2_blocks(feats, (2, 3), SCALES, TILE, -1))


def test_s2_blocks_channel_order_is_scale_order():
    g, c = 4, 1
    block = (3, 3)  # every scale is an integer up-scaling of the last map: replicated pixels
    feats = torch.cat([torch.full((1, g * g, c), 1.0), torch.full((4, g * g, c), 2.0),
                       torch.full((9, g * g, c), 3.0)])
    out = s2_blocks(feats, block, SCALES, TILE)
    assert torch.equal(out, torch.tensor([1.0, 2.0, 3.0]).expand(9, g * g, 3))


def test_s2_blocks_without_block_size_repeats_channels():
    feats = torch.randn(1, 16, 5)
    out = s2_blocks(feats, None, SCALES, TILE)
    assert out.shape == (1, 16, 15)
    assert torch.equal(out, torch.cat([feats] * 3, dim=-1))
    assert s2_output_grid(None, SCALES, TILE) == (1, 1)
    with pytest.raises(ValueError):
        s2_blocks(torch.randn(2, 16, 5), None, SCALES, TILE)


def test_s2_blocks_rejects_wrong_tile_count():
    with pytest.raises(ValueError, match="needs 17 tiles"):
        s2_blocks(torch.randn(16, 16, 2), (3, 4), SCALES, TILE)


def test_s2_output_grid():
    assert s2_output_grid((3, 4), SCALES, TILE) == (3, 4)
    assert s2_output_grid((3, 4), SCALES, TILE, 1) == (2, 2)
    assert s2_output_grid((3, 4), SCALES, TILE, 0) == (1, 1)


@pytest.mark.parametrize("block_size", [(3, 4), (2, 5), (1, 12), (1, 1)])
def test_s2_unblock(block_size):
    rows, cols = block_size
    tokens = torch.randn(rows * cols, 9, 6)  # 3x3 tokens per block
    maps = tokens.transpose(1, 2).reshape(rows * cols, 6, 3, 3)
    expected = _naive_merge(maps, rows, cols)[0].flatten(1).t()
    assert torch.equal(s2_unblock(tokens, block_size), expected)


def test_s2_unblock_inverts_block_split():
    torch.manual_seed(0)
    feats = torch.randn(1 + 4 + 10, 16, 2)
    blocks = s2_blocks(feats, (2, 5), SCALES, TILE)  # (10, 16, 6)
    full = s2_unblock(blocks, (2, 5))  # (160, 6): the merged 8x20 map, row-major
    last = merge_chessboard(feats[5:].transpose(1, 2).reshape(10, 2, 4, 4), 2, 5)[0]  # (2, 8, 20)
    assert torch.equal(full[:, 4:], last.flatten(1).t())
