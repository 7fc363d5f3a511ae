"""Training checkpoints: the published layout plus everything needed to resume exactly.

Layout of ``<output_dir>/checkpoint-<step:07d>/``::

    config.json, llm/, vision_tower/, mm_projector/   the published layout (LoRA merged, NF4
                                                      dequantized): ``nvila infer`` loads it
    trainer/trainable.safetensors                      trainable tensors under training names
                                                      (LoRA factors unmerged)
    trainer/optimizer.pt                               optimizer + LR-scheduler state dicts
    trainer/state.json                                 step, world size, the training config
    trainer/rank-<r>.pt                                per rank: RNG states, data-stream cursor

A checkpoint is assembled in ``.staging-checkpoint-<step>`` and renamed into place when complete,
so a run killed at any moment leaves either the whole checkpoint or none of it. Resuming rebuilds
the model from ``model.path`` exactly as at the start and loads the trainable tensors on top.
Tensor files are read with ``weights_only=True`` (no arbitrary pickle).
"""

from __future__ import annotations

import json
import logging
import os
import random
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from . import distributed as D
from .peft import merged_copy

logger = logging.getLogger(__name__)

PREFIX = "checkpoint-"


def checkpoint_dir(output_dir: str | os.PathLike, step: int) -> Path:
    return Path(output_dir) / f"{PREFIX}{step:07d}"


def list_checkpoints(output_dir: str | os.PathLike) -> list[Path]:
    """Complete checkpoints, oldest first."""
    root = Path(output_dir)
    if not root.is_dir():
        return []
    found = [p for p in root.glob(f"{PREFIX}*") if (p / "trainer" / "state.json").is_file()]
    return sorted(found, key=lambda p: int(p.name[len(PREFIX):]))


def _rng_state() -> dict:
    state = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save(output_dir: str | os.PathLike, step: int, *, model: nn.Module, tokenizer, optimizer, scheduler,
         stream, info: D.DistInfo, config: dict, keep_last: int) -> Path:
    """Write checkpoint ``step`` atomically (collective: every rank must call it) and prune old ones.

    Args:
        model: the unwrapped model (not the DDP wrapper).
        stream: this rank's ``SampleStream``.
        config: the training config as a dict, stored for reference.
        keep_last: how many checkpoints to keep.
    Returns:
        The checkpoint directory.
    """
    final = checkpoint_dir(output_dir, step)
    staging = final.parent / f".staging-{final.name}"
    if info.is_main:
        shutil.rmtree(staging, ignore_errors=True)
        from nvila.checkpoint import save_pretrained

        save_pretrained(merged_copy(model), tokenizer, staging, metadata={"nvila_weights": "trained",
                                                                          "nvila_step": str(step)})
        (staging / "trainer").mkdir()
        trainable = {n: p.detach().to("cpu").contiguous() for n, p in model.named_parameters() if p.requires_grad}
        save_file(trainable, staging / "trainer" / "trainable.safetensors")
        torch.save({"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict()},
                   staging / "trainer" / "optimizer.pt")
    D.barrier()
    torch.save({"rng": _rng_state(), "stream": stream.state_dict()}, staging / "trainer" / f"rank-{info.rank}.pt")
    D.barrier()
    if info.is_main:
        with open(staging / "trainer" / "state.json", "w", encoding="utf-8") as f:
            json.dump({"step": step, "world_size": info.world, "config": config}, f, indent=2)
        if final.exists():
            shutil.rmtree(final)
        os.replace(staging, final)
        for old in list_checkpoints(output_dir)[:-keep_last]:
            shutil.rmtree(old, ignore_errors=True)
        logger.info("saved %s", final)
    D.barrier()
    return final


def load(ckpt: Path, *, model: nn.Module, optimizer, scheduler, stream, info: D.DistInfo) -> int:
    """Restore a checkpoint written by ``save``; returns the step it was taken after.

    Raises:
        ValueError: the checkpoint was written by a different number of processes, or its trainable
            tensors do not match the model's.
    """
    with open(ckpt / "trainer" / "state.json", encoding="utf-8") as f:
        meta = json.load(f)
    if meta["world_size"] != info.world:
        raise ValueError(f"{ckpt} was written by {meta['world_size']} processes; resume with the same "
                         f"number (now {info.world}) so every rank finds its data position")
    state = load_file(ckpt / "trainer" / "trainable.safetensors")
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    if set(state) != set(params):
        diff = sorted(set(state) ^ set(params))[:3]
        raise ValueError(f"{ckpt}: trainable tensors do not match this config (e.g. {diff}); "
                         f"resume with the config of the interrupted run")
    with torch.no_grad():
        for n, p in params.items():
            p.copy_(state[n])
    opt = torch.load(ckpt / "trainer" / "optimizer.pt", weights_only=True, map_location="cpu")
    optimizer.load_state_dict(opt["optimizer"])
    scheduler.load_state_dict(opt["scheduler"])
    mine = torch.load(ckpt / "trainer" / f"rank-{info.rank}.pt", weights_only=True)
    _set_rng_state(mine["rng"])
    stream.load_state_dict(mine["stream"])
    logger.info("resumed from %s (step %d)", ckpt, meta["step"])
    return int(meta["step"])
