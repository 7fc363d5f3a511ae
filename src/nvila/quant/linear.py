"""Quantized linear layers: the stored weight formats, the runtime modules and one kernel dispatch.

Two schemes, each a drop-in replacement for ``nn.Linear`` (input ``(..., K)`` -> output ``(..., N)``):

``w8a8`` (``W8A8Linear``)
    int8 weights, symmetric, one scale per output channel: ``W ≈ qweight * scales[:, None]``. At run
    time activations are quantized dynamically to 8 bits. Persistent tensors: ``qweight`` int8
    (N, K), ``scales`` float32 (N,), optional ``bias`` (N,) and optional ``input_scale`` float32 (K,):
    an explicit smoothing factor multiplied into the input (``x * input_scale``) for layers whose
    SmoothQuant scale cannot be folded into a preceding norm or linear.

``w4a16`` (``W4A16Linear``)
    asymmetric 4-bit weights in groups of ``group_size`` input channels, activations in floating
    point: ``W[n, k] ≈ (q[n, k] - zeros[n, g]) * scales[n, g]`` with ``g = k // group_size``,
    ``q, zeros ∈ [0, 15]``. Persistent tensors: ``qweight`` uint8 (N, K/2) holding two codes per
    byte (low nibble = even k), ``scales`` float32 (N, K/g), ``zeros`` uint8 (N, K/g), optional
    ``bias`` (N,) and ``input_scale`` (K,) as above.

The persistent tensors are the checkpoint format (see ``format.py``). Kernels need their own packed
layouts; these are runtime caches, built on first use and dropped whenever the module is loaded or
moved, so a ``load_state_dict`` or ``.to(...)`` never leaves stale packed weights behind.

Kernels (``KERNELS``: (scheme, device type) -> kernel class), measured on the 2-core AVX2 dev box
(1 thread, cold weights, 1536 -> 8960, ms; fp32 ``F.linear`` 3.5 at M=1 and 383 at M=1024):

* ``w8a8``/cpu (``w8a8_cpu_kernel_names``): at 1 row nvila's GEMV on the stored weight
  (``cpu_kernels.cpp``, AVX-512 VNNI or AVX2; 0.86 vs fbgemm's 1.00 at M=1 on this shape for AVX2),
  up to 3 rows where the CPU has VNNI; above that ``quantized.linear_dynamic`` (per-channel prepacked
  weight, activations quantized per call with ``reduce_range`` so AVX2's 16-bit pair sums cannot
  saturate): fbgemm (57 at M=1024), and from 4 rows oneDNN's AMX-int8 GEMM on CPUs with AMX.
* ``w4a16``/cpu: chosen by ``w4a16_cpu_kernel_name``. On x86-64 with AVX2, nvila's own kernels
  (``cpu_kernels.cpp``, compiled at first use by ``cpu_kernels.py``; AVX-512 code where torch's
  capability is AVX512): a fused GEMV with fp32 activations for small batches and slab-wise
  dequantize + MKL fp32 GEMM for large ones, on the checkpoint tensors as stored. Elsewhere, or
  without a compiler, ``_weight_int4pack_mm_for_cpu`` with bf16 activations.
  Per Qwen2-1.5B layer at batch 1, weights streamed from DRAM (benchmarks/bench_w4_kernels.py, 2-core
  Xeon with AVX-512 bf16; 1 thread): int4pack 3.50 ms, avx2-fp32 2.82 ms; with torch limited to AVX2
  (as on AMD Zen 2) int4pack 4.92 ms, avx2-fp32 2.86 ms.
* ``w8a8``/cuda: ``torch._int_mm`` on int8 per-token activations (rows padded to 17+; K, N multiples
  of 8). ``w4a16``/cuda: tinygemm ``_weight_int4pack_mm`` (bf16). Neither can be run here; they are
  only chosen on CUDA tensors, and any other device raises a ``ValueError`` naming the supported ones.

Device and dtype are always those of the module's tensors and the input; outputs have the input dtype.
"""

from __future__ import annotations

import logging
import os
import warnings

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import cpu_kernels

logger = logging.getLogger(__name__)

SCHEMES = ("w8a8", "w4a16")
GROUP_SIZES = (128, 64, 32)  # preferred first; the largest one dividing K is used


# -------------------------------------------------------------------------------- weight quantizers
def quantize_w8(weight: Tensor) -> tuple[Tensor, Tensor]:
    """Symmetric per-output-channel int8: (N, K) float -> (qweight int8 (N, K), scales float32 (N,))."""
    w = weight.float()
    scales = (w.abs().amax(dim=1) / 127.0).clamp(min=1e-8)  # (N,)
    q = torch.round(w / scales[:, None]).clamp(-127, 127).to(torch.int8)
    return q, scales


def quantize_w4(weight: Tensor, group_size: int, *, clip: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """Asymmetric group-wise 4-bit codes.

    Args:
        weight: (N, K), K divisible by ``group_size``.
        group_size: input channels per group.
        clip: optional (N, K/g) maximum |w| per group (AWQ's clipping): weights are clamped to
            [-clip, clip] before the range is taken.
    Returns:
        codes uint8 (N, K) in [0, 15], scales float32 (N, K/g), zeros uint8 (N, K/g).
    """
    n, k = weight.shape
    if k % group_size:
        raise ValueError(f"in_features {k} is not a multiple of the group size {group_size}")
    w = weight.float().reshape(n, k // group_size, group_size)  # (N, G, g)
    if clip is not None:
        w = torch.maximum(torch.minimum(w, clip[..., None]), -clip[..., None])
    lo = w.amin(dim=-1).clamp(max=0.0)  # (N, G): the range always contains 0
    hi = w.amax(dim=-1).clamp(min=0.0)
    scales = ((hi - lo) / 15.0).clamp(min=1e-8)
    zeros = torch.round(-lo / scales).clamp(0, 15)
    codes = (torch.round(w / scales[..., None]) + zeros[..., None]).clamp(0, 15)
    return codes.reshape(n, k).to(torch.uint8), scales, zeros.to(torch.uint8)


def dequantize_w4(codes: Tensor, scales: Tensor, zeros: Tensor) -> Tensor:
    """Inverse of ``quantize_w4``: codes (N, K), scales/zeros (N, G) -> float32 (N, K)."""
    n, k = codes.shape
    g = k // scales.shape[1]
    w = (codes.reshape(n, -1, g).float() - zeros.float()[..., None]) * scales.float()[..., None]
    return w.reshape(n, k)


def fake_quant_w4(weight: Tensor, group_size: int, clip: Tensor | None = None) -> Tensor:
    """Quantize-dequantize round trip (N, K) -> (N, K) float32, used by the AWQ searches."""
    return dequantize_w4(*quantize_w4(weight, group_size, clip=clip))


def pack_nibbles(codes: Tensor) -> Tensor:
    """uint8 codes (N, K) in [0, 15] -> (N, K/2) bytes, even k in the low nibble."""
    return codes[:, 0::2] | (codes[:, 1::2] << 4)


def unpack_nibbles(packed: Tensor) -> Tensor:
    """(N, K/2) bytes -> uint8 codes (N, K)."""
    return torch.stack([packed & 0xF, packed >> 4], dim=-1).reshape(packed.shape[0], -1)


def pick_group_size(in_features: int, preferred: int = 128) -> int:
    """``preferred`` if it divides ``in_features``, else the largest of ``GROUP_SIZES`` that does."""
    for g in (preferred, *GROUP_SIZES):
        if g <= in_features and in_features % g == 0:
            return g
    raise ValueError(f"in_features {in_features} is not a multiple of any supported group size {GROUP_SIZES}")


# ------------------------------------------------------------------------------------------ kernels
_logged: set = set()  # keys of the kernel choices already logged


def _info_once(key, message: str) -> None:
    """Log ``message`` at INFO the first time ``key`` is seen: kernels are chosen per module."""
    if key not in _logged:
        _logged.add(key)
        logger.info(message)


W8A8_CPU_KERNELS = ("avx2", "avx512-vnni", "fbgemm", "onednn")
_W8A8_GEMVS = ("avx2", "avx512-vnni")  # nvila's own (cpu_kernels.cpp); the others are torch's quantized engines


def w8a8_cpu_kernel_names() -> tuple[str, str, str]:
    """Which kernels run W8A8 on the CPU, by the rows of the input: (1 row, 2-3 rows, 4+ rows)
    (``_W8A8Cpu.ROW_SPLITS``).

    ``NVILA_W8A8_CPU_KERNEL`` (default ``auto``) picks by ISA:

    * 1 row (decode at batch 1): nvila's GEMV (``cpu_kernels.cpp``) where it builds, else fbgemm:
      ``avx512-vnni`` (``w8a8_linear_vnni``, VPDPBUSD) where the CPU has AVX-512 VNNI, else ``avx2``
      (``w8a8_linear_dyn8``). Both stream the stored weight faster than fbgemm at one row (Qwen2-1.5B
      1536 -> 8960, 1 thread, cold: 0.98 ms avx512-vnni, 1.12 avx2, 1.13 fbgemm) but compute each
      extra row again (benchmarks/RESULTS.md, issue 23). It is built at the first such call, so a model
      whose W8A8 layers only see prefill-sized inputs (a quantized vision tower) never builds it;
    * 2-3 rows: ``avx512-vnni`` where the CPU has it (2 rows 1.16 vs fbgemm's 1.21 ms, 3 rows 1.29 vs
      1.31), else fbgemm (avx2 is behind it from 2 rows);
    * 4+ rows (prefill, the tower): oneDNN's AMX-int8 GEMM where the CPU has AMX tiles (and torch the
      onednn quantized engine), else fbgemm (1536 -> 8960, 2 threads: M=16 0.75 vs 1.04 ms, M=1024
      21.4 vs 33.7).

    A name forces one kernel for every call: ``avx512-vnni`` becomes ``avx2`` on a CPU without AVX-512
    VNNI, and ``avx2`` becomes fbgemm where it cannot build (CPUs without AVX2 get fbgemm from the
    start). One INFO record per process and choice.
    """
    requested = os.environ.get("NVILA_W8A8_CPU_KERNEL", "auto")
    if requested not in ("auto", *W8A8_CPU_KERNELS):
        raise ValueError(f"NVILA_W8A8_CPU_KERNEL={requested!r}; valid: auto, {', '.join(W8A8_CPU_KERNELS)}")
    onednn_ok = "onednn" in torch.backends.quantized.supported_engines
    if requested == "onednn" and not onednn_ok:
        raise ValueError("NVILA_W8A8_CPU_KERNEL=onednn but this torch build has no onednn quantized engine")
    if requested == "auto":
        amx = getattr(torch.cpu, "_is_amx_tile_supported", lambda: False)()
        vnni = cpu_kernels.cpu_supports_avx512_vnni()
        names = ("avx512-vnni" if vnni else "avx2", "avx512-vnni" if vnni else "fbgemm",
                 "onednn" if amx and onednn_ok else "fbgemm")
    else:
        names = (requested,) * 3
    if "avx512-vnni" in names and not cpu_kernels.cpu_supports_avx512_vnni():
        names = tuple("avx2" if n == "avx512-vnni" else n for n in names)
    if "avx2" in names and not cpu_kernels.cpu_supports_avx2():
        names = _without_gemv(names)
    _info_once((requested, names), "w8a8 on the CPU runs " + (names[0] if len(set(names)) == 1 else
               f"{names[0]} at 1 row, {names[1]} at 2-3 rows and {names[2]} from 4 rows"))
    return names


def _without_gemv(names: tuple[str, ...]) -> tuple[str, ...]:
    return tuple("fbgemm" if n in _W8A8_GEMVS else n for n in names)


class _W8A8Cpu:
    """W8A8 on the CPU, on the module's per-channel int8 weight (N, K); the kernel per call follows
    the input's rows (``w8a8_cpu_kernel_names``):

    * ``avx2`` / ``avx512-vnni``: nvila's GEMV on the stored weight, no copy; activations quantized per
      row, symmetric int8 (as on CUDA). The two give identical results (exact integer dot products);
    * ``fbgemm`` / ``onednn``: ``quantized.linear_dynamic``, activations quantized per call (per tensor,
      7-bit range via ``reduce_range`` so AVX2's 16-bit pair sums cannot saturate) on a prepacked copy
      of the weight, built per engine on the first call that needs it: a module that only sees large
      inputs (the vision tower) holds one packed copy.

    A weight with a code of -128 (not from ``quantize_w8``, which clamps to +-127) runs fbgemm instead
    of ``avx2``, whose sign trick needs the symmetric range; ``avx512-vnni`` takes any int8.
    """

    ROW_SPLITS = (2, 4)  # rows where the kernel changes: measured crossovers (w8a8_cpu_kernel_names)

    def __init__(self, m: "W8A8Linear"):
        self.qweight, self.scales = m.qweight.cpu().contiguous(), m.scales.float().cpu().contiguous()
        self.bias = None if m.bias is None else m.bias.float().cpu().contiguous()
        self.names = w8a8_cpu_kernel_names()
        self.gemv_ok: bool | None = None  # whether nvila's GEMV runs here: decided at its first call
        self.packed: dict[str, object] = {}

    def kernel(self, rows: int) -> str:
        """The kernel an input of ``rows`` rows runs on."""
        return self.names[sum(rows >= split for split in self.ROW_SPLITS)]

    def _pack(self, engine: str):
        previous = torch.backends.quantized.engine
        zero = torch.zeros(self.qweight.shape[0], dtype=torch.long)
        try:  # prepack picks its layout from the global engine; restored at once
            torch.backends.quantized.engine = engine
            with warnings.catch_warnings():  # quantized-tensor constructors are deprecated but still the API
                warnings.simplefilter("ignore", UserWarning)
                qw = torch._make_per_channel_quantized_tensor(self.qweight, self.scales.double(), zero, 0)
                return torch.ops.quantized.linear_prepack(qw, self.bias)
        finally:
            torch.backends.quantized.engine = previous

    def __call__(self, x: Tensor) -> Tensor:  # (M, K) float32 -> (M, N) float32
        engine = self.kernel(x.shape[0])
        if engine in _W8A8_GEMVS and self.gemv_ok is None:  # its first call: build (once per process), check
            self.gemv_ok = cpu_kernels.load_cpu_kernels() and (
                engine != "avx2" or not bool((self.qweight == -128).any()))
            if not self.gemv_ok:  # load_cpu_kernels logged why, once
                self.names, engine = _without_gemv(self.names), "fbgemm"
        if engine == "avx2":
            return torch.ops.nvila.w8a8_linear_dyn8(x, self.qweight, self.scales, self.bias)
        if engine == "avx512-vnni":
            return torch.ops.nvila.w8a8_linear_vnni(x, self.qweight, self.scales, self.bias)
        packed = self.packed.get(engine)
        if packed is None:
            packed = self.packed[engine] = self._pack(engine)
        return torch.ops.quantized.linear_dynamic(x, packed, True)


class _W8A8Cuda:
    """``torch._int_mm`` with int8 per-token activations (symmetric), int32 accumulation."""

    def __init__(self, m: "W8A8Linear"):
        if m.in_features % 8 or m.out_features % 8:
            raise ValueError(f"w8a8 on CUDA needs in/out features divisible by 8, got {m.in_features}, "
                             f"{m.out_features}")
        self.wt = m.qweight.t()  # (K, N), column-major view as _int_mm expects
        self.scales = m.scales.float()
        self.bias = m.bias

    def __call__(self, x: Tensor) -> Tensor:  # (M, K) float32 -> (M, N) float32
        m = x.shape[0]
        xs = (x.abs().amax(dim=1, keepdim=True) / 127.0).clamp(min=1e-8)  # (M, 1)
        xq = torch.round(x / xs).clamp(-127, 127).to(torch.int8)
        if m <= 16:  # _int_mm needs more than 16 rows
            xq = F.pad(xq, (0, 0, 0, 17 - m))
        y = torch._int_mm(xq, self.wt)[:m].float() * xs * self.scales  # (M, N)
        return y if self.bias is None else y + self.bias.float()


class _W4A16Int4Pack:
    """int4-pack kernels (CPU ``_for_cpu`` variant or CUDA tinygemm); bf16 activations.

    Their dequantization is ``(q - 8) * scale + zero'``, so our zero point z maps to
    ``zero' = (8 - z) * scale``; scales and zeros are laid out (K/g, N, 2).
    """

    def __init__(self, m: "W4A16Linear", cuda: bool):
        scales, zeros = m.scales.float(), m.zeros.float()
        sz = torch.stack([scales.t(), ((8.0 - zeros) * scales).t()], dim=-1)  # (G, N, 2)
        self.scales_zeros = sz.to(torch.bfloat16).contiguous()
        self.group_size = m.group_size
        if cuda:  # tinygemm takes (N, K/2) uint8 with the even column in the high nibble (ours: the low
            # one), K in tiles of 16 x inner
            pairs = ((m.qweight << 4) | (m.qweight >> 4)).contiguous()
            inner = next(t for t in (8, 4, 2) if m.in_features % (16 * t) == 0)
            self.packed = torch.ops.aten._convert_weight_to_int4pack(pairs, inner)
            self.mm = torch.ops.aten._weight_int4pack_mm
        else:
            codes = unpack_nibbles(m.qweight).to(torch.int32)  # (N, K)
            self.packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes, 2)
            self.mm = torch.ops.aten._weight_int4pack_mm_for_cpu
        self.bias = m.bias

    def __call__(self, x: Tensor) -> Tensor:  # (M, K) any float -> (M, N) float32
        y = self.mm(x.to(torch.bfloat16), self.packed, self.group_size, self.scales_zeros).float()
        return y if self.bias is None else y + self.bias.float()


class _W4A16Avx2:
    """nvila's kernels (``cpu_kernels.cpp``, AVX2 or AVX-512) on the module's own tensors; no repacking.

    Up to ``GEMV_MAX_ROWS[name]`` rows (decode, small batches) a fused GEMV reads the 4-bit codes once per
    call (the fp32 ones also decode them once per 2 rows, and give each row the result it gets alone);
    above that (prefill) ``w4a16_linear_dequant`` dequantizes slabs of rows for MKL's fp32 GEMM. The
    limits are the measured crossovers (benchmarks/bench_w4_kernels.py ``--sweep``).
    """

    GEMV_MAX_ROWS = {"avx2-fp32": 8, "avx512-fp32": 16, "avx2-dyn16": 16, "avx2-dyn8": 32}

    def __init__(self, m: "W4A16Linear", name: str):
        ops = torch.ops.nvila
        self.gemv = {"avx2-fp32": ops.w4a16_linear_f32, "avx512-fp32": ops.w4a16_linear_f32_avx512,
                     "avx2-dyn16": ops.w4a16_linear_dyn16, "avx2-dyn8": ops.w4a16_linear_dyn8}[name]
        self.max_rows = self.GEMV_MAX_ROWS[name]
        self.qweight, self.zeros = m.qweight.contiguous(), m.zeros.contiguous()
        self.scales = m.scales.float().contiguous()
        self.group_size = m.group_size
        self.bias = None if m.bias is None else m.bias.float().contiguous()

    def __call__(self, x: Tensor) -> Tensor:  # (M, K) float32 -> (M, N) float32
        op = self.gemv if x.shape[0] <= self.max_rows else torch.ops.nvila.w4a16_linear_dequant
        return op(x, self.qweight, self.scales, self.zeros, self.group_size, self.bias)


W4A16_CPU_KERNELS = ("int4pack", "avx2-fp32", "avx512-fp32", "avx2-dyn16", "avx2-dyn8")


def w4a16_cpu_kernel_name(group_size: int) -> str:
    """Which CPU W4A16 kernel runs: ``NVILA_W4A16_CPU_KERNEL`` if set (``auto`` by default).

    ``auto`` is ``avx512-fp32`` where torch's CPU capability is AVX512 and the group size a multiple of
    128, else ``avx2-fp32`` on x86-64 CPUs with AVX2 and FMA, for group sizes that are multiples of 64,
    when the kernels build (``cpu_kernels.load_cpu_kernels``, first use only); otherwise ``int4pack``.
    ``avx512-fp32`` is ``avx2-fp32`` with 512-bit vectors: the same exact products, summed in another
    order, and faster because ``avx2-fp32`` is compute-bound (a convert and an FMA per weight); asked for
    where it cannot run, ``avx2-fp32`` runs, with one INFO note. ``avx2-fp32`` keeps the activations in fp32 and was faster than ``int4pack`` both with native bf16
    (1.24x cold at 1 thread) and with torch limited to AVX2 (1.72x); the int16/int8-activation variants
    ``avx2-dyn16`` / ``avx2-dyn8`` are faster still but round the activations per group of
    ``group_size`` (numbers in benchmarks/RESULTS.md). A kernel that cannot run falls back to
    ``int4pack``. One log record per process and outcome: INFO for the kernel chosen, or the fallback's
    one note (``cpu_kernels`` says why the kernel could not be built; INFO for a group size it does not
    take). Only called for W4A16 layers on the CPU, at their first forward: nothing else builds or logs.
    """
    requested = os.environ.get("NVILA_W4A16_CPU_KERNEL", "auto")
    if requested not in ("auto", *W4A16_CPU_KERNELS):
        raise ValueError(f"NVILA_W4A16_CPU_KERNEL={requested!r}; valid: auto, {', '.join(W4A16_CPU_KERNELS)}")
    avx512 = cpu_kernels.cpu_supports_avx512() and group_size % 128 == 0
    name = ("avx512-fp32" if avx512 else "avx2-fp32") if requested == "auto" else requested
    fallback = None
    if name == "avx512-fp32" and not avx512:
        name, fallback = "avx2-fp32", ("nvila's avx512-fp32 kernel needs torch's AVX512 CPU capability and a "
                                       f"group size that is a multiple of 128 (here {group_size}); ")
    if name == "int4pack":
        note = "w4a16 on the CPU runs the int4pack kernel"
    elif group_size % 64 or (name == "avx2-dyn8" and group_size > 256):
        name, note = "int4pack", (f"w4a16 group size {group_size}: nvila's {name} kernel takes multiples of 64"
                                  f"{' up to 256' if name == 'avx2-dyn8' else ''}; using torch's int4 kernel")
    elif cpu_kernels.load_cpu_kernels():
        note = f"{fallback or ''}w4a16 on the CPU runs the {name} kernel"
    else:
        name, note = "int4pack", None  # load_cpu_kernels logged why, once
    if note is not None:
        _info_once((requested, note), note)
    return name


def _w4a16_cpu(m: "W4A16Linear"):
    name = w4a16_cpu_kernel_name(m.group_size)
    return _W4A16Int4Pack(m, cuda=False) if name == "int4pack" else _W4A16Avx2(m, name)


class _W4A16Dequantized:
    """The dequantized float32 weight and ``F.linear``: for shapes the int4 kernels do not take."""

    def __init__(self, m: "W4A16Linear"):
        self.weight, self.bias = m.dequantized_weight(), m.bias

    def __call__(self, x: Tensor) -> Tensor:  # (M, K) float32 -> (M, N) float32
        return F.linear(x, self.weight, None if self.bias is None else self.bias.float())


def _w4a16_cuda(m: "W4A16Linear"):
    """tinygemm (``_weight_int4pack_mm``) takes N in tiles of 8 and K in tiles of 32."""
    if m.out_features % 8 == 0 and m.in_features % 32 == 0:
        return _W4A16Int4Pack(m, cuda=True)
    note = (f"w4a16 {m.in_features} -> {m.out_features} on CUDA: torch's int4 kernel needs out_features % 8 == 0 "
            "and in_features % 32 == 0; using the dequantized weight")
    _info_once(note, note)
    return _W4A16Dequantized(m)


KERNELS = {
    ("w8a8", "cpu"): _W8A8Cpu,
    ("w8a8", "cuda"): _W8A8Cuda,
    ("w4a16", "cpu"): _w4a16_cpu,
    ("w4a16", "cuda"): _w4a16_cuda,
}


def build_kernel(module: "QuantLinear"):
    """The kernel of ``module.scheme`` for the device its tensors live on."""
    device = module.qweight.device.type
    try:
        factory = KERNELS[(module.scheme, device)]
    except KeyError:
        valid = sorted(d for s, d in KERNELS if s == module.scheme)
        raise ValueError(f"no {module.scheme} kernel for device {device!r}; supported devices: {valid}") from None
    return factory(module)


# ------------------------------------------------------------------------------------ runtime modules
class QuantLinear(nn.Module):
    """Shared plumbing: optional bias / input scale, lazily built kernel, cache invalidation."""

    scheme: str

    def __init__(self, in_features: int, out_features: int, bias: bool, input_scale: bool,
                 device=None, dtype: torch.dtype | None = None):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        factory = {"device": device, "dtype": dtype or torch.float32}
        self.register_buffer("bias", torch.zeros(out_features, **factory) if bias else None)
        self.register_buffer("input_scale", torch.ones(in_features, device=device) if input_scale else None)
        self._kernel = None
        self.register_load_state_dict_post_hook(lambda module, _: module.reset_kernel())

    def _copy_extras(self, linear: nn.Linear, input_scale: Tensor | None) -> "QuantLinear":
        """Take the float linear's bias and the (unfoldable) input scale; returns self."""
        if linear.bias is not None:
            self.bias = linear.bias.detach().clone()
        if input_scale is not None:
            self.input_scale = input_scale.float().clone()
        return self

    def reset_kernel(self) -> None:
        """Drop the packed runtime weights (rebuilt from the persistent tensors on the next call)."""
        self._kernel = None

    def _apply(self, fn, recurse=True):
        self.reset_kernel()
        return super()._apply(fn, recurse)

    def forward(self, x: Tensor) -> Tensor:
        """(..., K) -> (..., N), in x's dtype."""
        if self._kernel is None:
            self._kernel = build_kernel(self)
        lead = x.shape[:-1]
        h = x.reshape(-1, self.in_features).float()  # (M, K)
        if self.input_scale is not None:
            h = h * self.input_scale
        return self._kernel(h.contiguous()).reshape(*lead, self.out_features).to(x.dtype)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, scheme={self.scheme}, "
                f"bias={self.bias is not None}, input_scale={self.input_scale is not None}")


class W8A8Linear(QuantLinear):
    """int8 per-channel weights, int8 dynamic activations (see the module docstring)."""

    scheme = "w8a8"

    def __init__(self, in_features: int, out_features: int, *, bias: bool = True, input_scale: bool = False,
                 device=None, dtype: torch.dtype | None = None):
        super().__init__(in_features, out_features, bias, input_scale, device, dtype)
        self.register_buffer("qweight", torch.zeros(out_features, in_features, dtype=torch.int8, device=device))
        self.register_buffer("scales", torch.ones(out_features, device=device))

    @classmethod
    def from_float(cls, linear: nn.Linear, input_scale: Tensor | None = None) -> "W8A8Linear":
        """Quantize a float linear (its weight already smoothed, if smoothing is used)."""
        w = linear.weight.detach()
        m = cls(w.shape[1], w.shape[0], bias=linear.bias is not None, input_scale=input_scale is not None,
                device=w.device, dtype=w.dtype)
        m.qweight, m.scales = quantize_w8(w)
        return m._copy_extras(linear, input_scale)

    def dequantized_weight(self) -> Tensor:
        """(N, K) float32 reference weight."""
        return self.qweight.float() * self.scales.float()[:, None]


class W4A16Linear(QuantLinear):
    """Asymmetric int4 group-wise weights, floating-point activations (see the module docstring)."""

    scheme = "w4a16"

    def __init__(self, in_features: int, out_features: int, *, group_size: int = 128, bias: bool = True,
                 input_scale: bool = False, device=None, dtype: torch.dtype | None = None):
        if in_features % group_size or in_features % 2:
            raise ValueError(f"w4a16 needs in_features ({in_features}) divisible by group_size ({group_size})")
        super().__init__(in_features, out_features, bias, input_scale, device, dtype)
        self.group_size = group_size
        groups = in_features // group_size
        self.register_buffer("qweight", torch.zeros(out_features, in_features // 2, dtype=torch.uint8, device=device))
        self.register_buffer("scales", torch.ones(out_features, groups, device=device))
        self.register_buffer("zeros", torch.zeros(out_features, groups, dtype=torch.uint8, device=device))

    @classmethod
    def from_float(cls, linear: nn.Linear, group_size: int, *, clip: Tensor | None = None,
                   input_scale: Tensor | None = None) -> "W4A16Linear":
        """Quantize a float linear (weight already AWQ-scaled); ``clip`` (N, K/g) from the clip search."""
        w = linear.weight.detach()
        m = cls(w.shape[1], w.shape[0], group_size=group_size, bias=linear.bias is not None,
                input_scale=input_scale is not None, device=w.device, dtype=w.dtype)
        codes, m.scales, m.zeros = quantize_w4(w, group_size, clip=clip)
        m.qweight = pack_nibbles(codes)
        return m._copy_extras(linear, input_scale)

    def dequantized_weight(self) -> Tensor:
        """(N, K) float32 reference weight."""
        return dequantize_w4(unpack_nibbles(self.qweight), self.scales, self.zeros)

    def extra_repr(self) -> str:
        return super().extra_repr() + f", group_size={self.group_size}"


def reference_forward(module: QuantLinear, x: Tensor) -> Tensor:
    """Dequantize-then-fp32 reference of a quantized module (activations not quantized): (..., K) -> (..., N)."""
    h = x.float() if module.input_scale is None else x.float() * module.input_scale
    bias = None if module.bias is None else module.bias.float()
    return F.linear(h, module.dequantized_weight(), bias)
