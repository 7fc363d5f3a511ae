"""FSDP2: shard the model over the ranks, and fill each rank's shards straight from the published safetensors.

Sharding: ``fully_shard`` on every transformer block of the LLM (``llm.model.layers[i]``) and of
the vision tower (``vision_tower.vision_model.encoder.layers[i]``), then on the root, which holds
the rest (embeddings, projector, norms, ``lm_head``). Each parameter becomes a DTensor split on
dim 0 in ``torch.chunk`` fashion: rank ``r`` of ``W`` holds rows ``[r*c, min((r+1)*c, rows))`` with
``c = ceil(rows / W)``. Frozen parameters (frozen components, LoRA base weights, everything but the
norms in ``layernorm`` mode) are sharded too and never get gradients. The ``MixedPrecisionPolicy``
computes in ``Precision.param`` and reduce-scatters gradients in ``Precision.reduce`` (float32 for
bf16 recipes). Activation checkpointing and LoRA are applied before sharding (``prepare``).

Loading, chosen so that no rank ever holds the whole model and no collective is needed: the model
is built on the meta device, sharded, allocated (``to_empty``: each rank allocates its shards
only), and every rank then reads *its own rows* of every tensor with safetensors' lazy slices
(``get_slice``: only those bytes are read from the memory-mapped file). Fresh LoRA factors come from
``peft.fresh_lora_state`` (small, drawn identically on every rank). The alternative,
``set_model_state_dict(full_state_dict=True, broadcast_from_rank0=True)``, needs the full state on
rank 0 and one broadcast per tensor. Missing and unexpected checkpoint keys are errors, as in
``nvila.checkpoint``. Vocabulary rows are resized (``fit_vocab_rows``) as the single-process loader does.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from .distributed import DistInfo, Prepare
from .parts import Precision


def fsdp_blocks(model: nn.Module) -> list[nn.Module]:
    """The transformer blocks that become their own FSDP units, vision first (the order they run)."""
    return [*model.vision_tower.vision_model.encoder.layers, *model.llm.model.layers]


def shard_rows(rows: int, world: int, rank: int) -> tuple[int, int]:
    """[start, stop) of dim 0 that ``rank`` holds under ``fully_shard`` (``torch.chunk`` split, may be empty)."""
    chunk = -(-rows // world)
    start = min(rank * chunk, rows)
    return start, min(start + chunk, rows)


class PublishedReader:
    """Lazy, row-sliced reads of one checkpoint's tensors, by model parameter name (``llm.model...``).

    Keeps every safetensors file open (memory-mapped); ``rows`` reads only the requested rows.
    """

    def __init__(self, root: Path, vocab_size: int):
        from safetensors import safe_open

        from nvila.checkpoint import map_key
        from nvila.layouts import detect

        self.vocab_size = vocab_size
        self.where: dict[str, tuple[object, str]] = {}  # "component.published_key" -> (open file, key in it)
        self._files = []
        for shard in detect(root).shards(root):  # either layout (nvila.layouts)
            f = safe_open(shard.path, framework="pt", device="cpu")
            self._files.append(f)
            for key, (comp, module_key) in shard.keys.items():
                self.where[f"{comp}.{map_key(comp, module_key, to_published=True)}"] = (f, key)
        self.used: set[str] = set()

    def key(self, name: str) -> str:
        """Model name -> "component.published key" (LoRA base layers map to the plain linear)."""
        from nvila.checkpoint import map_key

        comp, _, key = name.partition(".")
        return f"{comp}.{map_key(comp, key.replace('.base_layer.', '.'), to_published=True)}"

    def rows(self, name: str, start: int, stop: int | None, shape: torch.Size) -> torch.Tensor:
        """Rows [start, stop) (``stop`` None: all) of the tensor behind model name ``name``, of full shape ``shape``."""
        from nvila.checkpoint import CheckpointError
        from nvila.llm import fit_vocab_rows

        key = self.key(name)
        if key not in self.where:
            raise CheckpointError(f"{key.partition('.')[0]}: weights do not match the model (missing key "
                                  f"{key.partition('.')[2]})")
        self.used.add(key)
        file, file_key = self.where[key]
        sl = file.get_slice(file_key)
        stored = tuple(sl.get_shape())
        if key.endswith(("embed_tokens.weight", "lm_head.weight")) and stored[0] != self.vocab_size:
            full = fit_vocab_rows(sl[:], self.vocab_size)  # the rare resize reads the whole matrix once
            return full[start:stop]
        if stored != tuple(shape):
            raise CheckpointError(f"{key}: shape {stored} in the checkpoint, the model expects {tuple(shape)}")
        return sl[:] if stop is None else sl[start:stop]

    def check_all_used(self, tied: bool) -> None:
        from nvila.checkpoint import CheckpointError

        extra = sorted(set(self.where) - self.used - ({"llm.lm_head.weight"} if tied else set()))
        if extra:
            raise CheckpointError(f"weights do not match the model (unexpected keys {', '.join(extra[:5])})")


def load_sharded(root: Path, config, precision: Precision, device: torch.device, prepare: Prepare,
                 info: DistInfo, seed: int) -> nn.Module:
    """Build, shard and fill the model (collective only through ``fully_shard``'s mesh setup).

    Args:
        root: a checkpoint directory in either layout (``nvila.layouts``).
        config: the ``NVILAConfig`` to build and attach.
        precision: storage/compute and gradient-reduction dtypes.
        device: this rank's device.
        prepare: trainability, activation checkpointing, attention (run on the meta model).
        info: this process's rank and the world size.
        seed: the seed of the fresh LoRA factors.
    Returns:
        The root ``FSDPModule`` (the model itself, its parameters now DTensors).
    """
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
    from torch.distributed.tensor import DTensor

    from nvila.checkpoint import CheckpointError, resolve_chat_template, token_ids
    from nvila.layouts import detect
    from nvila.llm import reset_llm_buffers
    from nvila.model import NVILAForConditionalGeneration
    from nvila.quant.format import read_quant_metadata
    from nvila.timetokens import ensure_time_tokens

    from .peft import fresh_lora_state

    if read_quant_metadata(root):
        raise CheckpointError(f"{root}: a quantized checkpoint cannot be trained with dist.strategy=fsdp2")
    tok = detect(root).load_tokenizer(root)
    ensure_time_tokens(tok, config.num_time_tokens, config.time_token_format)
    ids = token_ids(tok, resolve_chat_template(config, tok))
    model = NVILAForConditionalGeneration.on_meta(config, ids)
    prepare(model)
    model.to(precision.param)

    mesh = init_device_mesh(device.type, (info.world,))
    policy = MixedPrecisionPolicy(param_dtype=precision.param, reduce_dtype=precision.reduce)
    for block in fsdp_blocks(model):
        fully_shard(block, mesh=mesh, mp_policy=policy)
    fully_shard(model, mesh=mesh, mp_policy=policy)

    model.to_empty(device=device)  # this rank's shards only, uninitialised
    reset_llm_buffers(model.llm, device)
    model.vision_tower.reset_buffers(device)
    tied = config.llm.tie_word_embeddings
    if tied and model.llm.lm_head.weight is not model.llm.model.embed_tokens.weight:
        raise CheckpointError("the tied lm_head lost its tie while sharding")

    reader = PublishedReader(root, ids.vocab_size)
    fresh = fresh_lora_state(model, seed)
    persistent = {n for n, _ in model.state_dict().items()}
    tensors = [*model.named_parameters(), *((n, b) for n, b in model.named_buffers() if n in persistent)]
    with torch.no_grad():
        for name, t in tensors:
            local = t.to_local() if isinstance(t, DTensor) else t
            sharded = isinstance(t, DTensor) and t.ndim > 0
            start, stop = shard_rows(t.shape[0], info.world, info.rank) if sharded else (0, None)
            if stop is not None and stop - start != local.shape[0]:
                raise RuntimeError(f"{name}: rank {info.rank} holds {local.shape[0]} rows, expected {stop - start}")
            src = fresh[name][start:stop] if name in fresh else reader.rows(name, start, stop, t.shape)
            local.copy_(src)
    reader.check_all_used(tied)
    return model
