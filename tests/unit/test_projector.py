"""Projector: space-to-channel order (spec §7.1), layer stacks and keys (§7.2), token counts."""

import math

import pytest
import torch
import torch.nn.functional as F

from nvila.projector import PROJECTORS, build_projector, space_to_channel, tokens_per_tile


def _grid(side: int, start: int = 0, channels: int = 1) -> torch.Tensor:
    """(1, side*side, channels) tokens whose value is the row-major index (+ start)."""
    values = torch.arange(start, start + side * side, dtype=torch.float32)
    return values[None, :, None].repeat(1, 1, channels)


def _naive_space_to_channel(x: torch.Tensor, k: int) -> torch.Tensor:
    b, n, c = x.shape
    s = math.isqrt(n)
    g = -(-s // k)
    out = torch.zeros(b, g * g, k * k * c)
    for i in range(g):
        for j in range(g):
            parts = []
            for m in range(k):
                for q in range(k):
                    r, col = k * i + m, k * j + q
                    parts.append(x[:, r * s + col] if r < s and col < s else torch.zeros(b, c))
            out[:, i * g + j] = torch.cat(parts, dim=-1)
    return out


def test_space_to_channel_2x2_even():
    out = space_to_channel(_grid(4), 2)
    assert out[0].tolist() == [[0, 1, 4, 5], [2, 3, 6, 7], [8, 9, 12, 13], [10, 11, 14, 15]]


def test_space_to_channel_2x2_odd_pads_bottom_right():
    out = space_to_channel(_grid(5, start=1), 2)[0]
    assert out.shape == (9, 4)
    assert out[:3].tolist() == [[1, 2, 6, 7], [3, 4, 8, 9], [5, 0, 10, 0]]
    assert out[-1].tolist() == [25, 0, 0, 0]


def test_space_to_channel_3x3():
    out = space_to_channel(_grid(4, start=1), 3)[0]
    assert out.tolist() == [
        [1, 2, 3, 5, 6, 7, 9, 10, 11],
        [4, 0, 0, 8, 0, 0, 12, 0, 0],
        [13, 14, 15, 0, 0, 0, 0, 0, 0],
        [16, 0, 0, 0, 0, 0, 0, 0, 0],
    ]


def test_space_to_channel_keeps_channel_vectors_whole():
    x = torch.stack([_grid(4)[..., 0], 100 + _grid(4)[..., 0]], dim=-1)  # (1, 16, 2): token n = [n, 100+n]
    out = space_to_channel(x, 2)[0]
    assert out[1].tolist() == [2, 102, 3, 103, 6, 106, 7, 107]


@pytest.mark.parametrize("side,k", [(4, 2), (5, 2), (7, 3), (6, 3), (8, 3), (3, 2)])
def test_space_to_channel_matches_loop(side, k):
    x = torch.randn(2, side * side, 3)
    torch.testing.assert_close(space_to_channel(x, k), _naive_space_to_channel(x, k), rtol=0, atol=0)


def test_space_to_channel_rejects_non_square():
    with pytest.raises(ValueError, match="square"):
        space_to_channel(torch.zeros(1, 15, 2), 2)


C, D = 9, 16
EXPECTED_SHAPES = {
    "mlp_downsample": {"1": [(4 * C,)] * 2, "2": [(D, 4 * C), (D,)], "4": [(D, D), (D,)]},
    "mlp_downsample_2x2_fix": {"1": [(4 * C,)] * 2, "2": [(D, 4 * C), (D,)], "4": [(D, D), (D,)]},
    "mlp_downsample_3x3_fix": {
        "1": [(9 * C,)] * 2, "2": [(3 * C, 9 * C), (3 * C,)], "4": [(3 * C,)] * 2,
        "5": [(D, 3 * C), (D,)], "7": [(D, D), (D,)],
    },
    "mlp_downsample_3x3_s2": {
        "1": [(81,)] * 2, "2": [(27, 81), (27,)], "4": [(27,)] * 2, "5": [(9, 27), (9,)], "7": [(9,)] * 2,
        "8": [(3, 9), (3,)], "10": [(3,)] * 2, "11": [(D, 3), (D,)], "13": [(D, D), (D,)],
    },
    "mlp_downsample_3x3_s2_new": {
        "1": [(81,)] * 2, "2": [(36, 81), (36,)], "4": [(36,)] * 2, "5": [(18, 36), (18,)],
        "7": [(18,)] * 2, "8": [(9, 18), (9,)], "10": [(9,)] * 2, "11": [(3, 9), (3,)], "13": [(3,)] * 2,
        "14": [(D, 3), (D,)], "16": [(D, D), (D,)],
    },
    "mlp1x_gelu": {"0": [(D, C), (D,)]},
    "mlp2x_gelu": {"0": [(D, C), (D,)], "2": [(D, D), (D,)]},
    "mlp3x_gelu": {"0": [(D, C), (D,)], "2": [(D, D), (D,)], "4": [(D, D), (D,)]},
}


@pytest.mark.parametrize("projector_type", sorted(EXPECTED_SHAPES))
def test_state_dict_keys_and_shapes(projector_type):
    sd = build_projector(projector_type, C, D).state_dict()
    expected = {}
    for idx, (w, b) in EXPECTED_SHAPES[projector_type].items():
        expected[f"layers.{idx}.weight"] = w
        expected[f"layers.{idx}.bias"] = b
    assert {k: tuple(v.shape) for k, v in sd.items()} == expected


def test_linear_and_identity_keys():
    assert {k: tuple(v.shape) for k, v in build_projector("linear", C, D).state_dict().items()} == {
        "layers.weight": (D, C), "layers.bias": (D,)}
    assert build_projector("identity", C, C).state_dict() == {}
    x = torch.randn(2, 16, C)
    assert torch.equal(build_projector("identity", C, C)(x), x)


def test_registry_covers_published_types():
    assert {"mlp_downsample", "mlp_downsample_2x2_fix", "mlp_downsample_3x3_fix", "mlp_downsample_3x3_s2",
            "mlp_downsample_3x3_s2_new", "linear", "mlp2x_gelu", "identity"} <= set(PROJECTORS)


@pytest.mark.parametrize("bad", ["mlp_downsample_4x4", "mlp0x_gelu", "mlpx_gelu", ""])
def test_unknown_type_lists_valid(bad):
    with pytest.raises(ValueError, match="mlp_downsample_3x3_fix.*mlp<N>x_gelu"):
        build_projector(bad, C, D)
    with pytest.raises(ValueError):
        tokens_per_tile(bad, 32)


def test_tokens_per_tile():
    assert tokens_per_tile("mlp_downsample", 32) == 256
    assert tokens_per_tile("mlp_downsample_2x2_fix", 32) == 256
    assert tokens_per_tile("mlp_downsample_3x3_fix", 32) == 121
    assert tokens_per_tile("mlp_downsample_3x3_s2_new", 32) == 121
    assert tokens_per_tile("mlp_downsample", 5) == 9
    for t in ("linear", "mlp2x_gelu", "mlp7x_gelu", "identity"):
        assert tokens_per_tile(t, 32) == 1024


@pytest.mark.parametrize("projector_type", [*sorted(EXPECTED_SHAPES), "linear"])
@pytest.mark.parametrize("grid", [4, 5])
def test_forward_shape_matches_tokens_per_tile(projector_type, grid):
    out = build_projector(projector_type, C, D)(torch.randn(2, grid * grid, C))
    assert out.shape == (2, tokens_per_tile(projector_type, grid), D)


def test_3x3_fix_forward_math():
    torch.manual_seed(0)
    proj = build_projector("mlp_downsample_3x3_fix", C, D)
    for p in proj.parameters():
        torch.nn.init.normal_(p)
    x = torch.randn(2, 25, C)
    L = proj.layers
    h = torch.zeros(2, 4, 9 * C)
    grid = x.view(2, 5, 5, C)
    padded = torch.zeros(2, 6, 6, C)
    padded[:, :5, :5] = grid
    for i in range(2):
        for j in range(2):
            h[:, i * 2 + j] = padded[:, 3 * i:3 * i + 3, 3 * j:3 * j + 3].reshape(2, 9 * C)
    h = F.layer_norm(h, (9 * C,), L[1].weight, L[1].bias, eps=1e-5)
    h = F.gelu(F.linear(h, L[2].weight, L[2].bias), approximate="none")
    h = F.layer_norm(h, (3 * C,), L[4].weight, L[4].bias, eps=1e-5)
    h = F.gelu(F.linear(h, L[5].weight, L[5].bias), approximate="none")
    h = F.linear(h, L[7].weight, L[7].bias)
    torch.testing.assert_close(proj(x), h, rtol=1e-5, atol=1e-5)


def test_builds_on_meta_device():
    with torch.device("meta"):
        proj = build_projector("mlp_downsample", 3456, 3584)
    assert proj.layers[2].weight.shape == (3584, 13824)
    assert proj.layers[2].weight.is_meta
