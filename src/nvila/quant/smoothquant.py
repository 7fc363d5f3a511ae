"""SmoothQuant W8A8: migrate activation outliers into the weights, then int8 per-channel weights.

For a group of linears sharing an input x (K channels), the smoothing factor of channel j is
``s_j = max|x_j|^α / max|W_{:,j}|^(1-α)`` (α = 0.5; the weight maximum runs over every output row
of every linear in the group), so that after ``x / s`` and ``W * s`` the activation and weight
ranges of each channel are balanced (Xiao et al., 2023). ``1/s`` is folded into the producer of x
where possible (see ``groups.py``); elsewhere it stays as an explicit ``input_scale``.

Knows: activation maxima per group (from ``calib.InputCapture``) and layer-local group tables. Does
not know how calibration data is produced, nor checkpoints.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from .groups import Group, fold_scale
from .linear import W8A8Linear

DEFAULT_ALPHA = 0.5


def smoothing_scale(act_max: Tensor, weights: list[Tensor], alpha: float = DEFAULT_ALPHA) -> Tensor:
    """Per-input-channel smoothing factor.

    Args:
        act_max: (K,) max |x| per input channel.
        weights: the (N_i, K) weights reading that input.
        alpha: migration strength in [0, 1].
    Returns:
        (K,) float32, positive.
    """
    w_max = torch.stack([w.detach().float().abs().amax(dim=0) for w in weights]).amax(dim=0)  # (K,)
    s = act_max.float().clamp(min=1e-5).pow(alpha) / w_max.clamp(min=1e-5).pow(1.0 - alpha)
    return s.clamp(min=1e-5)


def smooth_and_quantize(layer: nn.Module, groups: list[Group], act_max: dict[str, Tensor],
                        alpha: float = DEFAULT_ALPHA) -> None:
    """Smooth every group of ``layer`` with its activation maxima, then swap its linears for ``W8A8Linear``.

    All scales are folded before any linear is quantized, because a group's ``prev`` may be a linear
    of another group (``out_proj`` folds into ``v_proj``).

    Args:
        layer: the module the group names are relative to (modified in place).
        groups: its groups.
        act_max: (K,) activation maximum per group, keyed by the group's first linear.
        alpha: migration strength.
    """
    input_scales = {}
    for g in groups:
        s = smoothing_scale(act_max[g.linears[0]], [layer.get_submodule(n).weight for n in g.linears], alpha)
        input_scales[g] = fold_scale(layer, g, s)
    for g in groups:
        for name in g.linears:
            parent_name, _, attr = name.rpartition(".")
            parent = layer.get_submodule(parent_name) if parent_name else layer
            setattr(parent, attr, W8A8Linear.from_float(getattr(parent, attr), input_scales[g]))
