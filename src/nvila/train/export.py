"""The published layout (what ``nvila infer`` loads) from a training model, streamed per component.

No copy of the model is made on any device: for one component at a time, every tensor is
gathered (``DTensor.full_tensor()`` under FSDP2, a collective every rank joins in the same order;
the tensor itself otherwise), and rank 0 alone keeps it, on the CPU, with LoRA merged
(``W + (B @ A) * scaling``, ``peft.lora_delta``) and NF4 base weights dequantized, under the
published keys. Rank 0 writes that component, drops it, and moves on: the peak on rank 0 is the
largest component (the LLM), on the other ranks one gathered tensor.

The result equals ``save_pretrained(peft.merged_copy(model))`` tensor for tensor.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from .distributed import DistInfo
from .peft import ADAPTER, NF4Linear, lora_delta


def _full(t: torch.Tensor | None, keep: bool) -> torch.Tensor | None:
    """The whole tensor on CPU if ``keep`` (None otherwise); a collective for DTensors."""
    if t is None:
        return None
    if hasattr(t, "full_tensor"):
        t = t.full_tensor()
    return t.detach().to("cpu") if keep else None


def component_state(module: nn.Module, keep: bool) -> dict[str, torch.Tensor] | None:
    """One component's published state dict (module keys), on CPU; None where ``keep`` is False.

    Collective under FSDP2: every rank must call it for the same components in the same order.
    """
    from peft.tuners.lora import LoraLayer

    special = {n: m for n, m in module.named_modules()
               if isinstance(m, LoraLayer) or (isinstance(m, NF4Linear) and ".base_layer" not in f".{n}")}
    inside = tuple(f"{n}." for n in special)
    state = {}
    for key, value in module.state_dict().items():
        if not key.startswith(inside):
            state[key] = _full(value, keep)
    for name, child in special.items():
        base = child.get_base_layer() if isinstance(child, LoraLayer) else child
        weight = base.dequantize().to("cpu") if isinstance(base, NF4Linear) else _full(base.weight, keep)
        if isinstance(child, LoraLayer) and ADAPTER in child.lora_A:
            a = _full(child.lora_A[ADAPTER].weight, keep)
            b = _full(child.lora_B[ADAPTER].weight, keep)
            if keep:
                weight = weight + lora_delta(a, b, child.scaling[ADAPTER]).to(weight.dtype)
        bias = _full(base.bias, keep)
        state[f"{name}.weight"] = weight
        if base.bias is not None:
            state[f"{name}.bias"] = bias
    return state if keep else None


def export(model: nn.Module, tokenizer, out_dir: str | Path, info: DistInfo, metadata: dict[str, str]) -> None:
    """Write ``model`` in the published layout to ``out_dir`` (rank 0 writes; collective under FSDP2).

    Args:
        model: the training model (plain, DDP-unwrapped, or the FSDP2 root).
        tokenizer: stored in ``llm/``.
        metadata: safetensors ``__metadata__`` for every weight file.
    """
    from nvila.checkpoint import COMPONENTS, save_published

    states = ((name, component_state(getattr(model, name), info.is_main)) for name in COMPONENTS)
    if info.is_main:
        save_published(model.config, tokenizer, out_dir, states, metadata=metadata)
    else:
        for _ in states:  # join the gathers of every component, in rank 0's order
            pass
