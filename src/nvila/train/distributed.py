"""Process-group setup for ``torchrun`` and the few collectives the trainer needs.

The same script runs single-process (no environment variables) and under
``torchrun --nproc_per_node N -m nvila.train ...`` (``RANK``/``WORLD_SIZE``/``LOCAL_RANK`` set):
the group uses gloo on CPU and NCCL on CUDA. Data parallelism is PyTorch DDP (``wrap``); the
collectives below are no-ops with one process. Nothing here touches ``model.forward``.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def world_from_env() -> DistInfo:
    """Rank and world size from torchrun's environment (one process when unset)."""
    return DistInfo(int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1)),
                    int(os.environ.get("LOCAL_RANK", 0)))


def init(device: str) -> DistInfo:
    """Join the process group when launched by torchrun; returns this process's place in it.

    Args:
        device: the training device type ("cpu" -> gloo, "cuda" -> nccl).
    """
    info = world_from_env()
    if info.world > 1 and not dist.is_initialized():
        backend = "nccl" if torch.device(device).type == "cuda" else "gloo"
        dist.init_process_group(backend=backend)
        logger.info("rank %d/%d joined the %s process group", info.rank, info.world, backend)
    return info


def shutdown() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def all_sum(values: list[float], device: torch.device | str = "cpu") -> list[float]:
    """Element-wise sum over ranks (float64 on the host for exact token counts)."""
    if not dist.is_initialized():
        return list(values)
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return t.tolist()


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def wrap(model: nn.Module, info: DistInfo) -> nn.Module:
    """DDP over ranks (gradients averaged at the last micro-batch of a step); the model itself alone.

    ``find_unused_parameters`` is on because a step need not touch every trainable parameter
    (text-only batches skip the vision tower; SigLIP's post-LayerNorm never runs).
    """
    if info.world == 1:
        return model
    from torch.nn.parallel import DistributedDataParallel as DDP

    device_ids = [info.local_rank] if next(model.parameters()).device.type == "cuda" else None
    return DDP(model, device_ids=device_ids, find_unused_parameters=True, broadcast_buffers=False)
