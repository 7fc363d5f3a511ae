"""The quantized checkpoint format: which modules are quantized, and how, read from the weights' metadata.

A quantized checkpoint is the published layout (``config.json``, ``llm/``, ``vision_tower/``,
``mm_projector/``) in which each component's safetensors files carry, in their ``__metadata__``, the
key ``nvila_quant`` holding a JSON object::

    {"version": 1,
     "modules": {"<module path in the component>": {"scheme": "w8a8" | "w4a16",
                                                     "group_size": 128,        # w4a16 only
                                                     "bias": true,
                                                     "input_scale": false}, ...}}

Every quantized ``nn.Linear`` of the component is listed under its state-dict prefix (for example
``model.layers.0.mlp.down_proj`` in ``llm/``), and its tensors are stored under that prefix with the
names of ``linear.py`` (``qweight``, ``scales``, ``zeros``, ``bias``, ``input_scale``). A component
without the key is full precision. Smoothing/AWQ scales that could be folded are already inside the
stored norm and linear weights, which keep their usual names and dtypes. A quantized ``lm_head`` is
never tied: such a checkpoint's ``llm/config.json`` has ``tie_word_embeddings: false``.

Nothing is inferred from file or directory names: ``read_quant_metadata`` reads the metadata, and
``swap_modules`` replaces the listed ``nn.Linear`` modules (typically on the meta device, before the
weights are loaded by the usual strict loader) with the runtime modules.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from safetensors import safe_open
from torch import nn

from ..checkpoint import COMPONENTS, CheckpointError, safetensors_files
from ..layouts import detect, shard_metadata
from .linear import SCHEMES, QuantLinear, W4A16Linear, W8A8Linear

METADATA_KEY = "nvila_quant"
FORMAT_VERSION = 1


def module_spec(module: QuantLinear) -> dict:
    """The metadata entry describing one runtime module."""
    spec = {"scheme": module.scheme, "bias": module.bias is not None, "input_scale": module.input_scale is not None}
    if isinstance(module, W4A16Linear):
        spec["group_size"] = module.group_size
    return spec


def component_metadata(component: nn.Module) -> dict[str, str]:
    """``{"nvila_quant": json}`` for a component holding quantized modules, else ``{}``."""
    modules = {name: module_spec(m) for name, m in component.named_modules() if isinstance(m, QuantLinear)}
    if not modules:
        return {}
    return {METADATA_KEY: json.dumps({"version": FORMAT_VERSION, "modules": modules}, sort_keys=True)}


def parse_metadata(raw: str, where: str) -> dict[str, dict]:
    """Validate a ``nvila_quant`` JSON string; returns {module path: spec}.

    Raises:
        CheckpointError: on malformed JSON, an unknown version or an unknown scheme.
    """
    try:
        data = json.loads(raw)
        version, modules = data["version"], data["modules"]
    except (json.JSONDecodeError, KeyError, TypeError):
        raise CheckpointError(f"{where}: malformed {METADATA_KEY} metadata") from None
    if version != FORMAT_VERSION:
        raise CheckpointError(f"{where}: {METADATA_KEY} format version {version} is not supported "
                              f"(this nvila reads version {FORMAT_VERSION})")
    for name, spec in modules.items():
        if spec.get("scheme") not in SCHEMES:
            raise CheckpointError(f"{where}: module {name} has unknown quantization scheme "
                                  f"{spec.get('scheme')!r}; valid: {', '.join(SCHEMES)}")
    return modules


def read_quant_metadata(root: str | os.PathLike) -> dict[str, dict[str, dict]]:
    """{component: {module path: spec}} for the quantized components of a checkpoint ({} if none).

    All safetensors files of a component must agree (a sharded component repeats the metadata).
    Quantized checkpoints exist in the vila layout only (``nvila.layouts``).

    Raises:
        CheckpointError: malformed metadata, disagreeing shards, or quantized weights in the hf layout.
    """
    root = Path(root)
    if detect(root).name == "hf":
        for file in safetensors_files(root):
            if METADATA_KEY in shard_metadata(file):
                raise CheckpointError(f"{file}: quantized weights ({METADATA_KEY} metadata) in the hf layout; "
                                      f"nvila reads quantized checkpoints in the vila layout only")
        return {}
    found: dict[str, dict[str, dict]] = {}
    for name in COMPONENTS:
        raws = set()
        for file in safetensors_files(Path(root) / name):
            with safe_open(file, framework="pt", device="cpu") as f:
                raws.add((f.metadata() or {}).get(METADATA_KEY))
        if len(raws) > 1:
            raise CheckpointError(f"{Path(root) / name}: shards disagree on the {METADATA_KEY} metadata")
        raw = raws.pop()
        if raw is not None:
            found[name] = parse_metadata(raw, str(Path(root) / name))
    return found


def swap_modules(component: nn.Module, modules: dict[str, dict], where: str) -> None:
    """Replace each listed ``nn.Linear`` of ``component`` by its runtime module (same device and dtype).

    Raises:
        CheckpointError: if a listed module is missing or is not a linear layer.
    """
    for name, spec in modules.items():
        parent_name, _, attr = name.rpartition(".")
        try:
            parent = component.get_submodule(parent_name) if parent_name else component
            linear = getattr(parent, attr)
        except AttributeError:
            raise CheckpointError(f"{where}: quantized module {name} does not exist in the model") from None
        if not isinstance(linear, nn.Linear):
            raise CheckpointError(f"{where}: quantized module {name} is a {type(linear).__name__}, not a Linear")
        factory = dict(device=linear.weight.device, dtype=linear.weight.dtype, bias=spec["bias"],
                       input_scale=spec["input_scale"])
        if spec["scheme"] == "w8a8":
            new = W8A8Linear(linear.in_features, linear.out_features, **factory)
        else:
            new = W4A16Linear(linear.in_features, linear.out_features, group_size=int(spec["group_size"]), **factory)
        setattr(parent, attr, new)


def apply_quant_metadata(model: nn.Module, metadata: dict[str, dict[str, dict]]) -> None:
    """Swap the quantized modules of every component of an ``NVILAForConditionalGeneration``."""
    for name, modules in metadata.items():
        swap_modules(getattr(model, name), modules, name)
