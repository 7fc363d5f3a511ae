"""The training loop: one script for every stage recipe, single-process or under ``torchrun``.

The trainer is assembled from parts chosen by config keys through registries (parts.py,
distributed.py): the loss (``optim.loss``), the optimizer (``optim.name``), the storage precision
(``model.dtype``), the compute precision (``model.precision``: FP8 module swaps of the LLM) and
the strategy (``dist.strategy``: none | ddp | fsdp2). The loop calls them and
never branches on which one it got.

Read top to bottom, ``train`` does: check the config, the data, the strategy and any checkpoint to
resume (errors before any work) -> join the process group -> load the processor, and the model
from ``model.path`` through the strategy (whole, or each rank's shards) with the trainability of
each component set (peft.py) -> the optimizer with one parameter group per component (own LR; no
weight decay on norms and biases) and a cosine schedule with linear warm-up -> optionally resume ->
for each step: take ``accum`` micro-batches of this rank's samples, pack or pad them, and
backpropagate the loss of the *global* batch -> clip, step, log, save.

Loss normalisation: every micro-batch contributes ``sum of per-token loss / N``, where ``N`` is the
number of labelled tokens in the whole global batch (all micro-batches of all ranks, one
all-reduce per step before the forward passes). DDP and FSDP2 average gradients over ``W`` ranks,
so each rank scales its loss by ``W``. The step's gradient is therefore that of the global
token-mean loss, whatever the split into processes x micro-batches: the same global batch gives
the same loss.

Metrics (``<output_dir>/metrics.jsonl``, rank 0, one line per step): step, loss, grad_norm, lr per
component, tokens (media-expanded, all ranks), tokens_per_s, step_time_s, peak memory (MiB),
skipped samples by reason, ``saved_bytes`` (the bytes autograd kept for backward in the step's largest
micro-batch on rank 0, measured with saved-tensor hooks, parameters excluded: what ``model.precision``
fp8-coat shrinks), ``state_bytes`` (the largest per-rank bytes of parameters, gradients and
optimizer state: the local shards under FSDP2), and per mixture dataset ``loss_by_dataset`` (the token-mean loss over
that dataset's labelled tokens in the step's global batch) and ``targets_by_dataset`` (how many
labelled tokens it had); datasets with no sample in the step are left out. Weighted by the token
counts, the per-dataset losses average to ``loss``; a plateau shows per task.
"""

from __future__ import annotations

import functools
import json
import logging
import math
import random
import resource
import sys
import time
from pathlib import Path

import torch

from ..timetokens import TimeTokenError, ensure_time_tokens
from . import distributed as D
from . import state as S
from .fp8 import SavedBytes
from .config import MODEL_PATH_HINT, TrainConfig, TrainConfigError, accumulation_steps, precision_of, total_steps
from .data import IGNORE_INDEX, MixtureDataset, SampleEncoder, SampleStream, load_mixture
from .packing import collate, num_targets, to_device, token_sources, use_packed_attention
from .parts import COMPUTE, LOSSES, OPTIMIZERS, PRECISIONS, LossContext, pick
from .peft import apply_trainability, component_parameters

logger = logging.getLogger(__name__)

DTYPES = {name: p.param for name, p in PRECISIONS.items()}


# --------------------------------------------------------------------------------------- checks
def check(cfg: TrainConfig, info: D.DistInfo, *, resume: bool = False) -> tuple[MixtureDataset, int, int]:
    """Everything that can fail before work starts: strategy, files, batch sizes, the output directory.

    Returns:
        (dataset, accumulation steps per rank, total optimizer steps)
    Raises:
        TrainConfigError: with a message naming the offending key or file.
    """
    from nvila.checkpoint import CheckpointError, check_layout

    world_size = info.world
    if torch.device(cfg.model.device).type == "cuda" and not torch.cuda.is_available():
        raise TrainConfigError(f"model.device={cfg.model.device} but this torch {torch.__version__} sees no CUDA "
                               f"device; use model.device=cpu or a CUDA build on a GPU machine")
    strategy = pick(D.STRATEGIES, cfg.dist.strategy, "dist.strategy")()
    strategy.check(info)
    if cfg.dist.world_size is not None and cfg.dist.world_size != world_size:
        raise TrainConfigError(f"dist.world_size={cfg.dist.world_size} but torchrun started {world_size} "
                               f"processes (dist.world_size is for --dry-run; drop it or match it)")
    if not cfg.model.path:
        raise TrainConfigError(f"model.path is not set: give the checkpoint to start from ({MODEL_PATH_HINT})")
    try:
        check_layout(cfg.model.path)
    except CheckpointError as e:
        raise TrainConfigError(f"model.path: {e} (set {MODEL_PATH_HINT})") from None
    if not cfg.data.mixture:
        raise TrainConfigError("data.mixture is not set: give a mixture YAML (data.mixture=FILE; the format is in "
                               "docs/training.md)")
    accum = accumulation_steps(cfg, world_size)
    dataset = MixtureDataset(load_mixture(cfg.data.mixture), seed=cfg.run.seed)
    if len(dataset) // world_size < cfg.optim.micro_batch_size:
        raise TrainConfigError(f"impossible batch size: {len(dataset)} samples cannot give each of {world_size} "
                               f"processes a micro-batch of {cfg.optim.micro_batch_size}")
    steps = total_steps(cfg, len(dataset))
    ckpts = S.list_checkpoints(cfg.run.output_dir)
    if not resume and ckpts:
        raise TrainConfigError(f"run.output_dir {cfg.run.output_dir} already holds checkpoints: pass --resume "
                               f"to continue that run, or choose another run.output_dir")
    if resume and ckpts:
        S.check_resume(ckpts[-1], strategy=cfg.dist.strategy, fmt=strategy.checkpoint_format, world=world_size)
    return dataset, accum, steps


# ------------------------------------------------------------------------------------- schedule
def lr_factor(step: int, *, warmup: int, total: int, min_ratio: float) -> float:
    """Linear warm-up over ``warmup`` steps (the first step is non-zero), then cosine to ``min_ratio``."""
    if step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def param_groups(model, cfg: TrainConfig) -> list[dict]:
    """One AdamW group per component and decay kind: ``vision``, ``vision.no_decay``, ... (empty ones dropped)."""
    groups = []
    for comp, named in component_parameters(model).items():
        lr = getattr(cfg.optim.lr, comp)
        decay = [p for n, p in named if p.ndim >= 2]
        no_decay = [p for n, p in named if p.ndim < 2]  # biases and norm weights
        for suffix, params, wd in (("", decay, cfg.optim.weight_decay), (".no_decay", no_decay, 0.0)):
            if params:
                groups.append({"name": comp + suffix, "params": params, "lr": lr, "weight_decay": wd})
    if not groups:
        raise TrainConfigError("no trainable parameters after applying model.vision/projector/llm")
    return groups


# ------------------------------------------------------------------------------------------ loop
def _peak_memory_mib(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def _checkpoint_activations(module) -> None:
    """transformers' per-layer activation checkpointing (non-reentrant), under its 5.x name if present."""
    kwargs = {"use_reentrant": False}
    if hasattr(module, "activation_checkpointing_enable"):
        module.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        module.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)


def _per_source(token_ce: torch.Tensor, labels: torch.Tensor, sources: torch.Tensor, n: int) -> list[float]:
    """CE sums then labelled-token counts per dataset index (2n floats, host). token_ce (B, T-1),
    labels and sources (B, T); tokens of an unknown source (-1) are left out."""
    keep = (labels[:, 1:] != IGNORE_INDEX) & (sources[:, 1:] >= 0)
    src = sources[:, 1:][keep].cpu()
    sums = torch.zeros(n, dtype=torch.float64).index_add_(0, src, token_ce.detach()[keep].double().cpu())
    counts = torch.bincount(src, minlength=n).double()
    return [*sums.tolist(), *counts.tolist()]


def _state_bytes(params: list[torch.Tensor], optimizer) -> list[float]:
    """This rank's bytes of parameters, gradients and optimizer state (local shards of DTensors)."""
    local = lambda t: t.to_local() if hasattr(t, "to_local") else t  # noqa: E731
    size = lambda t: local(t).numel() * local(t).element_size()  # noqa: E731
    grads = sum(size(p.grad) for p in params if p.grad is not None)
    states = sum(size(v) for st in optimizer.state.values() for v in st.values() if torch.is_tensor(v))
    return [float(sum(size(p) for p in params)), float(grads), float(states)]


def _truncate_metrics(path: Path, step: int) -> None:
    """Keep the metric lines of steps <= ``step`` (a resumed run re-logs the steps after it)."""
    if not path.is_file():
        return
    lines = [ln for ln in path.read_text(encoding="utf-8").splitlines() if ln.strip()]
    kept = [ln for ln in lines if json.loads(ln)["step"] <= step]
    path.write_text("".join(ln + "\n" for ln in kept), encoding="utf-8")


def with_time_tokens(processor, model_cfg):
    """The processor with the recipe's ``model.num_time_tokens`` / ``soft_ce_std`` applied to its
    config and tokenizer; the model is then built from that config (``strategy.load``) and the
    export saves it.

    Raises:
        TimeTokenError: the checkpoint already has a different number of time tokens.
    """
    from dataclasses import replace

    from nvila.processor import NVILAProcessor

    pc = processor.config
    n, std = model_cfg.num_time_tokens, model_cfg.soft_ce_std
    if n is None and std is None:
        return processor
    if n is not None and pc.num_time_tokens not in (0, n):
        raise TimeTokenError(f"model.num_time_tokens is {n} but the checkpoint has {pc.num_time_tokens} time tokens")
    pc = replace(pc, num_time_tokens=pc.num_time_tokens if n is None else n,
                 soft_ce_std=pc.soft_ce_std if std is None else std)
    ids = ensure_time_tokens(processor.tokenizer, pc.num_time_tokens, pc.time_token_format)
    pc = replace(pc, time_token_ids=tuple(ids))
    return NVILAProcessor(processor.tokenizer, pc, chat_template=processor.chat_template,
                          max_pixels=processor.max_pixels)


def train(cfg: TrainConfig, *, resume: bool = False) -> Path:
    """Run (or resume) training as configured; returns the last checkpoint directory.

    Args:
        cfg: the full training config.
        resume: continue from the newest complete checkpoint in ``run.output_dir`` (a fresh start if
            there is none).
    """
    from nvila.checkpoint import check_layout
    from nvila.processor import NVILAProcessor

    dataset, accum, steps = check(cfg, D.world_from_env(), resume=resume)
    strategy = pick(D.STRATEGIES, cfg.dist.strategy, "dist.strategy")()
    build_loss = pick(LOSSES, cfg.optim.loss, "optim.loss")
    precision = pick(PRECISIONS, cfg.model.dtype, "model.dtype")
    compute = pick(COMPUTE, precision_of(cfg.model), "model.precision")
    info = D.init(cfg.model.device, need_group=strategy.needs_group)
    if cfg.run.threads:
        torch.set_num_threads(cfg.run.threads)
    device, dtype = torch.device(cfg.model.device), precision.param
    if device.type == "cuda":
        device = torch.device("cuda", info.local_rank)
    out_dir = Path(cfg.run.output_dir)
    out_dir.mkdir(parents=True, exist_ok=True)

    # ---- processor, model (whole or sharded), trainability
    media = {k: v for k, v in (("max_tiles", cfg.data.max_tiles), ("num_video_frames", cfg.data.num_video_frames),
                               ("fps", cfg.data.fps)) if v is not None}
    root = check_layout(cfg.model.path)  # a Hub id: the snapshot ``check`` fetched, read by both loaders
    processor = NVILAProcessor.from_pretrained(root, **media)
    processor = with_time_tokens(processor, cfg.model)
    pc = processor.config
    time_ids = ensure_time_tokens(processor.tokenizer, pc.num_time_tokens, pc.time_token_format)  # the ids it holds
    loss_fn = build_loss(LossContext(tuple(time_ids), pc.soft_ce_std))

    def prepare(model) -> None:  # on the loaded model, or on the meta model before sharding
        apply_trainability(model, cfg.model)
        compute(model.llm, cfg.model)  # FP8 module swaps (after LoRA: its base layers get FP8)
        if cfg.model.gradient_checkpointing:
            for comp, module in (("llm", model.llm), ("vision", model.vision_tower.vision_model)):
                if getattr(cfg.model, comp) != "frozen":  # a frozen tower keeps no activations anyway
                    _checkpoint_activations(module)
        if cfg.data.pack:
            use_packed_attention(model.llm)

    model = strategy.load(root, processor.config, precision, device, prepare, info, cfg.run.seed)
    host_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB
    logger.info("model loaded (dist.strategy=%s): peak host memory %.0f MiB on rank 0, %.0f MiB at most per rank",
                cfg.dist.strategy, host_mib, D.all_max([host_mib])[0])
    torch.manual_seed(cfg.run.seed)  # the same RNG stream (dropout) after loading, whatever the strategy
    random.seed(cfg.run.seed)
    model.train()
    counts = {c: sum(p.numel() for _, p in named) for c, named in component_parameters(model).items()}
    logger.info("trainable parameters: %s", ", ".join(f"{c} {n:,}" for c, n in counts.items()))

    # ---- optimizer, schedule, data
    groups = param_groups(model, cfg)
    optimizer = pick(OPTIMIZERS, cfg.optim.name, "optim.name")(groups, cfg.optim)
    warmup = math.ceil(cfg.optim.warmup_ratio * steps)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, functools.partial(
        lr_factor, warmup=warmup, total=steps, min_ratio=cfg.optim.min_lr_ratio))
    stream = SampleStream(dataset, SampleEncoder(processor, cfg.data.max_length), rank=info.rank,
                          world=info.world, seed=cfg.run.seed, shuffle=cfg.data.shuffle)
    start = 0
    ckpts = S.list_checkpoints(out_dir) if resume else []
    if ckpts:
        start = S.load(ckpts[-1], model=model, optimizer=optimizer, scheduler=scheduler, stream=stream, info=info,
                       fmt=strategy.checkpoint_format)
    metrics_path = out_dir / "metrics.jsonl"
    if info.is_main:
        _truncate_metrics(metrics_path, start)
    module = strategy.wrap(model)

    # ---- loop
    from tqdm import tqdm

    stop = min(steps, cfg.run.stop_after) if cfg.run.stop_after else steps
    bar = tqdm(total=steps, initial=start, disable=not (info.is_main and cfg.run.progress), file=sys.stderr,
               desc="train", dynamic_ncols=True)
    trainable = [p for g in groups for p in g["params"]]
    every = list({id(p): p for p in model.parameters()}.values())
    n_sets = len(dataset.names)
    last = None
    for step in range(start, stop):
        t0 = time.perf_counter()
        taken = [stream.take(cfg.optim.micro_batch_size) for _ in range(accum)]
        micro = [collate(samples, packed=cfg.data.pack, pad_id=processor.ids.pad) for samples in taken]
        local_targets = sum(num_targets(b) for b in micro)
        local_tokens = sum(int(b["input_ids"].numel() if cfg.data.pack else b["attention_mask"].sum()) for b in micro)
        n_targets = D.all_sum([local_targets])[0]
        ce_total = 0.0
        by_source = [0.0] * (2 * n_sets)  # loss sums, then labelled tokens, per mixture dataset
        saved_bytes = 0
        for i, (batch, samples) in enumerate(zip(micro, taken)):
            batch = to_device(batch, device, dtype)
            strategy.check_batch(batch, step)
            labels, sources = batch.pop("labels"), token_sources(samples, packed=cfg.data.pack)
            with strategy.sync(module, i == len(micro) - 1):  # gradients cross ranks at the last micro-batch
                with SavedBytes(every) as saved:
                    token_loss = loss_fn(module(**batch).logits, labels)  # (B, T-1)
                    ce = token_loss.sum()
                saved_bytes = max(saved_bytes, saved.bytes)
                (ce * (info.world / max(n_targets, 1))).backward()
            ce_total += float(ce.detach())
            by_source = [a + b for a, b in zip(by_source, _per_source(token_loss, labels, sources, n_sets))]
        grad_norm = strategy.grad_norm(trainable, cfg.optim.max_grad_norm)
        lrs = {g["name"].split(".")[0]: g["lr"] for g in optimizer.param_groups}
        optimizer.step()
        scheduler.step()
        state_bytes = D.all_max(_state_bytes(every, optimizer))
        optimizer.zero_grad(set_to_none=True)
        skipped = sum(stream.skipped.values())
        ce_sum, tokens, skipped_all, *by_source = D.all_sum([ce_total, local_tokens, skipped, *by_source])
        present = [(name, s, c) for name, s, c in zip(dataset.names, by_source[:n_sets], by_source[n_sets:]) if c > 0]
        elapsed = time.perf_counter() - t0
        record = {"step": step + 1, "loss": ce_sum / max(n_targets, 1), "grad_norm": grad_norm,
                  "lr": lrs, "tokens": int(tokens), "tokens_per_s": tokens / elapsed, "step_time_s": elapsed,
                  "memory_mib": _peak_memory_mib(device), "skipped": int(skipped_all), "saved_bytes": saved_bytes,
                  "state_bytes": dict(zip(("params", "grads", "optimizer"), map(int, state_bytes))),
                  "loss_by_dataset": {name: s / c for name, s, c in present},
                  "targets_by_dataset": {name: int(c) for name, _, c in present}}
        if info.is_main:
            with open(metrics_path, "a", encoding="utf-8") as f:
                f.write(json.dumps(record) + "\n")
            bar.set_postfix(loss=f"{record['loss']:.4f}", tok_s=f"{record['tokens_per_s']:.0f}")
            bar.update(1)
            if stream.skipped:
                logger.debug("skipped samples on rank 0: %s", dict(stream.skipped))
        if (step + 1) % cfg.run.save_every == 0 or step + 1 == stop:
            last = S.save(out_dir, step + 1, model=model, tokenizer=processor.tokenizer, optimizer=optimizer,
                          scheduler=scheduler, stream=stream, info=info, config=cfg.to_dict(),
                          keep_last=cfg.run.keep_last, strategy=cfg.dist.strategy,
                          fmt=strategy.checkpoint_format, final=step + 1 == stop)
    bar.close()
    if stream.skipped:
        logger.warning("rank %d skipped %d bad samples: %s", info.rank, sum(stream.skipped.values()),
                       dict(stream.skipped))
    if stream.fixed:
        logger.warning("rank %d corrected samples while encoding them: %s", info.rank, dict(stream.fixed))
    D.shutdown()
    if last is None:  # resumed a run that had already finished
        last = S.list_checkpoints(out_dir)[-1]
    return last
