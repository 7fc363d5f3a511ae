"""FP8 training of the LLM (COAT, spec training.md §4): FP8 formats, FP8 linears and COAT's activation flow.

Three layers of this module:

* **Formats.** ``quantize(x, fmt, group)`` -> ``FP8Tensor`` (the 1-byte payload plus float32 scales)
  and back with ``.dequantize()``. ``group=None`` is one per-tensor scale (absmax / format max,
  the absmax taken group-wise over 1x16 groups first, as COAT's "group scaling" does);
  ``group=16`` is one scale per 1x16 group of the last dimension (COAT's non-linear activations).
  The payload is a real ``torch.float8_e4m3fn`` / ``float8_e5m2`` tensor: what is kept is 1 byte
  per element, never a float32 fake-quantized copy.
* **FP8 linear** (``FP8Linear``, the reference's ``QLinearTE``): forward quantizes the input and
  the weight to E4M3 with per-tensor scales and multiplies; backward quantizes the output
  gradient to E5M2 and computes dgrad and wgrad against the *saved FP8* input and the FP8 weight.
  Only the FP8 input is saved for backward; the FP8 weight is quantized again from the unchanged
  parameter (the same bytes as forward's, without a 1-byte copy per weight element kept per layer). The GEMM is ``torch._scaled_mm`` on CUDA sm89+ (fp32
  accumulation), elsewhere dequantize + float32 matmul (the same numbers up to accumulation
  order; ``_scaled_mm`` also runs on CPU, 10x slower, and the tests compare the two).
* **COAT's activation flow** (``FP8RMSNorm``, ``FP8MLP``): the tensors RMSNorm and SiLU·mul save
  for backward are stored as E4M3 with 1x16 group scales. The residual stream is the input of the
  next RMSNorm, so that is where it is stored in FP8; the residual add itself saves nothing.
  Custom ``autograd.Function``s rather than ``saved_tensors_hooks``: a hook sees every saved tensor
  (attention's, the loss's) and cannot tell the non-linear ops' ones apart.

Eval and inference (``not torch.is_grad_enabled()`` or ``module.eval()``) take the ordinary
high-precision path, as the reference does. The swap (``apply_precision``) keeps every parameter
object and name, so checkpoints, LoRA merging and the optimizer see the usual tree. This module
knows no config files, data or optimizer.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

E4M3, E5M2 = torch.float8_e4m3fn, torch.float8_e5m2
FP8_MAX = {E4M3: 448.0, E5M2: 57344.0}
ACT_GROUP = 16  # COAT's group size for non-linear activations (1x16)
TINY = 1e-12  # floor of an absmax, so an all-zero tensor gets a finite scale


# ------------------------------------------------------------------------------------------ formats
@dataclass
class FP8Tensor:
    """An FP8 payload and its float32 scales: ``value ≈ data.float() * scale``.

    ``data``: the FP8 tensor, shape of the original (last dim padded to a multiple of ``group``);
    ``scale``: () per tensor, or (..., last/group, 1) per group; ``shape``/``dtype``: of the original.
    """

    data: torch.Tensor
    scale: torch.Tensor
    shape: torch.Size
    dtype: torch.dtype

    def dequantize(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        x = self.data.float()  # a new tensor: scaled in place, so one float32 copy is made, not two
        if self.scale.ndim:  # per group: (..., G, group) * (..., G, 1)
            x.unflatten(-1, (self.scale.shape[-2], -1)).mul_(self.scale)
            x = x[..., : self.shape[-1]]
        else:
            x.mul_(self.scale)
        return x.to(dtype or self.dtype)

    @property
    def nbytes(self) -> int:
        return self.data.numel() * self.data.element_size() + self.scale.numel() * self.scale.element_size()


def tensor_absmax(x: torch.Tensor) -> torch.Tensor:
    """Absmax in two stages, max over 1x16 groups then the max of those (COAT's group scaling); float32 ()."""
    a = x.detach().abs()
    if a.numel() % ACT_GROUP == 0 and a.numel():
        a = a.reshape(-1, ACT_GROUP).amax(-1)
    return a.amax().float() if a.numel() else torch.zeros((), device=x.device)


def quantize(x: torch.Tensor, fmt: torch.dtype = E4M3, group: int | None = None) -> FP8Tensor:
    """``x`` in FP8 format ``fmt`` (``E4M3`` or ``E5M2``) with per-tensor (``group=None``) or
    per-1x``group`` scales along the last dimension; scale = absmax / format max."""
    xf = x.detach().float()
    if group is None:
        scale = tensor_absmax(xf).clamp(min=TINY) / FP8_MAX[fmt]
        return FP8Tensor((xf / scale).to(fmt), scale, x.shape, x.dtype)
    pad = -x.shape[-1] % group
    if pad:
        xf = F.pad(xf, (0, pad))
    g = xf.unflatten(-1, (-1, group))  # (..., G, group)
    scale = g.abs().amax(-1, keepdim=True).clamp(min=TINY) / FP8_MAX[fmt]  # (..., G, 1)
    return FP8Tensor((g / scale).to(fmt).flatten(-2), scale, x.shape, x.dtype)


def fake_quantize(x: torch.Tensor, fmt: torch.dtype = E4M3, group: int | None = None) -> torch.Tensor:
    """Quantize and dequantize (the value FP8 storage gives back), in ``x``'s dtype."""
    return quantize(x, fmt, group).dequantize()


# -------------------------------------------------------------------------------------------- GEMM
def _fused_ok(a: torch.Tensor, b: torch.Tensor) -> bool:
    if not a.is_cuda or torch.cuda.get_device_capability(a.device) < (8, 9):
        return False
    return all(d % 16 == 0 for d in (*a.shape, *b.shape))


def fp8_mm(a: FP8Tensor, b: FP8Tensor, *, transpose_b: bool, out_dtype: torch.dtype) -> torch.Tensor:
    """``a @ b.T`` (``transpose_b``) or ``a @ b`` of two per-tensor-scaled 2-D FP8 tensors, fp32 accumulation."""
    bd = b.data.t() if transpose_b else b.data
    if _fused_ok(a.data, bd):
        # _scaled_mm wants a row-major and b column-major
        return torch._scaled_mm(a.data.contiguous(), bd.t().contiguous().t(), scale_a=a.scale, scale_b=b.scale,
                                out_dtype=out_dtype)
    bf = b.dequantize(torch.float32)
    return (a.dequantize(torch.float32) @ (bf.t() if transpose_b else bf)).to(out_dtype)


# ------------------------------------------------------------------------------------------ linear
class _FP8LinearFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias):
        x2 = x.reshape(-1, x.shape[-1])  # (N, in)
        qx, qw = quantize(x2, E4M3), quantize(weight, E4M3)
        y = fp8_mm(qx, qw, transpose_b=True, out_dtype=x.dtype)  # (N, out)
        if bias is not None:
            y = y + bias
        # The FP8 weight is not kept: backward quantizes the (unchanged) parameter again, which gives
        # the same bytes and saves 1 byte per weight element per layer (torchao's
        # force_recompute_fp8_weight_in_bwd). The parameter itself costs nothing to save.
        ctx.save_for_backward(qx.data, qx.scale, weight)
        ctx.meta = (x.shape, x.dtype, bias is not None)
        return y.reshape(*x.shape[:-1], weight.shape[0])

    @staticmethod
    def backward(ctx, grad):
        xd, xs, weight = ctx.saved_tensors
        x_shape, x_dtype, has_bias = ctx.meta
        w_dtype = weight.dtype
        g2 = grad.reshape(-1, grad.shape[-1])  # (N, out)
        qg = quantize(g2, E5M2)
        qx = FP8Tensor(xd, xs, xd.shape, x_dtype)
        qw = quantize(weight, E4M3)  # bit-identical to forward's
        dx = dw = db = None
        if ctx.needs_input_grad[0]:
            dx = fp8_mm(qg, qw, transpose_b=False, out_dtype=x_dtype).reshape(x_shape)  # (N, in)
        if ctx.needs_input_grad[1]:
            qgt = FP8Tensor(qg.data.t(), qg.scale, g2.t().shape, g2.dtype)  # (out, N)
            dw = fp8_mm(qgt, qx, transpose_b=False, out_dtype=w_dtype)  # (out, in)
        if has_bias and ctx.needs_input_grad[2]:
            db = g2.float().sum(0).to(w_dtype)
        return dx, dw, db


def fp8_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``F.linear`` with E4M3 forward / E5M2 backward GEMMs (module docstring). x (..., in) -> (..., out)."""
    return _FP8LinearFn.apply(x, weight, bias)


class FP8Linear(nn.Linear):
    """An ``nn.Linear`` whose training forward runs ``fp8_linear``; eval and no-grad use ``F.linear``."""

    @classmethod
    def from_linear(cls, linear: nn.Linear) -> "FP8Linear":
        new = cls(linear.in_features, linear.out_features, bias=linear.bias is not None, device="meta")
        new.weight, new.bias = linear.weight, linear.bias  # the same parameters: names and optimizer unchanged
        return new

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training and torch.is_grad_enabled():
            return fp8_linear(x, self.weight, self.bias)
        return F.linear(x, self.weight, self.bias)


# ------------------------------------------------------------------------------ activation flow
class _FP8RMSNormFn(torch.autograd.Function):
    """RMSNorm that saves its input as E4M3 1x16 (plus the float32 1/rms per row)."""

    @staticmethod
    def forward(ctx, x, weight, eps):
        xf = x.float()
        rstd = torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)  # (..., 1)
        y = weight * (xf * rstd).to(x.dtype)
        q = quantize(x, E4M3, ACT_GROUP)
        ctx.save_for_backward(q.data, q.scale, rstd, weight)
        ctx.meta = (x.shape, x.dtype)
        return y

    @staticmethod
    def backward(ctx, grad):
        data, scale, rstd, weight = ctx.saved_tensors
        shape, dtype = ctx.meta
        xn = FP8Tensor(data, scale, shape, dtype).dequantize(torch.float32) * rstd  # normalised input
        g = grad.float()
        dweight = None
        if ctx.needs_input_grad[1]:
            dweight = (g * xn.to(dtype).float()).reshape(-1, shape[-1]).sum(0).to(weight.dtype)
        gn = g * weight.float()
        dx = rstd * (gn - xn * (gn * xn).mean(-1, keepdim=True))
        return dx.to(dtype), dweight, None


class FP8RMSNorm(nn.Module):
    """Qwen2's RMSNorm (``weight * x / rms(x)``) whose training forward stores its input in FP8."""

    def __init__(self, norm: nn.Module):
        super().__init__()
        self.weight = norm.weight
        self.variance_epsilon = norm.variance_epsilon

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training and torch.is_grad_enabled():
            return _FP8RMSNormFn.apply(x, self.weight, self.variance_epsilon)
        xf = x.float()
        return self.weight * (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.variance_epsilon)).to(x.dtype)


class _FP8SwiGLUFn(torch.autograd.Function):
    """``silu(gate) * up`` saving both inputs as E4M3 1x16."""

    @staticmethod
    def forward(ctx, gate, up):
        qg, qu = quantize(gate, E4M3, ACT_GROUP), quantize(up, E4M3, ACT_GROUP)
        ctx.save_for_backward(qg.data, qg.scale, qu.data, qu.scale)
        ctx.meta = (gate.shape, gate.dtype)
        return F.silu(gate) * up

    @staticmethod
    def backward(ctx, grad):
        gd, gs, ud, us = ctx.saved_tensors
        shape, dtype = ctx.meta
        gate = FP8Tensor(gd, gs, shape, dtype).dequantize(torch.float32)
        up = FP8Tensor(ud, us, shape, dtype).dequantize(torch.float32)
        g, sig = grad.float(), torch.sigmoid(gate)
        d_up = g * gate * sig
        d_gate = g * up * sig * (1 + gate * (1 - sig))
        return d_gate.to(dtype), d_up.to(dtype)


class FP8MLP(nn.Module):
    """Qwen2's SwiGLU MLP (same ``gate_proj``/``up_proj``/``down_proj`` children) with ``_FP8SwiGLUFn``."""

    def __init__(self, mlp: nn.Module):
        super().__init__()
        self.gate_proj, self.up_proj, self.down_proj = mlp.gate_proj, mlp.up_proj, mlp.down_proj

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (..., H) -> (..., H)
        gate, up = self.gate_proj(x), self.up_proj(x)  # (..., I)
        if self.training and torch.is_grad_enabled():
            return self.down_proj(_FP8SwiGLUFn.apply(gate, up))
        return self.down_proj(F.silu(gate) * up)


# ------------------------------------------------------------------------------------------ swap
def _fp8_linears(llm: nn.Module, min_features: int) -> int:
    """Swap the decoder layers' linears with ``min(in, out) >= min_features`` (not LoRA factors) for ``FP8Linear``."""
    count = 0
    for name, child in list(llm.named_modules()):
        if ".layers." not in f".{name}" or "lora_" in name or type(child) is not nn.Linear:
            continue
        if min(child.in_features, child.out_features) < min_features:
            continue
        parent, _, leaf = name.rpartition(".")
        setattr(llm.get_submodule(parent), leaf, FP8Linear.from_linear(child))
        count += 1
    return count


def _fp8_activations(llm: nn.Module) -> int:
    """Swap every RMSNorm of the decoder (layers and the final norm) and every SiLU MLP for the FP8 flow."""
    count = 0
    for name, child in list(llm.named_modules()):
        swap = None
        if type(child).__name__.endswith("RMSNorm") and hasattr(child, "variance_epsilon"):
            swap = FP8RMSNorm(child)
        elif type(child).__name__.endswith("MLP") and hasattr(child, "gate_proj") and \
                getattr(getattr(child, "config", None), "hidden_act", "silu") == "silu":
            swap = FP8MLP(child)
        if swap is not None:
            parent, _, leaf = name.rpartition(".")
            setattr(llm.get_submodule(parent) if parent else llm, leaf, swap)
            count += 1
    return count


def apply_precision(llm: nn.Module, precision: str, min_features: int) -> dict[str, int]:
    """Swap the LLM's modules for ``precision`` (``fp8-linear`` | ``fp8-coat``; any other: nothing).

    Embeddings and ``lm_head`` stay high precision, as do linears with ``min(in, out) < min_features``.

    Returns:
        {"fp8_linears": n, "fp8_activations": n} swapped.
    """
    out = {"fp8_linears": 0, "fp8_activations": 0}
    if precision in ("fp8-linear", "fp8-coat"):
        out["fp8_linears"] = _fp8_linears(llm, min_features)
    if precision == "fp8-coat":
        out["fp8_activations"] = _fp8_activations(llm)
    return out


# ---------------------------------------------------------------------------------- measurement
class SavedBytes:
    """Context manager counting the bytes autograd saves for backward (each storage once, parameters
    excluded): ``with SavedBytes(model) as s: loss = ...; s.bytes``. ``params``: a module or an
    iterable of parameters (sharded ``DTensor``s count by their local shard)."""

    def __init__(self, params: nn.Module | list[torch.Tensor] | None = None):
        params = params.parameters() if isinstance(params, nn.Module) else params or ()
        local = (p.to_local() if hasattr(p, "to_local") else p for p in params)
        self._skip = {p.untyped_storage().data_ptr() for p in local if p.device.type != "meta"}
        self._seen: set[int] = set()
        self.bytes = 0

    def _pack(self, t: torch.Tensor):
        try:
            storage = None if t.device.type == "meta" else t.untyped_storage()
        except (RuntimeError, NotImplementedError):  # a wrapper subclass (e.g. NF4 weights) has no storage
            storage = None
        key = id(t) if storage is None else storage.data_ptr()
        if key not in self._skip and key not in self._seen:
            self._seen.add(key)
            self.bytes += t.numel() * t.element_size() if storage is None else storage.nbytes()
        return t

    def __enter__(self) -> "SavedBytes":
        self._hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, lambda t: t)
        self._hooks.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self._hooks.__exit__(*exc)
