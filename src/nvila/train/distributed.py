"""Process groups, the trainer's collectives, and the data-parallel strategies (``dist.strategy``).

The same script runs single-process (no environment variables) and under
``torchrun --nproc_per_node N -m nvila.train ...`` (``RANK``/``WORLD_SIZE``/``LOCAL_RANK`` set):
the group uses gloo on CPU and NCCL on CUDA. Every collective here builds its tensors on the
device of the group it is given (``group_device``: CUDA for NCCL, CPU for gloo), so the CUDA path
is the same calls as the CPU one. With one process and no group the collectives are no-ops.

Strategies (``STRATEGIES``, keyed by ``dist.strategy``) give the loop one interface whatever the
parallelism: ``load`` (model ready to train), ``wrap`` (the module to call), ``sync`` (gradient
sync on or off during accumulation), ``grad_norm`` (clip and report), and ``checkpoint_format``
(state.py). ``none``: one process. ``ddp``: PyTorch DDP, every rank holds the whole model.
``fsdp2``: ``fully_shard`` per transformer block, then the root (fsdp.py). Nothing here touches
``model.forward``.
"""

from __future__ import annotations

import logging
import os
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
import torch.distributed as dist
from torch import nn

from .config import TrainConfigError
from .parts import Precision

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    launched: bool = False  # started by torchrun (a process group can be joined)

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def world_from_env() -> DistInfo:
    """Rank and world size from torchrun's environment (one process when unset)."""
    return DistInfo(int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1)),
                    int(os.environ.get("LOCAL_RANK", 0)), "RANK" in os.environ)


def init(device: str, *, need_group: bool = False) -> DistInfo:
    """Join the process group when launched by torchrun with several processes (or ``need_group``).

    Args:
        device: the training device type ("cpu" -> gloo, "cuda" -> nccl).
        need_group: join even with one process (FSDP2 shards over a group of one).
    """
    info = world_from_env()
    if info.launched and (info.world > 1 or need_group) and not dist.is_initialized():
        backend = "nccl" if torch.device(device).type == "cuda" else "gloo"
        if backend == "nccl":
            torch.cuda.set_device(info.local_rank)
        dist.init_process_group(backend=backend)
        logger.info("rank %d/%d joined the %s process group", info.rank, info.world, backend)
    return info


def shutdown() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


# ----------------------------------------------------------------------------------- collectives
def group_device(group: dist.ProcessGroup | None = None) -> torch.device:
    """The device a group's collectives take tensors on: the current CUDA device for NCCL, else CPU."""
    if "nccl" in str(dist.get_backend(group)):
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _reduce(values: list[float], op, group: dist.ProcessGroup | None) -> list[float]:
    if not dist.is_initialized():
        return list(values)
    t = torch.tensor(values, dtype=torch.float64, device=group_device(group))  # float64: exact token counts
    dist.all_reduce(t, op=op, group=group)
    return t.cpu().tolist()


def all_sum(values: list[float], group: dist.ProcessGroup | None = None) -> list[float]:
    """Element-wise sum over the ranks of ``group`` (default: the world)."""
    return _reduce(values, dist.ReduceOp.SUM, group)


def all_max(values: list[float], group: dist.ProcessGroup | None = None) -> list[float]:
    """Element-wise maximum over the ranks of ``group`` (default: the world)."""
    return _reduce(values, dist.ReduceOp.MAX, group)


def barrier(group: dist.ProcessGroup | None = None) -> None:
    if dist.is_initialized():
        dist.barrier(group=group, **({"device_ids": [group_device(group).index]}
                                     if group_device(group).type == "cuda" else {}))


# ------------------------------------------------------------------------------------ strategies
Prepare = Callable[[nn.Module], None]  # trainability, activation checkpointing, packed attention


class Single:
    """One process: the model as loaded; gradient clipping over the trainable tensors."""

    checkpoint_format = "full"  # state.py: trainable tensors + optimizer in safetensors / torch files
    needs_group = False  # join a process group even with one process

    def check(self, info: DistInfo) -> None:
        if info.world > 1:
            raise TrainConfigError(f"dist.strategy=none runs one process, but torchrun started {info.world}; "
                                   f"use dist.strategy=ddp or fsdp2")

    def load(self, root: Path, config, precision: Precision, device: torch.device, prepare: Prepare,
             info: DistInfo, seed: int) -> nn.Module:
        """The model from the published layout at ``root`` in ``precision.param`` on ``device``, prepared.

        Args:
            config: the ``NVILAConfig`` to attach (the processor's, with preprocessing overrides).
            prepare: applied to the loaded model (trainability, checkpointing, attention).
            seed: fresh LoRA factors are drawn from it (``peft.fresh_lora_state``), the same on every strategy.
        """
        from nvila.model import NVILAForConditionalGeneration

        from .peft import fresh_lora_state

        model = NVILAForConditionalGeneration.from_pretrained(root, dtype=precision.param, device=device, config=config)
        prepare(model)
        with torch.no_grad():
            params = dict(model.named_parameters())
            for name, value in fresh_lora_state(model, seed).items():
                params[name].copy_(value)
        return model

    def wrap(self, model: nn.Module) -> nn.Module:
        return model

    def sync(self, module: nn.Module, on: bool) -> AbstractContextManager:
        return nullcontext()

    def grad_norm(self, params: list[torch.Tensor], max_norm: float | None) -> float:
        """Clip to ``max_norm`` (None: no clipping, an exact no-op) and return the total L2 norm before it."""
        return float(torch.nn.utils.clip_grad_norm_(params, float("inf") if max_norm is None else max_norm))

    def check_batch(self, batch: dict, step: int) -> None:
        """Refuse a micro-batch this strategy cannot run (before its forward); nothing to check here."""


class DDP(Single):
    """DDP over ranks (gradients averaged at the last micro-batch of a step); one process = ``Single``.

    ``find_unused_parameters`` is on because a step need not touch every trainable parameter
    (text-only batches skip the vision tower; SigLIP's post-LayerNorm never runs).
    """

    def check(self, info: DistInfo) -> None:
        pass

    def wrap(self, model: nn.Module) -> nn.Module:
        if not dist.is_initialized():
            return model
        from torch.nn.parallel import DistributedDataParallel

        device = next(model.parameters()).device
        return DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None,
                                       find_unused_parameters=True, broadcast_buffers=False)

    def sync(self, module: nn.Module, on: bool) -> AbstractContextManager:
        return nullcontext() if on or not hasattr(module, "no_sync") else module.no_sync()


class FSDP2(Single):
    """Fully sharded data parallel (``torch.distributed.fsdp.fully_shard``): see fsdp.py."""

    checkpoint_format = "dcp"  # state.py: torch.distributed.checkpoint, every rank writes its shards
    needs_group = True

    def check(self, info: DistInfo) -> None:
        if not info.launched:
            raise TrainConfigError("dist.strategy=fsdp2 needs a process group: launch with torchrun "
                                   "--nproc_per_node N -m nvila.train ... (this process was not started by torchrun)")

    def load(self, root, config, precision, device, prepare, info, seed):
        from .fsdp import load_sharded

        return load_sharded(root, config, precision, device, prepare, info, seed)

    def sync(self, module: nn.Module, on: bool) -> AbstractContextManager:
        module.set_requires_gradient_sync(on)
        return nullcontext()

    def grad_norm(self, params, max_norm):
        norm = torch.nn.utils.clip_grad_norm_(params, float("inf") if max_norm is None else max_norm)
        return float(norm.full_tensor() if hasattr(norm, "full_tensor") else norm)  # a replicated DTensor

    def check_batch(self, batch: dict, step: int) -> None:
        """Every rank must run the vision tower as often as the others in a micro-batch (once for its
        images, once for its videos): FSDP2 all-gathers each block's shards per call, so a rank that
        skips a call would wait forever on the others. A micro-batch whose media kinds differ across
        ranks ends the run on every rank with this error instead of hanging."""
        have = [float(batch.get("pixel_values") is not None), float(batch.get("pixel_values_videos") is not None)]
        most = all_max(have + [1.0 - h for h in have])
        if (most[0] and most[2]) or (most[1] and most[3]):
            raise TrainConfigError(
                f"dist.strategy=fsdp2: at step {step + 1} some ranks' micro-batches have images or videos and "
                "others do not, which FSDP2 cannot run (the vision tower's shards are gathered per call). Use "
                "dist.strategy=ddp for mixtures that mix text-only, image and video samples")


STRATEGIES: dict[str, type[Single]] = {"none": Single, "ddp": DDP, "fsdp2": FSDP2}
