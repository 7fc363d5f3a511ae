"""The interchangeable parts of the trainer, each chosen from the config through a small registry.

* ``LOSSES[optim.loss]``: a builder ``(LossContext) -> loss``, the loss being ``(logits (B, T, V),
  labels (B, T)) -> per-position loss (B, T-1)``, 0 where a position is unlabelled; the trainer sums
  it and divides by the global labelled-token count. Per position, so packed and padded batches
  and any split into micro-batches give the same loss.
* ``OPTIMIZERS[optim.name]``: ``(param groups, OptimSection) -> torch.optim.Optimizer``.
* ``PRECISIONS[model.dtype]``: the dtype parameters are stored and computed in, and the dtype
  gradients are reduced in across ranks (float32 for the 16-bit formats).
* ``COMPUTE[model.precision]``: ``(llm, ModelSection) -> None``, the module swap of the compute
  precision (fp8.py): nothing for fp32/bf16/fp16, FP8 linears for ``fp8-linear``, plus COAT's
  FP8 activation storage for ``fp8-coat``.
* The strategies (``none | ddp | fsdp2``) live in distributed.py, next to the collectives.

The training loop calls these through the registries and never branches on which one it got. An
unknown key raises ``TrainConfigError`` listing the valid ones (config.py checks the same names
before any work starts). This module knows no data, files or processes.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, TypeVar

import torch
import torch.nn.functional as F

from torch import nn

from .config import ModelSection, OptimSection, TrainConfigError
from .data import IGNORE_INDEX

T = TypeVar("T")


def pick(registry: dict[str, T], key: str, what: str) -> T:
    """``registry[key]``, or a ``TrainConfigError`` naming ``what`` and the valid keys."""
    if key not in registry:
        raise TrainConfigError(f"{what}: {key!r} is not valid; choose one of {', '.join(registry)}")
    return registry[key]


# ------------------------------------------------------------------------------------------ loss
def token_ce(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Next-token CE per position, 0 where unlabelled. logits (B, T, V), labels (B, T) -> (B, T-1) float32."""
    logits = logits[:, :-1].float()  # (B, T-1, V)
    return F.cross_entropy(logits.transpose(1, 2), labels[:, 1:], ignore_index=IGNORE_INDEX, reduction="none")


@dataclass(frozen=True)
class LossContext:
    """What a loss may take from the checkpoint: its time tokens' ids (contiguous; empty when it has
    none) and ``soft_ce_std``."""

    time_token_ids: tuple[int, ...] = ()
    soft_ce_std: float = 1.0


def soft_ce(ctx: LossContext) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """The smoothed loss of time tokens (spec training.md §6, the reference's ``soft_cross_entropy``).

    A target that is time token j gets the cross-entropy against a discrete Gaussian over the N time
    tokens, q(k) ∝ exp(-(k - j)² / (2σ²)), normalised over the time tokens (no mass elsewhere), with
    the softmax over the whole vocabulary; every other target keeps the token CE.
    """
    ids = ctx.time_token_ids
    if not ids:
        raise TrainConfigError("optim.loss soft_ce needs a checkpoint with time tokens (num_time_tokens > 0)")
    first, n, sigma = ids[0], len(ids), float(ctx.soft_ce_std)
    if not sigma > 0:
        raise TrainConfigError(f"soft_ce_std must be > 0, got {sigma}")

    def loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        logits = logits[:, :-1].float()  # (B, T-1, V)
        target = labels[:, 1:]
        valid = target != IGNORE_INDEX
        safe = target.clamp(min=0)
        lse = logits.logsumexp(-1)  # (B, T-1)
        hard = lse - logits.gather(-1, safe[..., None])[..., 0]
        k = safe - first  # time-token index of each target (out of [0, N) for other tokens)
        is_time = valid & (k >= 0) & (k < n)
        bins = torch.arange(n, device=logits.device, dtype=torch.float32)
        q = (-(bins - k[..., None].float()).square() / (2 * sigma ** 2)).softmax(-1)  # (B, T-1, N), Gaussian
        soft = -(q * (logits[..., first:first + n] - lse[..., None])).sum(-1)
        return torch.where(is_time, soft, hard).masked_fill(~valid, 0.0)

    return loss


LOSSES: dict[str, Callable[[LossContext], Callable[[torch.Tensor, torch.Tensor], torch.Tensor]]] = {
    "token_ce": lambda ctx: token_ce,
    "soft_ce": soft_ce,
}


# ------------------------------------------------------------------------------------- optimizer
def adamw(groups: list[dict], cfg: OptimSection) -> torch.optim.Optimizer:
    """AdamW over the per-component groups (each group carries its own ``lr`` and ``weight_decay``)."""
    return torch.optim.AdamW(groups, betas=cfg.betas, eps=cfg.eps)


def adamw_fp8(groups: list[dict], cfg: OptimSection) -> torch.optim.Optimizer:
    """AdamW with E4M3 moments in groups of 128 with range expansion (fp8_adamw.py), float32 update."""
    from .fp8_adamw import AdamWFP8

    return AdamWFP8(groups, betas=cfg.betas, eps=cfg.eps)


OPTIMIZERS: dict[str, Callable[[list[dict], OptimSection], torch.optim.Optimizer]] = {
    "adamw": adamw,
    "adamw_fp8": adamw_fp8,
}


# ------------------------------------------------------------------------------------- precision
@dataclass(frozen=True)
class Precision:
    """``param``: storage and compute dtype of the weights; ``reduce``: dtype of cross-rank gradient sums."""

    param: torch.dtype
    reduce: torch.dtype


PRECISIONS: dict[str, Precision] = {
    "float32": Precision(torch.float32, torch.float32),
    "bfloat16": Precision(torch.bfloat16, torch.float32),
    "float16": Precision(torch.float16, torch.float32),
}


def _swap(precision: str) -> Callable[[nn.Module, ModelSection], None]:
    def apply(llm: nn.Module, cfg: ModelSection) -> None:
        from .fp8 import apply_precision

        apply_precision(llm, precision, cfg.fp8_min_features)

    return apply


COMPUTE: dict[str, Callable[[nn.Module, ModelSection], None]] = {
    "fp32": lambda llm, cfg: None,
    "bf16": lambda llm, cfg: None,
    "fp16": lambda llm, cfg: None,
    "fp8-linear": _swap("fp8-linear"),
    "fp8-coat": _swap("fp8-coat"),
}
