"""SmoothQuant and AWQ against their naive baselines, and exact scale folding."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from transformers import Qwen2Config
from transformers.models.qwen2.modeling_qwen2 import Qwen2DecoderLayer, Qwen2RotaryEmbedding

from nvila.quant.awq import awq_quantize
from nvila.quant.groups import Group, fold_scale, qwen2_groups
from nvila.quant.linear import W4A16Linear, W8A8Linear
from nvila.quant.smoothquant import smooth_and_quantize

K, N = 256, 128


def _outlier_inputs(rows: int, seed: int) -> torch.Tensor:
    """(rows, K) activations where 4 fixed channels are ~40x larger than the rest (as in real LLMs)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, K, generator=g)
    x[:, [3, 50, 101, 200]] *= 40.0
    return x


class _Pair(nn.Module):
    """A norm-like producer ``prev`` followed by one linear, the smallest foldable group."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.prev = nn.LayerNorm(K, elementwise_affine=True)
        with torch.no_grad():
            self.prev.weight.uniform_(0.5, 1.5)
        self.fc = nn.Linear(K, N)

    def forward(self, x):
        return self.fc(self.prev(x))


def _err(model, x, ref):
    with torch.no_grad():
        return float((model(x) - ref).norm() / ref.norm())


def test_awq_beats_round_to_nearest_on_outlier_channels():
    layer = _Pair()
    calib, test = _outlier_inputs(512, 1), _outlier_inputs(512, 2)
    with torch.no_grad():
        ref = layer(test)
        h = layer.prev(calib)
    rtn = _Pair()
    rtn.fc = W4A16Linear.from_float(rtn.fc, group_size=128)
    awq = _Pair()
    awq_quantize(awq, [Group(("fc",), "prev")], {"fc": h}, {"fc": h.abs().mean(0)}, 128)
    assert isinstance(awq.fc, W4A16Linear) and awq.fc.input_scale is None  # folded into the norm
    e_rtn, e_awq = _err(rtn, test, ref), _err(awq, test, ref)
    print(f"AWQ {e_awq:.4f} vs RTN {e_rtn:.4f}")
    assert e_awq < 0.8 * e_rtn, (e_awq, e_rtn)


def test_smoothquant_beats_naive_w8a8_on_outlier_channels():
    layer = _Pair()
    test = _outlier_inputs(256, 3)
    with torch.no_grad():
        ref = layer(test)
        amax = layer.prev(_outlier_inputs(256, 4)).abs().amax(0)
    naive = _Pair()
    naive.fc = W8A8Linear.from_float(naive.fc)
    smooth = _Pair()
    smooth_and_quantize(smooth, [Group(("fc",), "prev")], {"fc": amax})
    e_naive, e_smooth = _err(naive, test, ref), _err(smooth, test, ref)
    print(f"SmoothQuant {e_smooth:.4f} vs naive {e_naive:.4f}")
    assert e_smooth < 0.5 * e_naive, (e_smooth, e_naive)


@pytest.mark.parametrize("kv_heads", [4, 2])  # multi-head (o_proj folds into v_proj) and grouped-query
def test_folding_preserves_a_qwen2_layer(kv_heads):
    cfg = Qwen2Config(hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=kv_heads,
                      vocab_size=10)
    cfg._attn_implementation = "sdpa"
    torch.manual_seed(0)
    layer = Qwen2DecoderLayer(cfg, 0).eval()
    x = torch.randn(2, 9, 64)
    pos = torch.arange(9)[None]
    rope = Qwen2RotaryEmbedding(cfg)(x, pos)
    with torch.no_grad():
        ref = layer(x, position_ids=pos, position_embeddings=rope)
        explicit = {}
        for g in qwen2_groups(layer):
            s = torch.rand(layer.get_submodule(g.linears[0]).in_features) + 0.5
            inv = fold_scale(layer, g, s)
            if inv is not None:  # emulate the runtime module's input multiply
                explicit[g.linears[0]] = layer.get_submodule(g.linears[0]).register_forward_pre_hook(
                    lambda m, a, inv=inv: (a[0] * inv,))
        out = layer(x, position_ids=pos, position_embeddings=rope)
    assert ("self_attn.o_proj" in explicit) == (kv_heads != 4)
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4)
