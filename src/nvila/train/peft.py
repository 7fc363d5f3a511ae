"""Trainability per component (``frozen | layernorm | lora | full``), LoRA via ``peft``, and QLoRA on CPU.

One model tree (STYLE principle 12): LoRA is injected *in place* with ``peft.inject_adapter_in_model``
into the component's ``nn.Linear`` layers (``lm_head`` excluded, as in the reference's
``find_all_linear_names``), so parameter names stay ``<component>.<path>.base_layer.weight`` /
``.lora_A.default.weight`` and ``merged_copy`` gives back the published key layout.

``layernorm`` (spec §5, ``train_ln.py``) trains only normalisation weights and biases: SigLIP's
``layer_norm1/2`` and ``post_layernorm``, the Qwen2 RMSNorms, any norm inside the projector.

QLoRA (``quantize_llm: nf4``) on CPU: after LoRA injection every frozen LLM base linear is
replaced by ``NF4Linear``, which stores the weight as 4-bit NormalFloat codes (two per byte) with
one float32 absmax per block of ``block_size`` values, and dequantizes it on the fly in every
forward (the weight is rebuilt per call and freed after use; gradients flow to the input only).
bitsandbytes is not used: it is CUDA-centred. Double quantization of the absmax is not applied.
"""

from __future__ import annotations

import copy
import logging
import math

import torch
import torch.nn.functional as F
from torch import nn

from .config import COMPONENTS, LoraSettings, ModelSection

logger = logging.getLogger(__name__)

MODULES = {"vision": "vision_tower", "projector": "mm_projector", "llm": "llm"}
ADAPTER = "default"

# The 16 NormalFloat-4 levels (QLoRA, Dettmers et al. 2023): quantiles of N(0, 1) scaled to [-1, 1].
NF4_LEVELS = (-1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
              -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
              0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
              0.7229568362236023, 1.0)


# ----------------------------------------------------------------------------------------- NF4
class NF4Linear(nn.Module):
    """A frozen linear layer whose weight is stored in NF4 and dequantized on the fly.

    Buffers: ``codes`` (out*in/2,) uint8, two 4-bit level indices per byte; ``absmax`` (blocks,)
    float32; ``bias`` (out,) or None, in the compute dtype.
    """

    def __init__(self, in_features: int, out_features: int, *, bias: bool, block_size: int = 64,
                 dtype: torch.dtype = torch.float32, device: torch.device | str | None = None):
        super().__init__()
        self.in_features, self.out_features, self.block_size, self.dtype = in_features, out_features, block_size, dtype
        numel = in_features * out_features
        blocks = -(-numel // block_size)
        self.register_buffer("codes", torch.zeros(blocks * block_size // 2, dtype=torch.uint8, device=device))
        self.register_buffer("absmax", torch.zeros(blocks, dtype=torch.float32, device=device))
        self.register_buffer("bias", torch.zeros(out_features, dtype=dtype, device=device) if bias else None)

    @classmethod
    def from_linear(cls, linear: nn.Linear, block_size: int = 64) -> "NF4Linear":
        w = linear.weight
        q = cls(linear.in_features, linear.out_features, bias=linear.bias is not None, block_size=block_size,
                dtype=w.dtype, device=w.device)
        if w.device.type == "meta":
            return q
        with torch.no_grad():
            flat = w.detach().float().flatten()
            flat = F.pad(flat, (0, q.absmax.numel() * block_size - flat.numel()))
            blocks = flat.view(-1, block_size)  # (blocks, block_size)
            absmax = blocks.abs().amax(dim=1).clamp(min=1e-12)
            levels = torch.tensor(NF4_LEVELS, device=w.device)
            mids = (levels[1:] + levels[:-1]) / 2
            idx = torch.bucketize(blocks / absmax[:, None], mids).to(torch.uint8).flatten()  # nearest level
            q.codes.copy_(idx[0::2] << 4 | idx[1::2])
            q.absmax.copy_(absmax)
            if linear.bias is not None:
                q.bias.copy_(linear.bias.detach())
        return q

    def dequantize(self) -> torch.Tensor:
        """(out, in) weight in ``self.dtype``."""
        levels = torch.tensor(NF4_LEVELS, device=self.codes.device)
        idx = torch.stack([self.codes >> 4, self.codes & 15], dim=1).flatten().long()
        w = (levels[idx].view(-1, self.block_size) * self.absmax[:, None]).flatten()
        return w[: self.in_features * self.out_features].view(self.out_features, self.in_features).to(self.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (..., in) -> (..., out)
        return F.linear(x, self.dequantize().to(x.dtype), None if self.bias is None else self.bias.to(x.dtype))

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, nf4 block={self.block_size}"


# ---------------------------------------------------------------------------------- trainability
def _is_norm(module: nn.Module) -> bool:
    return isinstance(module, (nn.LayerNorm, nn.GroupNorm)) or type(module).__name__.endswith("RMSNorm")


def _linear_names(module: nn.Module) -> list[str]:
    return [n for n, m in module.named_modules() if isinstance(m, nn.Linear) and n.split(".")[-1] != "lm_head"]


def _inject_lora(module: nn.Module, lora: LoraSettings) -> None:
    from peft import LoraConfig, inject_adapter_in_model

    targets = _linear_names(module)
    if not targets:
        raise ValueError(f"{type(module).__name__} has no linear layers to put LoRA on")
    config = LoraConfig(r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout, bias="none",
                        target_modules=targets)
    weight = next(module.parameters())
    with torch.device(weight.device):  # meta stays meta (memory report)
        inject_adapter_in_model(config, module, adapter_name=ADAPTER)
    for name, p in module.named_parameters():
        p.requires_grad_("lora_" in name)


def _quantize_linears(module: nn.Module, block_size: int) -> int:
    """Replace frozen linears (LoRA base layers, or plain linears but lm_head) by ``NF4Linear``."""
    from peft.tuners.lora import LoraLayer

    count = 0
    for name, child in list(module.named_modules()):
        if isinstance(child, LoraLayer):
            child.base_layer = NF4Linear.from_linear(child.base_layer, block_size)
            count += 1
    if count == 0:
        for name in _linear_names(module):
            parent, _, leaf = name.rpartition(".")
            owner = module.get_submodule(parent) if parent else module
            setattr(owner, leaf, NF4Linear.from_linear(getattr(owner, leaf), block_size))
            count += 1
    return count


def apply_trainability(model: nn.Module, cfg: ModelSection) -> None:
    """Set ``requires_grad`` per component, inject LoRA, and quantize the LLM base for QLoRA.

    Args:
        model: an ``NVILAForConditionalGeneration`` (real or on the meta device).
        cfg: the model section (``vision``/``projector``/``llm`` modes, ``lora``, ``quantize_llm``).
    """
    model.requires_grad_(False)
    for comp in COMPONENTS:
        module, mode = getattr(model, MODULES[comp]), getattr(cfg, comp)
        if mode == "full":
            module.requires_grad_(True)
        elif mode == "layernorm":
            for m in module.modules():
                if _is_norm(m):
                    m.requires_grad_(True)
        elif mode == "lora":
            _inject_lora(module, cfg.lora)
    if cfg.quantize_llm == "nf4":
        n = _quantize_linears(model.llm, cfg.nf4_block_size)
        logger.info("QLoRA: %d LLM linear layers stored in NF4 (block %d), dequantized on the fly", n, cfg.nf4_block_size)


def component_parameters(model: nn.Module) -> dict[str, list[tuple[str, nn.Parameter]]]:
    """Trainable (name, parameter) pairs per component, names relative to ``model``."""
    out = {}
    for comp in COMPONENTS:
        prefix = MODULES[comp]
        out[comp] = [(f"{prefix}.{n}", p) for n, p in getattr(model, prefix).named_parameters() if p.requires_grad]
    return out


def fresh_lora_state(model: nn.Module, seed: int) -> dict[str, torch.Tensor]:
    """Initial LoRA factors for every adapter in ``model`` (real or meta), independent of device and sharding.

    ``lora_A``: Kaiming-uniform (a = sqrt(5), peft's default) drawn in float32 from one generator
    seeded with ``seed``, adapters in ``named_parameters`` order; ``lora_B``: zeros. Every strategy
    copies these into the model (whole, or a rank's rows), so runs start from the same adapters.

    Returns:
        {parameter name: full tensor (CPU, the parameter's dtype)}; empty without LoRA.
    """
    gen = torch.Generator().manual_seed(seed)
    out = {}
    for name, p in model.named_parameters():
        if f".lora_A.{ADAPTER}." in name:
            w = torch.empty(p.shape, dtype=torch.float32)
            nn.init.kaiming_uniform_(w, a=math.sqrt(5), generator=gen)
            out[name] = w.to(p.dtype)
        elif f".lora_B.{ADAPTER}." in name:
            out[name] = torch.zeros(p.shape, dtype=p.dtype)
    return out


def lora_delta(lora_a: torch.Tensor, lora_b: torch.Tensor, scaling: float) -> torch.Tensor:
    """The merged update ``(B @ A) * scaling`` (out, in), computed in float32 for 16-bit factors (as peft on CPU)."""
    dtype = lora_b.dtype
    if dtype in (torch.float16, torch.bfloat16):
        return ((lora_b.float() @ lora_a.float()) * scaling).to(dtype)
    return (lora_b @ lora_a) * scaling


# ---------------------------------------------------------------------------------------- merge
def merged_copy(model: nn.Module) -> nn.Module:
    """A copy of ``model`` with LoRA merged and NF4 dequantized: the published module tree.

    Returns ``model`` itself when it holds no adapters and no NF4 layers.
    """
    from peft.tuners.lora import LoraLayer

    special = lambda m: isinstance(m, (LoraLayer, NF4Linear))  # noqa: E731
    if not any(special(m) for m in model.modules()):
        return model
    out = copy.deepcopy(model)
    for name, child in list(out.named_modules()):
        if not special(child) or (isinstance(child, NF4Linear) and ".base_layer" in f".{name}"):
            continue
        base = child.get_base_layer() if isinstance(child, LoraLayer) else child
        with torch.no_grad():
            weight = base.dequantize() if isinstance(base, NF4Linear) else base.weight.detach()
            if isinstance(child, LoraLayer) and ADAPTER in child.lora_A:
                delta = lora_delta(child.lora_A[ADAPTER].weight, child.lora_B[ADAPTER].weight, child.scaling[ADAPTER])
                weight = weight + delta.to(weight.dtype)
            bias = base.bias
            linear = nn.Linear(base.in_features, base.out_features, bias=bias is not None, device="meta",
                               dtype=weight.dtype).to_empty(device=weight.device)  # no init: RNG untouched
            linear.weight.copy_(weight)
            if bias is not None:
                linear.bias.copy_(bias.detach())
        linear.requires_grad_(False)
        parent, _, leaf = name.rpartition(".")
        setattr(out.get_submodule(parent) if parent else out, leaf, linear)
    return out
