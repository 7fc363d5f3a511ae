"""AWQ W4A16: activation-aware per-channel scales and weight clipping, then int4 group-wise weights.

For each group of linears sharing an input x (see ``groups.py``), the scale is
``s = mean|x|^a / sqrt(max · min)`` (normalised so that its geometric range is centred on 1), with
``a`` on a grid of ``n_grid`` points ``0, 1/n, ..., (n-1)/n``; the chosen ``a`` minimises the mean
squared error of the group's block output when the group's weights are ``Q(W·s)/s`` (Lin et al.,
2024). ``a = 0`` is plain round-to-nearest, so the search never does worse than RTN on its
calibration rows. The block is the group's ``block`` module (the whole MLP for gate/up) or the
concatenated outputs of the group's linears (q/k/v: the projections are what quantization perturbs;
the attention itself would need positions and whole sequences).

Then, per linear except q/k (whose error the softmax amplifies less predictably; AWQ skips them too),
a clipping search shrinks each group's max |w| by ``1 - i/n_grid`` for ``i < max_shrink·n_grid`` and
keeps, per (output row, weight group), the shrink with the least partial-output error.

Knows: calibration rows and means per group (``calib.InputCapture``), layer-local group tables.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.func import functional_call

from .groups import Group, fold_scale
from .linear import W4A16Linear, fake_quant_w4, pick_group_size

N_GRID = 20
MAX_SHRINK = 0.5
CLIP_TOKENS = 512


def _block_output(layer: nn.Module, group: Group, x: Tensor, weights: dict[str, Tensor]) -> Tensor:
    """The group's block output on rows x (T, K) with the group's weights replaced by ``weights``."""
    if group.block is not None:
        block = layer.get_submodule(group.block)
        prefix = group.block + "."
        return functional_call(block, {n[len(prefix):] + ".weight": w for n, w in weights.items()}, (x,))
    outs = []
    for name, w in weights.items():
        bias = layer.get_submodule(name).bias
        outs.append(nn.functional.linear(x, w, None if bias is None else bias.float()))
    return torch.cat(outs, dim=-1)  # (T, sum N)


def search_scale(layer: nn.Module, group: Group, x: Tensor, x_mean: Tensor, group_size: int,
                 n_grid: int = N_GRID) -> tuple[Tensor, float]:
    """AWQ's grid search of the per-input-channel scale of one group.

    Args:
        layer: the float layer holding the group.
        group: the group.
        x: (T, K) calibration rows of the group's input.
        x_mean: (K,) mean |x| over all calibration tokens.
        group_size: int4 group size.
        n_grid: grid points for the exponent.
    Returns:
        (K,) best scale, and its exponent.
    """
    weights = {n: layer.get_submodule(n).weight.detach().float() for n in group.linears}
    with torch.no_grad():
        target = _block_output(layer, group, x, weights)
        best = (float("inf"), None, 0.0)
        for i in range(n_grid):
            a = i / n_grid
            s = x_mean.float().pow(a).clamp(min=1e-4)
            s = s / (s.max() * s.min()).sqrt()
            trial = {n: fake_quant_w4(w * s, group_size) / s for n, w in weights.items()}
            err = float((_block_output(layer, group, x, trial) - target).pow(2).mean())
            if err < best[0]:
                best = (err, s, a)
    return best[1], best[2]


def search_clip(weight: Tensor, x: Tensor, group_size: int, n_grid: int = N_GRID,
                max_shrink: float = MAX_SHRINK) -> Tensor:
    """Per-(row, group) clipping threshold minimising the partial-output error of int4 rounding.

    Args:
        weight: (N, K) float weight (already scaled).
        x: (T, K) its input rows (already divided by the scale).
        group_size: int4 group size.
    Returns:
        (N, K/g) max |w| to clamp each group to.
    """
    n, k = weight.shape
    g = k // group_size
    w = weight.detach().float()
    xg = x.float().reshape(-1, g, group_size).transpose(0, 1)  # (G, T, g)
    wg = w.reshape(n, g, group_size).permute(1, 2, 0)  # (G, g, N)
    with torch.no_grad():
        target = torch.bmm(xg, wg)  # (G, T, N) partial outputs per group
        org_max = w.reshape(n, g, group_size).abs().amax(dim=-1)  # (N, G)
        best_err = torch.full((n, g), float("inf"), device=w.device)
        best_clip = org_max.clone()
        for i in range(int(max_shrink * n_grid)):
            clip = org_max * (1.0 - i / n_grid)
            q = fake_quant_w4(w, group_size, clip=clip).reshape(n, g, group_size).permute(1, 2, 0)
            err = (torch.bmm(xg, q) - target).pow(2).mean(dim=1).t()  # (N, G)
            better = err < best_err
            best_err = torch.where(better, err, best_err)
            best_clip = torch.where(better, clip, best_clip)
    return best_clip


def awq_quantize(layer: nn.Module, groups: list[Group], rows: dict[str, Tensor], means: dict[str, Tensor],
                 group_size: int, *, skip_clip: tuple[str, ...] = ("q_proj", "k_proj")) -> dict[str, float]:
    """Search scales, fold them, search clipping, and swap every group linear for ``W4A16Linear``.

    Args:
        layer: the float layer (modified in place).
        groups: its groups.
        rows: (T, K) calibration rows per group, keyed by the group's first linear.
        means: (K,) mean |x| per group, same keys.
        group_size: preferred int4 group size (``pick_group_size`` falls back to 64 or 32 for small K).
        skip_clip: linear-name suffixes left out of the clipping search.
    Returns:
        {first linear of each group: chosen exponent}, for logging.
    """
    chosen, scales, sizes = {}, {}, {}
    for g in groups:
        key = g.linears[0]
        sizes[g] = pick_group_size(layer.get_submodule(key).in_features, group_size)
        scales[g], chosen[key] = search_scale(layer, g, rows[key], means[key], sizes[g])
    input_scales = {g: fold_scale(layer, g, scales[g]) for g in groups}
    for g in groups:
        x = rows[g.linears[0]] / scales[g]  # the linears now read x / s
        for name in g.linears:
            parent_name, _, attr = name.rpartition(".")
            parent = layer.get_submodule(parent_name) if parent_name else layer
            linear = getattr(parent, attr)
            clip = None
            if not name.endswith(skip_clip):
                clip = search_clip(linear.weight, x[:CLIP_TOKENS], sizes[g])
            setattr(parent, attr, W4A16Linear.from_float(linear, sizes[g], clip=clip, input_scale=input_scales[g]))
    return chosen
