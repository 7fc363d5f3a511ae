"""Which linears share an input, and where a per-input-channel scale can be folded.

Both SmoothQuant and AWQ rescale a layer's input channels: ``y = (x / s) @ (W * s)^T``. The ``1/s``
on the input is free when the input is produced by a norm (divide its weight and bias by s) or by a
linear whose output feeds this input channel-for-channel (divide that linear's output rows by s),
as in the SmoothQuant and AWQ papers. Elsewhere (after a GELU, or after grouped-query attention,
where one value channel feeds several output-projection channels) the ``1/s`` stays in the runtime
module as an explicit ``input_scale`` (one elementwise multiply per call).

A ``Group`` names, relative to one layer:

* ``linears``: the linears reading the same input (their weights get ``* s`` on input columns);
* ``prev``: the norm or linear producing that input, or None for an explicit ``input_scale``;
* ``block``: the module whose output AWQ uses to score a scale (None: the linears' own outputs).

The tables below cover SigLIP encoder layers, Qwen2 decoder layers and the projector stacks.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn


@dataclass(frozen=True)
class Group:
    linears: tuple[str, ...]
    prev: str | None
    block: str | None = None


def siglip_groups(layer: nn.Module) -> list[Group]:
    """A SigLIP encoder layer (multi-head attention, so ``out_proj`` folds into ``v_proj``)."""
    del layer  # the structure is fixed
    return [
        Group(("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"), "layer_norm1"),
        Group(("self_attn.out_proj",), "self_attn.v_proj"),
        Group(("mlp.fc1",), "layer_norm2"),
        Group(("mlp.fc2",), None),
    ]


def qwen2_groups(layer: nn.Module) -> list[Group]:
    """A Qwen2 decoder layer; ``o_proj`` folds into ``v_proj`` only without grouped-query attention."""
    attn = layer.self_attn
    mha = attn.q_proj.out_features == attn.v_proj.out_features
    return [
        Group(("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"), "input_layernorm"),
        Group(("self_attn.o_proj",), "self_attn.v_proj" if mha else None),
        Group(("mlp.gate_proj", "mlp.up_proj"), "post_attention_layernorm", block="mlp"),
        Group(("mlp.down_proj",), "mlp.up_proj"),
    ]


def projector_groups(projector: nn.Module) -> list[Group]:
    """The linears of a ``MultimodalProjector`` (its ``layers``: a Linear, or a stack of stages).

    Each linear is its own group, folded into a LayerNorm right before it, else explicit.
    """
    layers = projector.layers
    if isinstance(layers, nn.Linear):
        return [Group(("layers",), None)]
    out = []
    for i, m in enumerate(layers if isinstance(layers, nn.Sequential) else ()):
        if isinstance(m, nn.Linear):
            prev = f"layers.{i - 1}" if i > 0 and isinstance(layers[i - 1], nn.LayerNorm) else None
            out.append(Group((f"layers.{i}",), prev))
    return out


def fold_scale(layer: nn.Module, group: Group, s: Tensor) -> Tensor | None:
    """Apply ``x / s`` and ``W * s`` to ``group`` in place.

    Args:
        layer: the module the group's names are relative to.
        group: the group.
        s: (K,) positive per-input-channel scale.
    Returns:
        None if ``1/s`` was folded into ``group.prev``, else the (K,) ``input_scale`` = 1/s that the
        runtime modules of the group must apply.
    """
    with torch.no_grad():
        for name in group.linears:
            w = layer.get_submodule(name).weight
            w.mul_(s.to(w.dtype))  # (N, K) * (K,)
        if group.prev is None:
            return 1.0 / s.float()
        prev = layer.get_submodule(group.prev)
        if isinstance(prev, nn.Linear):
            prev.weight.div_(s.to(prev.weight.dtype)[:, None])  # output rows of the producer
        else:
            prev.weight.div_(s.to(prev.weight.dtype))
        if getattr(prev, "bias", None) is not None:
            prev.bias.div_(s.to(prev.bias.dtype))
    return None
