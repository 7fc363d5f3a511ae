"""Training configuration: typed dataclasses, overridable from YAML and ``key=value``.

One mechanism (STYLE principle 11): a recipe YAML is read into ``TrainConfig``; command-line
overrides are dotted keys (``optim.lr.llm=1e-4``, ``run.threads=2``) applied to the YAML mapping
before it is typed. Unknown keys, wrong types and impossible values raise ``TrainConfigError``
naming the key and the valid choices, before any model or data is touched.

Model configs hold no training settings: everything about how to train lives here. This module
knows no tensors and no files besides the YAML it reads. The recipes shipped with nvila are package
data (``nvila/recipes/*.yaml``), found through ``importlib.resources`` by name (``finetune_lora``).
"""

from __future__ import annotations

import dataclasses
import os
import types
import typing
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from importlib.resources.abc import Traversable

COMPONENTS = ("vision", "projector", "llm")
TRAINABILITY = ("frozen", "layernorm", "lora", "full")
DTYPES = ("float32", "bfloat16", "float16")
# model.precision: how the LLM computes (parts.COMPUTE); the plain ones must match model.dtype.
COMPUTE = ("fp32", "bf16", "fp16", "fp8-linear", "fp8-coat")
PLAIN_PRECISION = {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16"}
FP8_DEVICES = ("cpu", "cuda")
LLM_QUANT = ("none", "nf4")
# The keys of the parts registries (parts.py, distributed.py); kept here so that config checks need no torch.
LOSSES = ("token_ce", "soft_ce")
OPTIMIZERS = ("adamw", "adamw_fp8")
STRATEGIES = ("none", "ddp", "fsdp2")


class TrainConfigError(ValueError):
    """A training config or override is invalid (unknown key, bad value, missing file, batch size)."""


@dataclass
class LoraSettings:
    """LoRA hyper-parameters (spec §5: the reference defaults r 64, alpha 16, dropout 0.05)."""

    r: int = 64
    alpha: float = 16.0
    dropout: float = 0.05


@dataclass
class ModelSection:
    """What to train: the start checkpoint and the trainability of each component."""

    # A checkpoint in the published layout, a hub id (ORG/NAME[@REV]), a training run directory (its
    # newest complete checkpoint is used), or a config.json for --dry-run.
    path: str = ""
    dtype: str = "float32"  # storage dtype of the weights (and the compute dtype outside FP8 GEMMs)
    # fp32 | bf16 | fp16 | fp8-linear | fp8-coat; None: the plain one of model.dtype (see docs/training.md, FP8)
    precision: str | None = None
    fp8_min_features: int = 3584  # FP8 only for LLM linears with min(in, out) >= this (the reference's rule)
    device: str = "cpu"
    vision: str = "frozen"
    projector: str = "full"
    llm: str = "frozen"
    lora: LoraSettings = field(default_factory=LoraSettings)
    quantize_llm: str = "none"  # "nf4": frozen LLM base weights stored in 4-bit NF4 (QLoRA)
    nf4_block_size: int = 64
    gradient_checkpointing: bool = False
    # Time tokens (temporal localization): N > 0 gives a checkpoint that lacks them N time tokens
    # (embeddings resized with mean rows; saved in the config); None keeps the checkpoint's own.
    num_time_tokens: int | None = None
    soft_ce_std: float | None = None  # sigma of optim.loss soft_ce; None: the checkpoint's (default 1.0)


@dataclass
class ComponentLR:
    """Peak learning rate of each component's parameter group."""

    vision: float = 2e-5
    projector: float = 2e-5
    llm: float = 2e-5


@dataclass
class DataSection:
    """Where the samples come from and how they are batched."""

    mixture: str = ""  # a mixture YAML (see data.py)
    max_length: int = 8192  # media-expanded tokens; longer samples are skipped and counted
    pack: bool = True  # one row per micro-batch, block-diagonal attention (packing.py)
    shuffle: bool = True
    max_tiles: int | None = None  # processor overrides, also written to the saved config
    num_video_frames: int | None = None
    fps: float | None = None


@dataclass
class OptimSection:
    """The loss, the optimizer (AdamW), cosine schedule with linear warm-up, accumulation and clipping."""

    loss: str = "token_ce"  # a key of parts.LOSSES
    name: str = "adamw"  # a key of parts.OPTIMIZERS
    lr: ComponentLR = field(default_factory=ComponentLR)
    weight_decay: float = 0.0
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    warmup_ratio: float = 0.03
    min_lr_ratio: float = 0.0
    max_grad_norm: float | None = None
    global_batch_size: int = 16
    micro_batch_size: int = 1
    epochs: float = 1.0
    max_steps: int | None = None  # overrides epochs when set


@dataclass
class RunSection:
    """Where outputs go, how often to save and log, and process settings."""

    output_dir: str = "runs/nvila"
    seed: int = 0
    threads: int | None = None  # torch intra-op threads per process
    save_every: int = 500
    keep_last: int = 2
    stop_after: int | None = None  # stop (and save) after this step, schedule unchanged
    progress: bool = True


@dataclass
class DistSection:
    """How the work is spread over the processes that ``torchrun`` starts.

    ``none``: one process. ``ddp``: every rank holds the whole model, gradients are averaged (one
    process is the same as ``none``). ``fsdp2``: parameters, gradients and optimizer state are
    sharded over the ranks (``fully_shard`` per transformer block), which needs ``torchrun``.
    """

    strategy: str = "ddp"
    # --dry-run only: report per-rank bytes for this many ranks (a real run takes torchrun's WORLD_SIZE).
    world_size: int | None = None


@dataclass
class TrainConfig:
    model: ModelSection = field(default_factory=ModelSection)
    data: DataSection = field(default_factory=DataSection)
    optim: OptimSection = field(default_factory=OptimSection)
    run: RunSection = field(default_factory=RunSection)
    dist: DistSection = field(default_factory=DistSection)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


# ------------------------------------------------------------------------------------- loading
def shipped_recipes() -> dict[str, Traversable]:
    """{name: YAML resource} of the recipes shipped with nvila (``nvila/recipes/*.yaml``), by name."""
    root = resources.files("nvila") / "recipes"
    return {e.name[: -len(".yaml")]: e for e in sorted(root.iterdir(), key=lambda e: e.name)
            if e.name.endswith(".yaml")}


def find_recipe(spec: str | os.PathLike) -> Path | Traversable:
    """A recipe YAML: an existing file, else a shipped recipe by name (``finetune_lora[.yaml]``).

    Raises:
        TrainConfigError: neither; the message lists the shipped names.
    """
    p = Path(spec)
    if p.is_file():
        return p
    shipped = shipped_recipes()
    name = p.name.removesuffix(".yaml")
    if p.parent == Path(".") and name in shipped:
        return shipped[name]
    raise TrainConfigError(f"{spec}: no such config file, and no recipe of that name ships with nvila "
                           f"(shipped: {', '.join(shipped)})")


# What model.path may be, for the errors that ask for it.
MODEL_PATH_HINT = ("model.path=CKPT: a checkpoint directory in the published layout, a hub id "
                   "ORG/NAME[@REVISION], or an earlier stage's run.output_dir")


def resolve_start(path: str) -> str:
    """``model.path`` as given, or, for a training run directory, its newest complete checkpoint.

    A directory without ``config.json`` that holds ``checkpoint-*`` directories is a run directory
    (``run.output_dir`` of an earlier stage); anything else is returned unchanged for the loader.
    """
    p = Path(path)
    if not path or not p.is_dir() or (p / "config.json").exists():
        return path
    from .state import list_checkpoints

    found = list_checkpoints(p)
    return str(found[-1]) if found else path


def load_config(path: str | os.PathLike | None, overrides: list[str] = ()) -> TrainConfig:
    """Read a recipe (YAML path or shipped name; defaults when ``path`` is None) and apply ``key=value`` overrides.

    Relative ``model.path``, ``data.mixture`` and ``run.output_dir`` stay relative to the current
    directory, as on any command line. A ``model.path`` naming a training run directory becomes its
    newest complete checkpoint (``resolve_start``).

    Raises:
        TrainConfigError: unknown recipe, unreadable YAML, unknown keys, bad types or values.
    """
    import yaml

    raw: dict = {}
    if path is not None:
        p = find_recipe(path)
        try:
            raw = yaml.safe_load(p.read_text(encoding="utf-8")) or {}
        except yaml.YAMLError as e:
            raise TrainConfigError(f"{p}: not valid YAML ({e})") from None
        if not isinstance(raw, dict):
            raise TrainConfigError(f"{p}: the top level must be a mapping of sections")
    for item in overrides:
        key, sep, text = item.partition("=")
        if not sep or not key:
            raise TrainConfigError(f"override {item!r} is not key=value (e.g. optim.lr.llm=1e-4)")
        node = raw
        parts = key.split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise TrainConfigError(f"override {key}: {part} is not a section")
        node[parts[-1]] = yaml.safe_load(text) if text.strip() else ""
    cfg = _build(TrainConfig, raw, "")
    validate(cfg)
    cfg.model.path = resolve_start(cfg.model.path)
    return cfg


def _build(cls, raw: Any, where: str):
    if not isinstance(raw, dict):
        raise TrainConfigError(f"{where or 'config'}: expected a mapping, got {raw!r}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    unknown = sorted(set(raw) - set(names))
    if unknown:
        prefix = f"{where}." if where else ""
        raise TrainConfigError(f"unknown config key {prefix}{unknown[0]}; valid keys"
                               f"{' in ' + where if where else ''}: {', '.join(names)}")
    values = {k: _coerce(v, hints[k], f"{where}.{k}" if where else k) for k, v in raw.items()}
    return cls(**values)


def _coerce(value: Any, tp: Any, key: str) -> Any:
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        return _coerce(value, next(a for a in args if a is not type(None)), key)
    if dataclasses.is_dataclass(tp):
        return _build(tp, value, key)
    bad = TrainConfigError(f"{key}: expected {getattr(tp, '__name__', tp)}, got {value!r}")
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise bad
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, (int, str)):
            raise bad
        try:
            return int(value)
        except ValueError:
            raise bad from None
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float, str)):
            raise bad
        try:
            return float(value)
        except ValueError:
            raise bad from None
    if tp is str:
        if isinstance(value, (dict, list)) or value is None:
            raise bad
        return str(value)
    if origin is tuple:
        if not isinstance(value, (list, tuple)) or len(value) != len(args):
            raise TrainConfigError(f"{key}: expected a list of {len(args)} values, got {value!r}")
        return tuple(_coerce(v, a, key) for v, a in zip(value, args))
    raise TrainConfigError(f"{key}: unsupported type {tp}")


def _choice(key: str, value: str, valid: tuple[str, ...]) -> None:
    if value not in valid:
        raise TrainConfigError(f"{key}: {value!r} is not valid; choose one of {', '.join(valid)}")


def validate(cfg: TrainConfig) -> None:
    """Value checks that need no files: choices, ranges, component/LoRA/NF4 combinations."""
    m, o, d, r = cfg.model, cfg.optim, cfg.data, cfg.run
    for c in COMPONENTS:
        _choice(f"model.{c}", getattr(m, c), TRAINABILITY)
    _choice("model.dtype", m.dtype, DTYPES)
    _choice("model.quantize_llm", m.quantize_llm, LLM_QUANT)
    _check_precision(cfg)
    _choice("optim.loss", o.loss, LOSSES)
    _choice("optim.name", o.name, OPTIMIZERS)
    _choice("dist.strategy", cfg.dist.strategy, STRATEGIES)
    if cfg.dist.world_size is not None and cfg.dist.world_size < 1:
        raise TrainConfigError(f"dist.world_size must be >= 1, got {cfg.dist.world_size}")
    if cfg.dist.strategy == "fsdp2" and m.quantize_llm != "none":
        raise TrainConfigError("dist.strategy=fsdp2 does not shard NF4 base weights; use dist.strategy=ddp "
                               "with model.quantize_llm=nf4")
    if m.quantize_llm == "nf4" and m.llm not in ("lora", "frozen"):
        raise TrainConfigError(f"model.quantize_llm=nf4 keeps the LLM base weights frozen in 4 bits; "
                               f"model.llm must be lora or frozen, got {m.llm!r}")
    if all(getattr(m, c) == "frozen" for c in COMPONENTS):
        raise TrainConfigError("every component is frozen: nothing to train (set model.vision / "
                               "model.projector / model.llm to layernorm, lora or full)")
    if m.lora.r < 1 or m.lora.alpha <= 0 or not 0 <= m.lora.dropout < 1:
        raise TrainConfigError("model.lora needs r >= 1, alpha > 0 and 0 <= dropout < 1")
    if m.num_time_tokens is not None and m.num_time_tokens < 2:
        raise TrainConfigError(f"model.num_time_tokens must be >= 2 (the first and the last instant), got "
                               f"{m.num_time_tokens}")
    if m.soft_ce_std is not None and not m.soft_ce_std > 0:
        raise TrainConfigError(f"model.soft_ce_std must be > 0, got {m.soft_ce_std}")
    if m.nf4_block_size < 2 or m.nf4_block_size % 2:
        raise TrainConfigError(f"model.nf4_block_size must be an even number >= 2, got {m.nf4_block_size}")
    for c in COMPONENTS:
        if getattr(o.lr, c) < 0:
            raise TrainConfigError(f"optim.lr.{c} must be >= 0")
    if o.micro_batch_size < 1 or o.global_batch_size < 1:
        raise TrainConfigError("optim.micro_batch_size and optim.global_batch_size must be >= 1")
    if o.max_steps is not None and o.max_steps < 1:
        raise TrainConfigError(f"optim.max_steps must be >= 1, got {o.max_steps}")
    if o.max_steps is None and o.epochs <= 0:
        raise TrainConfigError(f"optim.epochs must be > 0, got {o.epochs}")
    if not 0 <= o.warmup_ratio < 1 or not 0 <= o.min_lr_ratio <= 1:
        raise TrainConfigError("optim.warmup_ratio must be in [0, 1) and optim.min_lr_ratio in [0, 1]")
    if o.max_grad_norm is not None and o.max_grad_norm <= 0:
        raise TrainConfigError("optim.max_grad_norm must be > 0, or null for no clipping")
    if d.max_length < 2:
        raise TrainConfigError(f"data.max_length must be >= 2, got {d.max_length}")
    if r.save_every < 1 or r.keep_last < 1:
        raise TrainConfigError("run.save_every and run.keep_last must be >= 1")
    if r.threads is not None and r.threads < 1:
        raise TrainConfigError(f"run.threads must be >= 1, got {r.threads}")


def precision_of(m: ModelSection) -> str:
    """``model.precision``, or the plain precision of ``model.dtype`` when it is unset."""
    return m.precision or PLAIN_PRECISION[m.dtype]


def _check_precision(cfg: TrainConfig) -> None:
    m = cfg.model
    if m.precision is None:
        return
    _choice("model.precision", m.precision, COMPUTE)
    plain = {v: k for k, v in PLAIN_PRECISION.items()}
    if m.precision in plain and plain[m.precision] != m.dtype:
        raise TrainConfigError(f"model.precision={m.precision} computes in {plain[m.precision]} but model.dtype="
                               f"{m.dtype}; set model.dtype={plain[m.precision]} or leave model.precision unset")
    if m.precision.startswith("fp8"):
        if m.dtype not in ("float32", "bfloat16"):
            raise TrainConfigError(f"model.precision={m.precision} keeps float32 or bfloat16 weights around its FP8 "
                                   f"GEMMs; model.dtype={m.dtype} is not supported")
        if m.device.split(":")[0] not in FP8_DEVICES:
            raise TrainConfigError(f"model.precision={m.precision} needs torch's float8 types, available on "
                                   f"{' and '.join(FP8_DEVICES)}; model.device={m.device} has none")
        if m.quantize_llm != "none":
            raise TrainConfigError(f"model.precision={m.precision} runs the LLM linears in FP8; it cannot be "
                                   f"combined with model.quantize_llm={m.quantize_llm}")
        if cfg.dist.strategy == "fsdp2":
            raise TrainConfigError(f"model.precision={m.precision} is not supported with dist.strategy=fsdp2 yet; "
                                   f"use dist.strategy=ddp or none")
        if m.fp8_min_features < 0:
            raise TrainConfigError(f"model.fp8_min_features must be >= 0, got {m.fp8_min_features}")


def accumulation_steps(cfg: TrainConfig, world_size: int) -> int:
    """Micro-batches per rank per optimizer step; raises if the global batch cannot be split."""
    o = cfg.optim
    per_step = o.micro_batch_size * world_size
    if o.global_batch_size % per_step:
        raise TrainConfigError(
            f"impossible batch size: optim.global_batch_size={o.global_batch_size} is not a multiple of "
            f"optim.micro_batch_size ({o.micro_batch_size}) x processes ({world_size}) = {per_step}")
    return o.global_batch_size // per_step


def total_steps(cfg: TrainConfig, num_samples: int) -> int:
    """Optimizer steps of the run: ``max_steps``, or ``epochs`` over ``num_samples``.

    Raises:
        TrainConfigError: when the data cannot fill a single global batch.
    """
    g = cfg.optim.global_batch_size
    if num_samples < g:
        raise TrainConfigError(f"impossible batch size: optim.global_batch_size={g} but the data mixture "
                               f"has only {num_samples} samples")
    if cfg.optim.max_steps is not None:
        return cfg.optim.max_steps
    return max(1, int(cfg.optim.epochs * num_samples) // g)
