"""Runtime quantized linears: kernels vs the dequantize-then-fp32 reference, formats, cache invalidation."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from nvila.quant.linear import (W4A16Linear, W8A8Linear, build_kernel, pack_nibbles, pick_group_size,
                                quantize_w4, dequantize_w4, reference_forward, unpack_nibbles)


def _relerr(a, b):
    return float((a.detach().float() - b.detach().float()).norm() / b.detach().float().norm())


def _fbgemm_activations(x):
    """What fbgemm's dynamic linear does to its input: per-tensor asymmetric 7-bit (reduce_range)."""
    lo, hi = min(float(x.min()), 0.0), max(float(x.max()), 0.0)
    scale = (hi - lo) / 127
    zero = round(-lo / scale)
    return (torch.clamp(torch.round(x / scale) + zero, 0, 127) - zero) * scale


@pytest.fixture
def linear():
    torch.manual_seed(0)
    return nn.Linear(256, 96)


@pytest.mark.parametrize("rows", [1, 7, 300])
def test_w8a8_cpu_kernel_matches_reference(linear, rows):
    q = W8A8Linear.from_float(linear, input_scale=torch.rand(256) + 0.5)
    x = torch.randn(rows, 256)
    out, ref = q(x), reference_forward(q, x)
    assert out.shape == (rows, 96) and out.dtype == torch.float32
    # the same activation rounding as the kernel: equal up to float summation order
    emulated = reference_forward(q, _fbgemm_activations(x * q.input_scale) / q.input_scale)
    assert _relerr(out, emulated) < 2e-3
    assert _relerr(out, ref) < 4e-2  # fp32 activations: 7-bit rounding of Gaussian data costs ~2-3%
    assert _relerr(ref, linear(x * q.input_scale)) < 1e-2  # int8 weights alone


@pytest.mark.parametrize("rows", [1, 5, 300])
def test_w4a16_cpu_kernel_matches_reference(linear, rows):
    q = W4A16Linear.from_float(linear, group_size=64)
    x = torch.randn(2, rows, 256)
    out, ref = q(x), reference_forward(q, x)
    assert out.shape == (2, rows, 96)
    assert _relerr(out, ref) < 1e-2  # bf16 activations in the int4 kernel: ~0.3%


def test_output_keeps_input_dtype(linear):
    q = W8A8Linear.from_float(linear)
    assert q(torch.randn(3, 256, dtype=torch.bfloat16)).dtype == torch.bfloat16


def test_w4_codes_roundtrip_and_error_bound():
    torch.manual_seed(1)
    w = torch.randn(32, 256)
    codes, scales, zeros = quantize_w4(w, 128)
    assert codes.max() <= 15 and zeros.max() <= 15
    assert torch.equal(unpack_nibbles(pack_nibbles(codes)), codes)
    err = (dequantize_w4(codes, scales, zeros) - w).abs()
    assert bool((err <= scales.repeat_interleave(128, dim=1) / 2 + 1e-6).all())  # half a step at most


def test_group_size_fallback():
    assert pick_group_size(1536) == 128 and pick_group_size(64) == 64 and pick_group_size(96) == 32
    with pytest.raises(ValueError, match="group size"):
        pick_group_size(20)


@pytest.mark.parametrize("cls", [W8A8Linear, W4A16Linear])
def test_load_state_dict_rebuilds_packed_weights(cls):
    torch.manual_seed(2)
    a, b = nn.Linear(128, 64), nn.Linear(128, 64)
    kw = {"group_size": 128} if cls is W4A16Linear else {}
    qa, qb = cls.from_float(a, **kw), cls.from_float(b, **kw)
    x = torch.randn(4, 128)
    before = qa(x)  # builds qa's kernel
    qa.load_state_dict(qb.state_dict())
    assert not torch.allclose(qa(x), before)
    torch.testing.assert_close(qa(x), qb(x))
    assert set(qa.state_dict()) >= {"qweight", "scales", "bias"}  # packed caches are not state


def test_unsupported_device_is_a_clear_error(linear):
    q = W8A8Linear.from_float(linear).to("meta")
    with pytest.raises(ValueError, match="no w8a8 kernel for device 'meta'.*cpu"):
        build_kernel(q)
