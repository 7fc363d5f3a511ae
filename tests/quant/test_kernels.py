"""Runtime quantized linears: kernels vs the dequantize-then-fp32 reference, formats, cache invalidation."""

from __future__ import annotations

import functools
import logging
import sys

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from nvila.quant import cpu_kernels
from nvila.quant import linear as quant_linear
from nvila.quant.linear import (W4A16_CPU_KERNELS, W4A16Linear, W8A8Linear, build_kernel, pack_nibbles,
                                pick_group_size, quantize_w4, dequantize_w4, reference_forward, unpack_nibbles)


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


def _row_int8_activations(x):
    """What the avx2 W8A8 GEMV (and the CUDA path) does to its input: symmetric int8 per row."""
    s = (x.abs().amax(-1, keepdim=True) / 127).clamp(min=1e-8)
    return torch.round(x / s).clamp(-127, 127) * s


@pytest.mark.parametrize("kernel", ["auto", *quant_linear.W8A8_CPU_KERNELS])
@pytest.mark.parametrize("rows", [1, 7, 300])
def test_w8a8_cpu_kernel_matches_reference(monkeypatch, linear, kernel, rows):
    if kernel == "onednn" and "onednn" not in torch.backends.quantized.supported_engines:
        pytest.skip("this torch build has no onednn quantized engine")
    monkeypatch.setenv("NVILA_W8A8_CPU_KERNEL", kernel)
    q = W8A8Linear.from_float(linear, input_scale=torch.rand(256) + 0.5)
    x = torch.randn(rows, 256)
    out, ref = q(x), reference_forward(q, x)
    assert out.shape == (rows, 96) and out.dtype == torch.float32
    ran = q._kernel.kernel(rows)
    gemv = ran in ("avx2", "avx512-vnni")
    assert kernel in ("auto", ran) or (kernel == "avx512-vnni" and ran == "avx2"
                                       and not cpu_kernels.cpu_supports_avx512_vnni()) or (
        kernel in ("avx2", "avx512-vnni") and ran == "fbgemm" and not cpu_kernels.load_cpu_kernels())
    # the same activation rounding as the kernel: equal up to float summation order
    rounding = _row_int8_activations if gemv else _fbgemm_activations
    emulated = reference_forward(q, rounding(x * q.input_scale) / q.input_scale)
    assert _relerr(out, emulated) < (1e-5 if gemv else 2e-3)  # nvila's GEMVs: exact integer dots
    assert _relerr(out, ref) < 4e-2  # fp32 activations: 7-bit rounding of Gaussian data costs ~2-3%
    assert _relerr(ref, linear(x * q.input_scale)) < 1e-2  # int8 weights alone


@pytest.mark.parametrize("amx", [True, False])
@pytest.mark.parametrize("avx2", [True, False])
@pytest.mark.parametrize("vnni", [True, False])
def test_w8a8_kernels_follow_the_isa_and_the_row_count(monkeypatch, linear, amx, avx2, vnni):
    monkeypatch.delenv("NVILA_W8A8_CPU_KERNEL", raising=False)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: amx, raising=False)
    if vnni and not cpu_kernels.cpu_supports_avx512_vnni():
        pytest.skip("this CPU has no AVX-512 VNNI: the avx512-vnni GEMV cannot run here")
    monkeypatch.setattr(cpu_kernels, "cpu_supports_avx512_vnni", lambda: vnni)
    if not avx2:
        monkeypatch.setattr(cpu_kernels, "load_cpu_kernels", lambda: False)
    one = ("avx512-vnni" if vnni else "avx2") if avx2 and cpu_kernels.load_cpu_kernels() else "fbgemm"
    few = "avx512-vnni" if one == "avx512-vnni" else "fbgemm"  # 2-3 rows
    many = "onednn" if amx and "onednn" in torch.backends.quantized.supported_engines else "fbgemm"
    engine_before = torch.backends.quantized.engine
    tower, llm = W8A8Linear.from_float(linear), W8A8Linear.from_float(linear)
    tower(torch.randn(300, 256))  # only prefill-sized inputs: one packed copy, no GEMV build
    assert set(tower._kernel.packed) == {many} and tower._kernel.gemv_ok is None
    xs = [torch.randn(rows, 256) for rows in (1, 3, 300)]
    outs = [llm(x) for x in xs]
    assert llm._kernel.names == (one, few, many)
    assert [llm._kernel.kernel(rows) for rows in (1, 2, 3, 4, 300)] == [one, few, few, many, many]
    assert set(llm._kernel.packed) == {k for k in (one, few, many) if k in ("fbgemm", "onednn")}  # GEMVs pack nothing
    assert torch.backends.quantized.engine == engine_before  # prepack restores the global engine
    for x, out in zip(xs, outs):
        assert _relerr(out, reference_forward(llm, x)) < 4e-2


def test_a_w8a8_weight_with_code_minus_128_does_not_run_the_avx2_gemv(monkeypatch, linear):
    monkeypatch.setenv("NVILA_W8A8_CPU_KERNEL", "avx2")
    q = W8A8Linear.from_float(linear)
    q.qweight[0, 0] = -128  # outside quantize_w8's range: the GEMV's sign trick needs -127..127
    x = torch.randn(1, 256)
    out = q(x)
    assert q._kernel.names == ("fbgemm",) * 3
    assert _relerr(out, reference_forward(q, x)) < 4e-2


def test_the_vnni_gemv_takes_code_minus_128_and_equals_the_avx2_one(monkeypatch, linear):
    ops = _avx2_ops()
    if not cpu_kernels.cpu_supports_avx512_vnni():
        pytest.skip("this CPU has no AVX-512 VNNI: the avx512-vnni GEMV cannot run here")
    g = torch.Generator().manual_seed(0)
    for n, k, rows in ((96, 256, 1), (37, 100, 3), (8960, 1536, 2)):  # K with and without a 64-byte tail
        q = torch.randint(-127, 128, (n, k), dtype=torch.int8, generator=g)
        scales, bias, x = torch.rand(n, generator=g) * 0.01, torch.randn(n, generator=g), torch.randn(rows, k, generator=g)
        assert torch.equal(ops.w8a8_linear_vnni(x, q, scales, bias), ops.w8a8_linear_dyn8(x, q, scales, bias))
        q[:, :3] = -128
        c = _row_int8_activations(x) / (x.abs().amax(-1, keepdim=True) / 127).clamp(min=1e-8)  # the codes
        ref = (c.round().double() @ q.double().t()) * (x.abs().amax(-1, keepdim=True) / 127).clamp(min=1e-8).double()
        ref = ref * scales.double() + bias.double()
        assert _relerr(ops.w8a8_linear_vnni(x, q, scales, bias), ref) < 1e-6
    monkeypatch.setenv("NVILA_W8A8_CPU_KERNEL", "avx512-vnni")
    m = W8A8Linear.from_float(linear)
    m.qweight[0, 0] = -128
    x = torch.randn(1, 256)
    out = m(x)
    assert m._kernel.names == ("avx512-vnni",) * 3 and m._kernel.gemv_ok
    assert _relerr(out, reference_forward(m, x)) < 4e-2


def test_unknown_w8a8_kernel_is_a_clear_error(monkeypatch, linear):
    monkeypatch.setenv("NVILA_W8A8_CPU_KERNEL", "vnni")
    with pytest.raises(ValueError, match="NVILA_W8A8_CPU_KERNEL='vnni'; valid: auto, avx2, avx512-vnni, fbgemm, onednn"):
        W8A8Linear.from_float(linear)(torch.randn(1, 256))


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


# --------------------------------------------------------- nvila's AVX2 W4A16 and W8A8 kernels (cpu_kernels.cpp)
def _avx2_ops():
    if not cpu_kernels.load_cpu_kernels():
        pytest.skip("nvila's AVX2 kernels are not available here (they need x86-64 with AVX2 + FMA, a C++ "
                    "compiler and ninja; the log says which is missing): W4A16 runs torch's int4pack and "
                    "W8A8 fbgemm, tested above and below")
    return torch.ops.nvila


def _random_w4(n, k, group_size, bias, seed=0):
    g = torch.Generator().manual_seed(seed)
    m = W4A16Linear(k, n, group_size=group_size, bias=bias)
    m.qweight = torch.randint(0, 256, (n, k // 2), dtype=torch.uint8, generator=g)
    m.scales = torch.rand(n, k // group_size, generator=g) * 0.02 + 0.001
    m.zeros = torch.randint(0, 16, (n, k // group_size), dtype=torch.uint8, generator=g)
    if bias:
        m.bias = torch.randn(n, generator=g)
    return m


def _dyn8_activations(x, group_size):
    """What the dyn8 kernel does to its input: symmetric int8 per row and group, scale amax / 127."""
    xg = x.reshape(x.shape[0], -1, group_size)
    s = (xg.abs().amax(-1, keepdim=True) / 127).clamp(min=1e-30)
    return (torch.round(xg / s) * s).reshape(x.shape)


SHAPES = [(96, 256, 64, True), (97, 1536, 128, False), (8, 512, 256, True), (260, 8960, 128, False)]


def _avx512_ops():
    ops = _avx2_ops()
    if not cpu_kernels.cpu_supports_avx512():
        pytest.skip(f"this CPU (torch capability {torch.backends.cpu.get_cpu_capability()}) has no AVX-512: "
                    "the avx512-fp32 kernel cannot run here; W4A16 runs avx2-fp32, tested with it")
    return ops


@pytest.mark.parametrize("n,k,group_size,bias", [*SHAPES, (5, 1024, 1024, True)])
@pytest.mark.parametrize("rows", [1, 3, 9])
@pytest.mark.parametrize("op", ["w4a16_linear_f32", "w4a16_linear_f32_avx512"])
def test_fp32_gemvs_match_reference(n, k, group_size, bias, rows, op):
    if op.endswith("avx512") and group_size % 128:
        return  # its group-size check is tested below
    ops = _avx512_ops() if op.endswith("avx512") else _avx2_ops()
    m = _random_w4(n, k, group_size, bias)
    x = torch.randn(rows, k)
    out = getattr(ops, op)(x, m.qweight, m.scales, m.zeros, group_size, m.bias)
    ref = F.linear(x.double(), m.dequantized_weight().double(), None if m.bias is None else m.bias.double())
    # fp32 products are exact; only the summation order differs from a float64 reference (and between the two)
    assert out.shape == (rows, n) and out.dtype == torch.float32
    assert _relerr(out, ref) < 2e-6
    assert torch.equal(getattr(ops, op)(x, m.qweight, m.scales, m.zeros, group_size, m.bias), out)
    # rows share weight decodes 2 at a time (9 = 4 x 2 + 1, 3 = 2 + 1): each row's result is its own alone
    assert all(torch.equal(getattr(ops, op)(x[i:i + 1], m.qweight, m.scales, m.zeros, group_size, m.bias),
                           out[i:i + 1]) for i in range(rows))


def test_avx512_fp32_gemv_rejects_group_sizes_below_128():
    ops = _avx512_ops()
    m = _random_w4(16, 256, 64, False)
    with pytest.raises(RuntimeError, match="multiple of 128"):
        ops.w4a16_linear_f32_avx512(torch.randn(1, 256), m.qweight, m.scales, m.zeros, 64, None)


@pytest.mark.parametrize("avx512", [True, False])
@pytest.mark.parametrize("group_size", [64, 128])
@pytest.mark.parametrize("requested", ["auto", "avx512-fp32"])
def test_w4a16_picks_the_avx512_kernel_by_isa_and_group_size(monkeypatch, caplog, avx512, group_size, requested):
    ops = _avx2_ops()
    if avx512:
        _avx512_ops()
    monkeypatch.setattr(cpu_kernels, "cpu_supports_avx512", lambda: avx512)
    monkeypatch.setattr(quant_linear, "_logged", set())
    monkeypatch.setenv("NVILA_W4A16_CPU_KERNEL", requested)
    caplog.set_level(logging.INFO, logger="nvila")
    m = _random_w4(96, 256, group_size, True)
    x = torch.randn(1, 256)
    out = m(x)
    runs = avx512 and group_size == 128
    assert m._kernel.gemv == (ops.w4a16_linear_f32_avx512 if runs else ops.w4a16_linear_f32)
    assert _relerr(out, reference_forward(m, x)) < 2e-6
    [note] = [r.getMessage() for r in caplog.records if r.name.startswith("nvila")]
    assert note.endswith(f"runs the {'avx512-fp32' if runs else 'avx2-fp32'} kernel")
    assert ("needs torch's AVX512" in note) == (requested == "avx512-fp32" and not runs)


@pytest.mark.parametrize("n,k,group_size,bias", SHAPES)
@pytest.mark.parametrize("rows", [1, 9])
def test_avx2_dyn8_gemv_matches_reference(n, k, group_size, bias, rows):
    ops = _avx2_ops()
    m = _random_w4(n, k, group_size, bias)
    x = torch.randn(rows, k)
    out = ops.w4a16_linear_dyn8(x, m.qweight, m.scales, m.zeros, group_size, m.bias)
    emulated = F.linear(_dyn8_activations(x, group_size).double(), m.dequantized_weight().double(),
                        None if m.bias is None else m.bias.double())
    assert _relerr(out, emulated) < 2e-6  # the same activation rounding: integer dots are exact
    assert _relerr(out, reference_forward(m, x)) < 1e-2  # int8 activations: ~0.5% on Gaussian data


@pytest.mark.parametrize("n,k,group_size,bias", SHAPES)
@pytest.mark.parametrize("rows", [1, 9])
def test_avx2_dyn16_gemv_matches_reference(n, k, group_size, bias, rows):
    ops = _avx2_ops()
    m = _random_w4(n, k, group_size, bias)
    x = torch.randn(rows, k)
    out = ops.w4a16_linear_dyn16(x, m.qweight, m.scales, m.zeros, group_size, m.bias)
    assert _relerr(out, reference_forward(m, x)) < 1e-4  # int16 activations: ~3e-5 on Gaussian data


@pytest.mark.parametrize("n,k,group_size,bias", SHAPES)
@pytest.mark.parametrize("rows", [1, 40, 300])  # 300: the large-batch slabs
def test_avx2_dequant_gemm_matches_reference(n, k, group_size, bias, rows):
    ops = _avx2_ops()
    m = _random_w4(n, k, group_size, bias)
    x = torch.randn(rows, k)
    out = ops.w4a16_linear_dequant(x, m.qweight, m.scales, m.zeros, group_size, m.bias)
    ref = F.linear(x.double(), m.dequantized_weight().double(), None if m.bias is None else m.bias.double())
    assert _relerr(out, ref) < 2e-6


def test_avx2_dequantize_is_exact():
    ops = _avx2_ops()
    m = _random_w4(40, 512, 128, False)
    torch.testing.assert_close(ops.w4a16_dequantize(m.qweight, m.scales, m.zeros, 128), m.dequantized_weight(),
                               rtol=0, atol=1e-7)


@pytest.mark.parametrize("n,k,bias", [(96, 256, True), (97, 1536, False), (260, 8960, True), (5, 100, False)])
@pytest.mark.parametrize("rows", [1, 3, 9])
def test_avx2_w8a8_gemv_matches_reference(n, k, bias, rows):
    ops = _avx2_ops()
    g = torch.Generator().manual_seed(0)
    q = torch.randint(-127, 128, (n, k), dtype=torch.int8, generator=g)
    scales = torch.rand(n, generator=g) * 0.02 + 0.001
    b = torch.randn(n, generator=g) if bias else None
    x = torch.randn(rows, k, generator=g)
    x[0, :k // 2] = 0.0  # a half-zero row
    out = ops.w8a8_linear_dyn8(x, q, scales, b)
    w = q.double() * scales.double()[:, None]
    emulated = F.linear(_row_int8_activations(x).double(), w, None if b is None else b.double())
    assert out.shape == (rows, n) and out.dtype == torch.float32
    assert _relerr(out, emulated) < 1e-6  # the same activation rounding: integer dots are exact (k=100: a tail)
    assert _relerr(out, F.linear(x.double(), w, None if b is None else b.double())) < 2e-2  # int8 rounding: ~0.5-1%
    zero = ops.w8a8_linear_dyn8(torch.zeros(1, k), q, scales, b)
    assert torch.equal(zero[0], torch.zeros(n) if b is None else b)


def test_avx2_kernels_reject_bad_inputs():
    ops = _avx2_ops()
    m = _random_w4(16, 256, 64, False)
    with pytest.raises(RuntimeError, match="group size"):
        ops.w4a16_linear_f32(torch.randn(1, 256), m.qweight, m.scales, m.zeros, 32, None)
    with pytest.raises(RuntimeError, match="contiguous float32"):
        ops.w4a16_linear_f32(torch.randn(1, 256).double(), m.qweight, m.scales, m.zeros, 64, None)
    q = torch.zeros(16, 256, dtype=torch.int8)
    with pytest.raises(RuntimeError, match="qweight must be contiguous int8"):
        ops.w8a8_linear_dyn8(torch.randn(1, 128), q, torch.ones(16), None)
    with pytest.raises(RuntimeError, match="scales must be contiguous float32"):
        ops.w8a8_linear_dyn8(torch.randn(1, 256), q, torch.ones(15), None)


def test_avx2_results_do_not_depend_on_threads():
    ops = _avx2_ops()
    m = _random_w4(1536, 1536, 128, True)
    x = torch.randn(2, 1536)
    w4 = [ops.w4a16_linear_f32, ops.w4a16_linear_dyn16, ops.w4a16_linear_dyn8]
    if cpu_kernels.cpu_supports_avx512():
        w4.append(ops.w4a16_linear_f32_avx512)
    gemvs = [functools.partial(op, x, m.qweight, m.scales, m.zeros, 128, m.bias) for op in w4]
    q8 = torch.randint(-127, 128, (1536, 1536), dtype=torch.int8)
    gemvs.append(functools.partial(ops.w8a8_linear_dyn8, x, q8, m.scales[:, 0].contiguous(), m.bias))
    if cpu_kernels.cpu_supports_avx512_vnni():
        gemvs.append(functools.partial(ops.w8a8_linear_vnni, x, q8, m.scales[:, 0].contiguous(), m.bias))
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = [op() for op in gemvs]
        torch.set_num_threads(2)
        two = [op() for op in gemvs]
    finally:
        torch.set_num_threads(before)
    assert all(torch.equal(a, b) for a, b in zip(one, two))  # rows are split, never a row's sum


@pytest.mark.parametrize("kernel", W4A16_CPU_KERNELS)
@pytest.mark.parametrize("rows", [1, 40])  # the GEMV and, above GEMV_MAX_ROWS, dequantize + MKL
def test_w4a16_module_runs_each_cpu_kernel(monkeypatch, kernel, rows):
    if kernel != "int4pack":
        _avx2_ops()
    monkeypatch.setenv("NVILA_W4A16_CPU_KERNEL", kernel)
    m = _random_w4(96, 256, 64, True)
    x = torch.randn(rows, 256)
    out, ref = m(x), reference_forward(m, x)
    assert type(m._kernel).__name__ == ("_W4A16Int4Pack" if kernel == "int4pack" else "_W4A16Avx2")
    assert _relerr(out, ref) < {"int4pack": 1e-2, "avx2-fp32": 2e-6, "avx512-fp32": 2e-6, "avx2-dyn16": 1e-4,
                                "avx2-dyn8": 1e-2}[kernel]


def test_unknown_w4a16_kernel_is_a_clear_error(monkeypatch):
    monkeypatch.setenv("NVILA_W4A16_CPU_KERNEL", "avx9")
    with pytest.raises(ValueError, match="valid: auto, int4pack, avx2-fp32, avx512-fp32, avx2-dyn16, avx2-dyn8"):
        _random_w4(96, 256, 64, False)(torch.randn(1, 256))


def test_w4a16_auto_picks_the_fp32_avx2_kernel(monkeypatch):
    _avx2_ops()
    monkeypatch.delenv("NVILA_W4A16_CPU_KERNEL", raising=False)
    m = _random_w4(96, 256, 64, False)
    x = torch.randn(1, 256)
    out = m(x)
    assert type(m._kernel).__name__ == "_W4A16Avx2" and m._kernel.gemv == torch.ops.nvila.w4a16_linear_f32
    assert _relerr(out, reference_forward(m, x)) < 2e-6


# ------------------------------------------------------------------ fallback to torch's int4pack (no build)
def _no_compiler(monkeypatch):
    monkeypatch.setenv("CXX", "/nonexistent/c++")


def _no_ninja(monkeypatch):
    from torch.utils import cpp_extension
    monkeypatch.setenv("CXX", sys.executable)  # a "compiler" that is found: only ninja is missing
    monkeypatch.setattr(cpp_extension, "is_ninja_available", lambda: False)


def _failed_build(monkeypatch):
    from torch.utils import cpp_extension

    def load(**kwargs):
        _failed_build.calls += 1
        raise RuntimeError("Error building extension 'nvila_cpu_kernels': [1/2] c++ -MMD -c cpu_kernels.cpp\n"
                           "cpu_kernels.cpp:1:10: fatal error: simulated.h: No such file or directory")
    monkeypatch.setattr(cpp_extension, "is_ninja_available", lambda: True)
    monkeypatch.setenv("CXX", sys.executable)  # found everywhere; never run, load is replaced
    monkeypatch.setattr(cpp_extension, "load", load)


def _no_avx2(monkeypatch):
    monkeypatch.setattr(cpu_kernels, "cpu_supports_avx2", lambda: False)


FALLBACKS = {  # cause -> (level, text of the one note)
    "no compiler": (_no_compiler, "WARNING", "need /nonexistent/c++"),
    "no ninja": (_no_ninja, "WARNING", "need ninja to build"),
    "failed build": (_failed_build, "WARNING",
                     "could not build nvila's AVX2 CPU kernels (cpu_kernels.cpp:1:10: fatal error"),
    "no avx2": (_no_avx2, "INFO", "need an x86-64 CPU with AVX2 and FMA"),
}


@pytest.mark.parametrize("cause", FALLBACKS)
def test_auto_falls_back_to_int4pack_with_one_note(monkeypatch, caplog, tmp_path, cause):
    """No compiler / ninja, a failed build or no AVX2: ``auto`` runs torch's int4pack (outputs as with
    ``NVILA_W4A16_CPU_KERNEL=int4pack``, close to fp32), the build is tried once, and the log has one note."""
    force, level, text = FALLBACKS[cause]
    # a fresh process as far as nvila is concerned: nothing loaded or logged yet; builds go to tmp_path
    monkeypatch.setattr(cpu_kernels, "load_cpu_kernels", functools.cache(cpu_kernels.load_cpu_kernels.__wrapped__))
    monkeypatch.setattr(quant_linear, "_logged", set())
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    monkeypatch.delenv("CXX", raising=False)
    if cause != "no avx2":
        monkeypatch.setattr(cpu_kernels, "cpu_supports_avx2", lambda: True)  # reach the build on any CPU
    _failed_build.calls = 0
    force(monkeypatch)
    layers = [_random_w4(96, 256, 64, True, seed=1), _random_w4(64, 512, 128, False, seed=2)]
    xs = [torch.randn(rows, m.in_features) for m in layers for rows in (1, 40)]
    caplog.set_level(logging.DEBUG, logger="nvila")

    monkeypatch.delenv("NVILA_W4A16_CPU_KERNEL", raising=False)  # auto
    outs = [m(x) for m in layers for x in xs if x.shape[1] == m.in_features]
    for m in layers:  # a move rebuilds the layer's kernel: no second build, no second note
        m.to(torch.float32)
        m(torch.randn(1, m.in_features))
    assert all(type(m._kernel).__name__ == "_W4A16Int4Pack" for m in layers)

    notes = [r for r in caplog.records if r.name.startswith("nvila")]
    assert [(r.levelname, text in r.getMessage()) for r in notes] == [(level, True)], [r.getMessage() for r in notes]
    if cause == "failed build":
        assert _failed_build.calls == 1

    monkeypatch.setenv("NVILA_W4A16_CPU_KERNEL", "int4pack")
    for m in layers:
        m.reset_kernel()
    pairs = [(m, x) for m in layers for x in xs if x.shape[1] == m.in_features]
    for out, (m, x) in zip(outs, pairs):
        assert torch.equal(out, m(x))
        assert _relerr(out, reference_forward(m, x)) < 1e-2  # bf16 activations: ~3e-3


def test_w4a16_on_the_cpu_logs_nothing_at_warning_when_the_kernel_runs(monkeypatch, caplog):
    _avx2_ops()
    monkeypatch.delenv("NVILA_W4A16_CPU_KERNEL", raising=False)
    monkeypatch.setattr(quant_linear, "_logged", set())
    caplog.set_level(logging.DEBUG, logger="nvila")
    _random_w4(96, 256, 64, False)(torch.randn(1, 256))
    notes = [(r.levelname, r.getMessage()) for r in caplog.records if r.name.startswith("nvila")]
    assert notes == [("INFO", "w4a16 on the CPU runs the avx2-fp32 kernel")]


def test_group_sizes_the_kernel_does_not_take_use_int4pack(monkeypatch, caplog):
    monkeypatch.setattr(cpu_kernels, "load_cpu_kernels", lambda: pytest.fail("no build for group size 32"))
    monkeypatch.setattr(quant_linear, "_logged", set())
    monkeypatch.delenv("NVILA_W4A16_CPU_KERNEL", raising=False)
    caplog.set_level(logging.INFO, logger="nvila")
    m = _random_w4(96, 256, 32, False)
    x = torch.randn(1, 256)
    assert _relerr(m(x), reference_forward(m, x)) < 1e-2 and type(m._kernel).__name__ == "_W4A16Int4Pack"
    [note] = [r for r in caplog.records if r.name.startswith("nvila")]
    assert note.levelname == "INFO" and "group size 32" in note.getMessage()


def test_the_build_directory_depends_on_the_source_not_the_package_location(monkeypatch, tmp_path):
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    a = cpu_kernels.build_directory(b"int x;", "c++")
    assert a == cpu_kernels.build_directory(b"int x;", "c++") and a.parent == tmp_path
    assert a.name.startswith("nvila_cpu_kernels_") and a.name[len("nvila_cpu_kernels_"):].isalnum()
    assert cpu_kernels.build_directory(b"int y;", "c++") != a


def test_a_killed_build_s_lock_file_does_not_block_the_next_build(tmp_path):
    """torch waits forever on its lock file; a builder killed mid-build leaves it behind."""
    pytest.importorskip("fcntl")
    (tmp_path / "lock").touch()
    with cpu_kernels._build_lock(tmp_path):
        assert not (tmp_path / "lock").exists()
