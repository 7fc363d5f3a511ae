"""Training checkpoints: the published layout plus everything needed to resume exactly.

Layout of ``<output_dir>/checkpoint-<step:07d>/``; the ``trainer/`` files depend on the strategy's
``checkpoint_format`` (distributed.py)::

    config.json, llm/, vision_tower/, mm_projector/   the published layout (LoRA merged, NF4
                                                      dequantized; export.py): ``nvila infer`` loads
                                                      it. "full": in every checkpoint; "dcp": in the
                                                      run's last checkpoint only (a gather)
    trainer/trainable.safetensors                      "full": trainable tensors under training names
                                                      (LoRA factors unmerged)
    trainer/optimizer.pt                               "full": optimizer + LR-scheduler state dicts
    trainer/dcp/                                       "dcp": ``torch.distributed.checkpoint`` of the
                                                      trainable (sharded) parameters and optimizer
                                                      state, each rank writing its own shards
    trainer/scheduler.pt                               "dcp": the LR-scheduler state dict
    trainer/state.json                                 step, world size, strategy, format, the config
    trainer/rank-<r>.pt                                per rank: RNG states, data-stream cursor

A checkpoint is assembled in ``.staging-checkpoint-<step>`` and renamed into place when complete,
so a run killed at any moment leaves either the whole checkpoint or none of it. Resuming rebuilds
the model from ``model.path`` exactly as at the start and loads the trainable tensors on top.
Tensor files are read with ``weights_only=True`` (no arbitrary pickle).

Resuming needs the same number of processes (each rank's data position and RNG are its own) and a
strategy with the same checkpoint format (``check_resume``). DCP itself could reshard the model and
optimizer state to another world size, but the data positions could not follow, so it is refused.
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
from .export import export

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


def check_resume(ckpt: Path, *, strategy: str, fmt: str, world: int) -> None:
    """Refuse, before any work, a checkpoint written by another world size or checkpoint format.

    Raises:
        ValueError: with the setting to use.
    """
    with open(ckpt / "trainer" / "state.json", encoding="utf-8") as f:
        meta = json.load(f)
    saved, saved_fmt = meta.get("strategy", "ddp"), meta.get("format", "full")
    if saved_fmt != fmt:
        raise ValueError(f"{ckpt} was written with dist.strategy={saved} ({saved_fmt} checkpoint); resume with "
                         f"dist.strategy={saved}, not {strategy}")
    if meta["world_size"] != world:
        raise ValueError(f"{ckpt} was written by {meta['world_size']} processes; resume with the same "
                         f"number (now {world}) so every rank finds its data position")


def _dcp_state(model: nn.Module, optimizer) -> dict:
    """{"model", "optim"} state dicts of the trainable parameters (sharded DTensors under FSDP2)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict

    msd, osd = get_state_dict(model, optimizer, options=StateDictOptions(ignore_frozen_params=True))
    return {"model": msd, "optim": osd}


def save(output_dir: str | os.PathLike, step: int, *, model: nn.Module, tokenizer, optimizer, scheduler,
         stream, info: D.DistInfo, config: dict, keep_last: int, strategy: str, fmt: str,
         final: bool) -> Path:
    """Write checkpoint ``step`` atomically (collective: every rank must call it) and prune old ones.

    Args:
        model: the unwrapped model (not the DDP wrapper; the FSDP2 root is the model itself).
        stream: this rank's ``SampleStream``.
        config: the training config as a dict, stored for reference.
        keep_last: how many checkpoints to keep.
        strategy: ``dist.strategy``, recorded for ``check_resume``.
        fmt: the strategy's checkpoint format, "full" or "dcp" (module docstring).
        final: the run's last checkpoint (a "dcp" checkpoint then also gets the published layout).
    Returns:
        The checkpoint directory.
    """
    final_dir = checkpoint_dir(output_dir, step)
    staging = final_dir.parent / f".staging-{final_dir.name}"
    if info.is_main:
        shutil.rmtree(staging, ignore_errors=True)
    if fmt == "full" or final:
        export(model, tokenizer, staging, info, {"nvila_weights": "trained", "nvila_step": str(step)})
    if info.is_main:
        (staging / "trainer").mkdir(parents=True, exist_ok=True)
    D.barrier()
    if fmt == "dcp":
        import torch.distributed.checkpoint as dcp

        state = _dcp_state(model, optimizer)
        dcp.save(state, checkpoint_id=staging / "trainer" / "dcp")
        if info.is_main:
            torch.save(scheduler.state_dict(), staging / "trainer" / "scheduler.pt")
    elif info.is_main:
        trainable = {n: p.detach().to("cpu").contiguous() for n, p in model.named_parameters() if p.requires_grad}
        save_file(trainable, staging / "trainer" / "trainable.safetensors")
        torch.save({"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict()},
                   staging / "trainer" / "optimizer.pt")
    torch.save({"rng": _rng_state(), "stream": stream.state_dict()}, staging / "trainer" / f"rank-{info.rank}.pt")
    D.barrier()
    if info.is_main:
        with open(staging / "trainer" / "state.json", "w", encoding="utf-8") as f:
            json.dump({"step": step, "world_size": info.world, "strategy": strategy, "format": fmt,
                       "config": config}, f, indent=2)
        if final_dir.exists():
            shutil.rmtree(final_dir)
        os.replace(staging, final_dir)
        for old in list_checkpoints(output_dir)[:-keep_last]:
            shutil.rmtree(old, ignore_errors=True)
        logger.info("saved %s", final_dir)
    D.barrier()
    return final_dir


def load(ckpt: Path, *, model: nn.Module, optimizer, scheduler, stream, info: D.DistInfo, fmt: str) -> int:
    """Restore a checkpoint written by ``save`` (``check_resume`` has accepted it); returns its step.

    Raises:
        ValueError: its trainable tensors do not match the model's.
    """
    with open(ckpt / "trainer" / "state.json", encoding="utf-8") as f:
        meta = json.load(f)
    if fmt == "dcp":
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_state_dict

        path = ckpt / "trainer" / "dcp"
        saved = set(dcp.FileSystemReader(path).read_metadata().state_dict_metadata)  # flattened "model.<fqn>" ...
        state = _dcp_state(model, optimizer)
        missing = sorted(k for k in state["model"] if f"model.{k}" not in saved)
        if missing:
            raise ValueError(f"{ckpt}: trainable tensors do not match this config (e.g. {missing[:3]}); "
                             f"resume with the config of the interrupted run")
        for name in list(state["optim"]["state"]):  # trainable tensors that never got a gradient have no
            if f"optim.state.{name}.step" not in saved:  # AdamW state (e.g. the ViT layers past the one used)
                del state["optim"]["state"][name]
        dcp.load(state, checkpoint_id=path)
        set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"],
                       options=StateDictOptions(ignore_frozen_params=True, strict=False))  # keys checked above
        scheduler.load_state_dict(torch.load(ckpt / "trainer" / "scheduler.pt", weights_only=True))
    else:
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
