"""Training for NVILA: data, packing, trainability/PEFT, the trainer, checkpoints, memory report.

Components (the library): ``config`` (dataclasses + YAML + key=value), ``data`` (LLaVA samples
through the inference processor, assistant-only labels, mixtures), ``packing`` (one row per
micro-batch, block-diagonal attention), ``peft`` (frozen | layernorm | lora | full per component,
NF4 QLoRA on CPU, merging), ``distributed`` (torchrun, DDP), ``state`` (atomic, resumable
checkpoints in the published layout), ``memory`` (dry-run report), ``trainer`` (the loop).
Recipes (YAML, one per stage) ship as package data in ``nvila/recipes/`` (``config.shipped_recipes``).
"""

from .config import TrainConfig, TrainConfigError, load_config

__all__ = ["TrainConfig", "TrainConfigError", "load_config"]
