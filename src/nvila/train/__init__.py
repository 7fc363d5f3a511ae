"""Training for NVILA: data, packing, trainability/PEFT, the trainer, checkpoints, memory report.

Components (the library): ``config`` (dataclasses + YAML + key=value), ``data`` (LLaVA samples
through the inference processor, assistant-only labels, mixtures), ``packing`` (one row per
micro-batch, block-diagonal attention), ``peft`` (frozen | layernorm | lora | full per component,
NF4 QLoRA on CPU, merging), ``parts`` (loss, optimizer and precision registries),
``distributed`` (torchrun, collectives, the none | ddp | fsdp2 strategies), ``fsdp`` (FSDP2
sharding and sharded loading), ``export`` (the published layout, streamed per component),
``state`` (atomic, resumable checkpoints; DCP under FSDP2), ``memory`` (dry-run report),
``trainer`` (the loop).
Recipes (YAML, one per stage) ship as package data in ``nvila/recipes/`` (``config.shipped_recipes``).
"""

from .config import TrainConfig, TrainConfigError, load_config

__all__ = ["TrainConfig", "TrainConfigError", "load_config"]
