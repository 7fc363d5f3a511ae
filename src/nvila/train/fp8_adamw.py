"""AdamW with both moments stored in FP8 (COAT's FP8 optimizer, spec training.md §4.1 item 3).

Each moment is kept as E4M3 in groups of ``GROUP`` (128) contiguous elements of the flattened
parameter (zero-padded to a whole group), with COAT's *dynamic range expansion* per group:

    k = floor(expand_min · log2(448² / 2) / log2(max|x| / min|x|)) / expand_min
    stored = sign(x) · (|x| / c)^k / s,   c = sqrt(max · min),   s = (max / c)^k / 448

so the group's range is stretched (k > 1) or squeezed (k < 1) to fill E4M3's. ``c`` cancels in
``stored = 448 · sign(x) · (|x| / max)^k``, so each group keeps two float32 numbers, ``max`` and
``k``, and dequantizes as ``sign(q) · max · (|q| / 448)^(1/k)``: the same stored FP8 values as the
reference, 1 + 8/128 bytes per element per moment. ``min`` is over the non-zero elements (zeros
stay exactly zero); k is clamped to [1/expand_min, K_MAX] (a constant group would give k = inf).

The update itself is standard AdamW in float32: dequantize, update, quantize back. Parameters
not stored in float32 get a float32 master copy in the state. State tensors keep their dtypes
through ``state_dict`` / ``load_state_dict`` (torch's loader would cast them to the parameter's
dtype), so checkpoints resume bit-exactly. This module knows no model, config or files.
"""

from __future__ import annotations

import math

import torch

E4M3 = torch.float8_e4m3fn
E4M3_MAX = 448.0
GROUP = 128  # COAT qgroup_size
EXPAND_MIN = 16  # COAT expand_min: k is a multiple of 1/16
K_MAX = 16.0
CHUNK = 1 << 22  # elements per step chunk (whole groups): bounds the float32 temporaries to ~16 MB each
_LOG_RANGE = math.log2(E4M3_MAX ** 2 / 2)


def _groups(x: torch.Tensor, group: int) -> torch.Tensor:
    flat = x.detach().float().reshape(-1)
    return torch.nn.functional.pad(flat, (0, -flat.numel() % group)).view(-1, group)  # (G, group)


def expand_quantize(x: torch.Tensor, group: int = GROUP) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``x`` as E4M3 with per-group range expansion.

    Returns:
        (data (G*group,) float8_e4m3fn, max (G,) float32, k (G,) float32)
    """
    g = _groups(x, group)
    a = g.abs()
    hi = a.amax(-1)  # (G,)
    lo = torch.where(a > 0, a, torch.full_like(a, math.inf)).amin(-1)
    lo = torch.where(torch.isfinite(lo), lo, hi)
    ratio = torch.log2(hi / lo.clamp(min=torch.finfo(torch.float32).tiny))
    k = torch.floor(EXPAND_MIN * _LOG_RANGE / ratio.clamp(min=1e-30)) / EXPAND_MIN
    k = k.clamp(1 / EXPAND_MIN, K_MAX)
    safe = hi.clamp(min=torch.finfo(torch.float32).tiny)[:, None]
    stored = torch.sign(g) * E4M3_MAX * (a / safe).pow(k[:, None])
    return stored.to(E4M3).reshape(-1), hi, k


def expand_dequantize(data: torch.Tensor, hi: torch.Tensor, k: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    """Inverse of ``expand_quantize``: float32 of ``shape``."""
    q = data.float().view(hi.shape[0], -1)
    x = torch.sign(q) * hi[:, None] * (q.abs() / E4M3_MAX).pow(1 / k[:, None])
    n = math.prod(shape)
    return x.reshape(-1)[:n].view(shape)


def plain_quantize(x: torch.Tensor, group: int = GROUP) -> tuple[torch.Tensor, torch.Tensor]:
    """``x`` as E4M3 with one absmax scale per group and no expansion (the baseline range expansion beats)."""
    g = _groups(x, group)
    scale = g.abs().amax(-1, keepdim=True).clamp(min=torch.finfo(torch.float32).tiny) / E4M3_MAX
    return (g / scale).to(E4M3).reshape(-1), scale[:, 0]


def plain_dequantize(data: torch.Tensor, scale: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    x = data.float().view(scale.shape[0], -1) * scale[:, None]
    return x.reshape(-1)[: math.prod(shape)].view(shape)


class AdamWFP8(torch.optim.Optimizer):
    """AdamW (decoupled weight decay, bias-corrected) whose ``exp_avg``/``exp_avg_sq`` are stored in FP8.

    State per parameter: ``step`` (float32 ()), ``exp_avg``/``exp_avg_sq`` (FP8 payloads),
    ``exp_avg_max``/``exp_avg_k``/``exp_avg_sq_max``/``exp_avg_sq_k`` (float32 per group), and
    ``master`` (float32 copy) when the parameter is not float32.
    """

    def __init__(self, params, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 0.0, group_size: int = GROUP):
        super().__init__(params, {"lr": lr, "betas": betas, "eps": eps, "weight_decay": weight_decay,
                                  "group_size": group_size})

    def _init_state(self, p: torch.Tensor, group_size: int) -> dict:
        """Zero moments, stored as ``expand_quantize`` stores zeros, without a float32 copy of ``p``."""
        st = self.state[p]
        st["step"] = torch.zeros((), dtype=torch.float32)
        groups = -(-p.numel() // group_size)
        _, hi0, k0 = expand_quantize(torch.zeros(group_size, device=p.device), group_size)  # one zero group
        for name in ("exp_avg", "exp_avg_sq"):
            st[name] = torch.zeros(groups * group_size, dtype=E4M3, device=p.device)
            st[f"{name}_max"], st[f"{name}_k"] = hi0.expand(groups).clone(), k0.expand(groups).clone()
        if p.dtype != torch.float32:
            st["master"] = p.detach().float().clone()
        return st

    @torch.no_grad()
    def step(self, closure=None):
        """One AdamW step per parameter, in chunks of ``CHUNK`` elements (whole groups), so that the
        float32 temporaries of dequantized moments stay bounded (a 151,936 x 1,536 embedding would
        otherwise need several GB of them); the chunks give the same numbers as one pass."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            b1, b2 = group["betas"]
            lr, eps, wd, gs = group["lr"], group["eps"], group["weight_decay"], group["group_size"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                st = self.state[p] if self.state[p] else self._init_state(p, gs)
                st["step"] += 1
                t = float(st["step"])
                master = st.get("master", p)
                flat_m, flat_g = master.view(-1), p.grad.reshape(-1)  # (N,)
                chunk = max(CHUNK // gs, 1) * gs
                for a in range(0, flat_m.numel(), chunk):
                    b = min(a + chunk, flat_m.numel())
                    ga, gb = a // gs, -(-b // gs)  # the chunk's groups
                    grad = flat_g[a:b].float()
                    m = expand_dequantize(st["exp_avg"][ga * gs:gb * gs], st["exp_avg_max"][ga:gb],
                                          st["exp_avg_k"][ga:gb], grad.shape)
                    v = expand_dequantize(st["exp_avg_sq"][ga * gs:gb * gs], st["exp_avg_sq_max"][ga:gb],
                                          st["exp_avg_sq_k"][ga:gb], grad.shape)
                    m.lerp_(grad, 1 - b1)
                    v.mul_(b2).addcmul_(grad, grad, value=1 - b2)
                    w = flat_m[a:b]
                    w.mul_(1 - lr * wd)
                    denom = (v / (1 - b2 ** t)).sqrt_().add_(eps)
                    w.addcdiv_(m, denom, value=-lr / (1 - b1 ** t))
                    for name, x in (("exp_avg", m), ("exp_avg_sq", v)):
                        data, hi, k = expand_quantize(x, gs)
                        st[name][ga * gs:gb * gs], st[f"{name}_max"][ga:gb], st[f"{name}_k"][ga:gb] = data, hi, k
                if master is not p:
                    p.copy_(master)
        return loss

    def load_state_dict(self, state_dict: dict) -> None:
        """torch's loader, then the state tensors put back in their saved dtypes (FP8, float32)."""
        saved = {pid: {k: v for k, v in st.items() if torch.is_tensor(v)} for pid, st in state_dict["state"].items()}
        super().load_state_dict(state_dict)
        for group, saved_group in zip(self.param_groups, state_dict["param_groups"]):
            for p, pid in zip(group["params"], saved_group["params"]):
                for k, v in saved.get(pid, {}).items():
                    self.state[p][k] = v.to(p.device) if k != "step" else self.state[p][k]
