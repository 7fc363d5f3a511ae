"""Dry-run memory report: weight, gradient and optimizer bytes per component, from meta-device shapes.

The model is built on the meta device from a checkpoint directory or a bare ``config.json``
(no weights are read), cast to the training dtype, and put through the same ``apply_trainability``
as a real run (LoRA injection, NF4 base weights). Bytes then follow from shapes and dtypes:

* weights: every parameter and persistent buffer (NF4 codes and block scales included), tied
  weights counted once (the parameter count includes NF4-stored weights);
* gradients: one tensor per trainable parameter, in its dtype;
* optimizer: AdamW's ``exp_avg`` and ``exp_avg_sq`` per trainable parameter, in its dtype; with
  ``optim.name=adamw_fp8`` one byte per element per moment (padded to groups of 128) plus two
  float32 per group, and a float32 master copy of parameters not stored in float32.

Per process. With ``ddp`` (or ``none``) every rank holds all of it. With ``dist.strategy=fsdp2`` and
``dist.world_size=N`` each tensor is counted as the rows one rank holds (``ceil(rows / N)`` of
dim 0, as ``fully_shard`` splits it: rank 0 holds the largest share); on top of that, FSDP2
all-gathers one unit at a time in the compute dtype (``gathered_bytes``: the root unit, which is
embeddings + ``lm_head`` + projector, plus two transformer blocks for prefetch). Activations are
excluded from the totals: they depend on the micro-batch length; ``activation_estimate`` gives the
LLM's saved-for-backward bytes per ``model.precision`` from an itemised per-token count (it matches
the bytes measured with saved-tensor hooks per layer within 5 %: tests/train/test_fp8.py, and within 3 %
at the Qwen2-1.5B shape: benchmarks/RESULTS.md, issue 21).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .config import COMPONENTS, MODEL_PATH_HINT, TrainConfig, TrainConfigError, accumulation_steps, precision_of
from .peft import MODULES, NF4Linear, apply_trainability
from .trainer import DTYPES

GIB = 2**30


@dataclass
class ComponentMemory:
    mode: str
    parameters: int
    trainable: int
    weight_bytes: int
    grad_bytes: int
    optimizer_bytes: int

    @property
    def total_bytes(self) -> int:
        return self.weight_bytes + self.grad_bytes + self.optimizer_bytes


def memory_report(cfg: TrainConfig) -> dict:
    """Bytes per component for ``cfg`` (see the module docstring).

    Returns:
        {"components": {name: ComponentMemory}, "total_bytes": int, "activation_bytes": int, "dtype": str,
         "strategy": str, "world_size": int, "gathered_bytes": int (0 unless fsdp2)}
    Raises:
        TrainConfigError: no model path, or ``dist.world_size`` does not divide the global batch.
    """
    from nvila.config import ConfigError, NVILAConfig
    from nvila.model import NVILAForConditionalGeneration

    if not cfg.model.path:
        raise TrainConfigError(f"model.path is not set: give the checkpoint to report on ({MODEL_PATH_HINT})")
    try:
        config = NVILAConfig.from_pretrained(cfg.model.path)
    except ConfigError as e:
        raise TrainConfigError(f"model.path: {e} (set {MODEL_PATH_HINT})") from None
    world = cfg.dist.world_size or 1
    accumulation_steps(cfg, world)
    sharded = cfg.dist.strategy == "fsdp2"
    model = NVILAForConditionalGeneration.on_meta(config).to(DTYPES[cfg.model.dtype])
    apply_trainability(model, cfg.model)

    def nbytes(t: torch.Tensor) -> int:  # this rank's bytes (rank 0 holds the largest shard)
        if not sharded or t.ndim == 0:
            return t.numel() * t.element_size()
        rows = -(-t.shape[0] // world)
        return rows * (t.numel() // max(1, t.shape[0])) * t.element_size()

    components = {}
    for comp in COMPONENTS:
        module = getattr(model, MODULES[comp])
        params = {id(p): p for p in module.parameters()}.values()
        trainable = [p for p in params if p.requires_grad]
        weights = sum(nbytes(p) for p in params)
        weights += sum(b.numel() * b.element_size() for name, b in module.named_buffers()
                       if not any(k in name for k in ("rotary_emb", "position_ids")))  # non-persistent
        grads = sum(nbytes(p) for p in trainable)
        count = sum(p.numel() for p in params) + sum(m.in_features * m.out_features for m in module.modules()
                                                      if isinstance(m, NF4Linear))
        components[comp] = ComponentMemory(getattr(cfg.model, comp), count, sum(p.numel() for p in trainable),
                                           weights, grads, optimizer_bytes(trainable, cfg.optim.name, nbytes))
    gathered = 0
    if sharded:
        from .fsdp import fsdp_blocks

        blocks = fsdp_blocks(model)
        in_blocks = {id(p) for b in blocks for p in b.parameters()}
        full = lambda ps: sum(p.numel() * p.element_size() for p in ps)  # noqa: E731
        root = full(p for p in {id(p): p for p in model.parameters()}.values() if id(p) not in in_blocks)
        gathered = root + 2 * max(full(b.parameters()) for b in blocks)
    return {"components": components, "total_bytes": sum(c.total_bytes for c in components.values()),
            "activation_bytes": activation_estimate(config, cfg), "dtype": cfg.model.dtype,
            "precision": precision_of(cfg.model), "optimizer": cfg.optim.name,
            "strategy": cfg.dist.strategy, "world_size": world, "gathered_bytes": gathered}


def optimizer_bytes(trainable: list, name: str, nbytes) -> int:
    """Optimizer-state bytes of ``trainable`` for ``optim.name`` (``nbytes``: a tensor's bytes on this rank)."""
    if name != "adamw_fp8":
        return 2 * sum(nbytes(p) for p in trainable)
    from .fp8_adamw import GROUP

    total = 0
    for p in trainable:
        n = nbytes(p) // p.element_size()
        groups = -(-n // GROUP)
        total += 2 * (groups * GROUP + 8 * groups) + 4 + (4 * n if p.dtype != torch.float32 else 0)
    return total


def _layer_bytes_per_token(llm, precision: str, b: int, min_features: int) -> float:
    """Saved bytes per token of one decoder layer, item by item.

    In ``b``-byte elements for the high-precision path: each RMSNorm keeps its input and the
    normalised input (2H), q/k/v/o's shared input (H), the attention's q, k, v and output (2H + 2kv),
    o_proj's input (H), the MLP input (H), SiLU·mul's gate, silu(gate) and up (3I), down_proj's input (I).
    An FP8 linear keeps its own 1-byte copy of its input (its FP8 weight is made again in backward);
    ``fp8-coat`` keeps each RMSNorm input and SwiGLU's gate and up as 1 byte + 4/16 of scales.
    """
    h, i = llm.hidden_size, llm.intermediate_size
    kv = llm.num_key_value_heads * (h // llm.num_attention_heads)
    fp8 = precision.startswith("fp8")
    q_fp8, kv_fp8, mlp_fp8 = (fp8 and min(a, c) >= min_features for a, c in ((h, h), (h, kv), (h, i)))
    grouped = 1 + 4 / 16
    norms = 2 * (grouped * h if precision == "fp8-coat" else 2 * b * h)
    qkv_in = (h * (q_fp8 + 2 * kv_fp8)) + (b * h if not (q_fp8 and kv_fp8) else 0)
    attention = b * (2 * h + 2 * kv) + (h if q_fp8 else b * h)  # q, k, v, output; o_proj's input
    mlp_in = 2 * h if mlp_fp8 else b * h
    swiglu = 2 * grouped * i if precision == "fp8-coat" else 3 * b * i
    down_in = i if mlp_fp8 else b * i
    return norms + qkv_in + attention + mlp_in + swiglu + down_in


def activation_estimate(config, cfg: TrainConfig) -> int:
    """LLM saved-for-backward bytes for one micro-batch of ``data.max_length`` tokens per sample.

    Per layer from ``_layer_bytes_per_token`` for ``model.precision``. With gradient checkpointing:
    every layer's input is kept, plus one layer recomputed in full; without: every layer in full.
    Logits are counted in the model dtype, their float32 copy and its gradient. Vision activations
    are left out.
    """
    llm = config.llm
    t = cfg.data.max_length * cfg.optim.micro_batch_size
    b = torch.empty((), dtype=DTYPES[cfg.model.dtype]).element_size()
    per_layer = int(t * _layer_bytes_per_token(llm, precision_of(cfg.model), b, cfg.model.fp8_min_features))
    layers = (llm.num_hidden_layers * t * llm.hidden_size * b + per_layer if cfg.model.gradient_checkpointing
              else llm.num_hidden_layers * per_layer)
    logits = t * llm.vocab_size * (b + 4 + 4)
    return layers + logits


def format_report(report: dict, limit_gib: float | None = None) -> str:
    """A plain-text table of ``memory_report`` output (GiB)."""
    rows = [f"{'component':<10} {'mode':<10} {'params':>14} {'trainable':>14} {'weights':>9} {'grads':>9} "
            f"{'optim':>9} {'total':>9}"]
    for name, c in report["components"].items():
        rows.append(f"{name:<10} {c.mode:<10} {c.parameters:>14,} {c.trainable:>14,} {c.weight_bytes / GIB:>9.2f} "
                    f"{c.grad_bytes / GIB:>9.2f} {c.optimizer_bytes / GIB:>9.2f} {c.total_bytes / GIB:>9.2f}")
    total = report["total_bytes"] / GIB
    rows.append(f"precision: model.dtype={report['dtype']} model.precision={report['precision']} "
                f"optim.name={report['optimizer']}")
    rows.append(f"{'total':<10} {report['dtype']:<10} {'':>14} {'':>14} {'':>9} {'':>9} {'':>9} {total:>9.2f}")
    if report["gathered_bytes"]:
        rows.append(f"per rank of dist.world_size={report['world_size']} (dist.strategy=fsdp2: weights, gradients "
                    f"and optimizer state sharded)")
        rows.append(f"FSDP2 all-gathered units (root + 2 blocks, not in the total): "
                    f"{report['gathered_bytes'] / GIB:.2f} GiB")
    rows.append(f"LLM activations for {report['precision']} (estimate, not in the total): "
                f"{report['activation_bytes'] / GIB:.2f} GiB")
    if limit_gib is not None:
        verdict = "fits" if total < limit_gib else "does NOT fit"
        rows.append(f"weights + gradients + optimizer {verdict} in {limit_gib:g} GiB per process")
    return "\n".join(rows)
