"""Checkpoint layouts on disk, and the one place that tells them apart.

Two layouts hold the same three components (``llm``, ``vision_tower``, ``mm_projector``; module keys
as in ``checkpoint.KEY_MAPS``)::

    vila   config.json (model_type "llava_llama" or "vila", with llm_cfg / vision_tower_cfg /
           mm_projector_cfg), one directory per component with its config.json and safetensors
           (model.safetensors, or shards with a model.safetensors.index.json), tokenizer files in llm/.
    hf     config.json (model_type "nvila" or "nvila_lite", with text_config and vision_config,
           image_token_id, video_token_id), weights at the root in one key space (component prefix +
           module key: "llm.", "vision_tower.", "mm_projector."), sharded model-0000k-of-0000n.safetensors
           with model.safetensors.index.json; tokenizer files, chat_template.jinja,
           generation_config.json and processor_config.json at the root.

Sources for the hf layout: SGLang python/sglang/srt/models/nvila.py and nvila_lite.py (config
classes with model_type "nvila" / "nvila_lite", text_config / vision_config / image_token_id /
video_token_id; ``load_weights`` routes "llm."-prefixed keys to Qwen2ForCausalLM and the rest by
parameter name, so the vision tower's keys are "vision_tower.vision_model.*" (SiglipVisionModel) and
the projector's "mm_projector.layers.<i>.*" (an nn.Sequential with the same indices as ours)); the
file list of the Efficient-Large-Model/NVILA-8B-hf model card (processor_config.json at the root).

``layout_of(config)`` picks the layout from the parsed ``config.json`` (model type and structure),
never from path names. This module knows files, keys and configs; it does not build modules.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import torch
from safetensors import safe_open

from .checkpoint import (COMPONENTS, MEDIA_TOKENS, CheckpointError, load_tokenizer, map_key, safetensors_files,
                         write_json)
from .config import HF_MODEL_TYPES, ConfigError, NVILAConfig, _read_json
from .projector import downsample_factor

INDEX = "model.safetensors.index.json"
VILA_MODEL_TYPES = ("llava_llama", "vila")
HF_PREFIXES = {name: name + "." for name in COMPONENTS}  # hf key = prefix + module key


@dataclass(frozen=True)
class Shard:
    """One safetensors file of a checkpoint and the (component, module key) of each of its keys."""

    path: Path
    keys: dict[str, tuple[str, str]]  # published key -> (component, module key)


class VilaLayout:
    name = "vila"
    always_indexed = False  # a component directory with one file has no index
    structure = "config.json with model_type llava_llama or vila, and llm/, vision_tower/, mm_projector/"

    def matches(self, top: dict) -> bool:
        return top.get("model_type", "llava_llama") in VILA_MODEL_TYPES and "text_config" not in top

    def check(self, root: Path, name: str, weights: bool) -> None:
        missing = [c for c in COMPONENTS if not (root / c).is_dir()]
        if missing:
            raise CheckpointError(f"{name}: a vila-layout config.json but missing: {', '.join(missing)}")

    def read_config(self, path: Path) -> NVILAConfig:
        return NVILAConfig.from_vila(path)

    def tokenizer_dir(self, root: Path) -> Path:
        return root / "llm"

    def load_tokenizer(self, root: Path):
        """The tokenizer with NVILA's run-time additions (``checkpoint.load_tokenizer``)."""
        return load_tokenizer(root / "llm")

    def shards(self, root: Path) -> list[Shard]:
        out = []
        for component in COMPONENTS:
            for file in safetensors_files(root / component):
                out.append(Shard(file, {k: (component, map_key(component, k)) for k in _keys(file)}))
        return out

    def unit(self, component: str) -> str:
        """Output files are grouped per component directory."""
        return component

    def file_names(self, units: list[str | None]) -> list[str]:
        """Relative paths for output files, one per (ordered) unit: per component directory,
        ``model.safetensors`` when it has one file, else ``model-0000k-of-0000n.safetensors``."""
        counts = {u: units.count(u) for u in units}
        seen: dict[str | None, int] = {}
        names = []
        for u in units:
            seen[u] = seen.get(u, 0) + 1
            n = counts[u]
            names.append(f"{u}/model.safetensors" if n == 1 else f"{u}/model-{seen[u]:05d}-of-{n:05d}.safetensors")
        return names

    def publish_key(self, component: str, key: str) -> str:
        return map_key(component, key, to_published=True)

    def write_configs(self, config: NVILAConfig, ids, out: Path) -> None:
        files = config.to_published()
        write_json(out / "config.json", files["config.json"])
        for component in COMPONENTS:
            (out / component).mkdir(exist_ok=True)
            write_json(out / component / "config.json", files[component])
        write_json(out / "vision_tower" / "preprocessor_config.json", files["preprocessor"])


class HFLayout:
    name = "hf"
    always_indexed = True  # written with model.safetensors.index.json at any shard count, like the uploads
    structure = ("config.json with model_type nvila or nvila_lite, text_config and vision_config, and "
                 "model*.safetensors at the root")

    def matches(self, top: dict) -> bool:
        return top.get("model_type") in HF_MODEL_TYPES and "text_config" in top and "vision_config" in top

    def check(self, root: Path, name: str, weights: bool) -> None:
        if weights:
            safetensors_files(root)  # raises on no weights or a shard listed in the index but missing

    def read_config(self, path: Path) -> NVILAConfig:
        root = path if path.is_dir() else path.parent
        top = _read_json(path / "config.json" if path.is_dir() else path)
        pre = _read_json(root / "processor_config.json") if (root / "processor_config.json").is_file() else {}
        tok_max_len = None
        if (root / "tokenizer_config.json").is_file():
            tok_max_len = _read_json(root / "tokenizer_config.json").get("model_max_length")
        projector = top.get("mm_projector_type") or HF_MODEL_TYPES.get(top.get("model_type"), ("",))[0]
        width = projector_input_width(root, projector)
        return NVILAConfig.from_hf(top, pre, tok_max_len, width)

    def tokenizer_dir(self, root: Path) -> Path:
        return root

    def load_tokenizer(self, root: Path):
        """The root tokenizer (``checkpoint.load_tokenizer``), checked against the config's media ids.

        Raises:
            CheckpointError: ``image_token_id`` / ``video_token_id`` differ from the tokenizer's ids
                of ``<image>`` / ``<vila/video>``.
        """
        tok = load_tokenizer(root)
        top = _read_json(root / "config.json")
        for kind, field in (("image", "image_token_id"), ("video", "video_token_id")):
            stored, actual = top.get(field), tok.convert_tokens_to_ids(MEDIA_TOKENS[kind])
            if stored is not None and stored != actual:
                raise CheckpointError(f"{root}: config.json {field} {stored} is not the tokenizer's id of "
                                      f"{MEDIA_TOKENS[kind]} ({actual})")
        return tok

    def shards(self, root: Path) -> list[Shard]:
        return [Shard(file, {k: split_hf_key(k, file) for k in _keys(file)}) for file in safetensors_files(root)]

    def unit(self, component: str) -> None:
        """All components share the root's files."""
        return None

    def file_names(self, units: list[str | None]) -> list[str]:
        n = len(units)
        return [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]

    def publish_key(self, component: str, key: str) -> str:
        return HF_PREFIXES[component] + map_key(component, key, to_published=True)

    def write_configs(self, config: NVILAConfig, ids, out: Path) -> None:
        files = config.to_hf(ids.image, ids.video)
        write_json(out / "config.json", files["config.json"])
        write_json(out / "processor_config.json", files["processor_config.json"])


LAYOUTS: dict[str, VilaLayout | HFLayout] = {"vila": VilaLayout(), "hf": HFLayout()}


def known_layouts() -> str:
    return "; ".join(f"{name}: {layout.structure}" for name, layout in LAYOUTS.items())


def layout_of(top: dict, where: Path | str) -> VilaLayout | HFLayout:
    """The layout whose ``config.json`` this is (model type and structure).

    Raises:
        CheckpointError: a config in no known layout; the message lists the known ones.
    """
    for layout in LAYOUTS.values():
        if layout.matches(top):
            return layout
    raise CheckpointError(f"{where}: config.json (model_type {top.get('model_type')!r}) is in no known checkpoint "
                          f"layout; known layouts: {known_layouts()}")


def detect(root: Path) -> VilaLayout | HFLayout:
    """The layout of checkpoint directory ``root`` (its ``config.json`` must exist)."""
    try:
        top = _read_json(root / "config.json")
    except ConfigError as e:
        raise CheckpointError(str(e)) from None
    return layout_of(top, root)


def split_hf_key(key: str, where: Path | str) -> tuple[str, str]:
    """An hf key -> (component, module key) by its component prefix."""
    for component, prefix in HF_PREFIXES.items():
        if key.startswith(prefix):
            return component, map_key(component, key[len(prefix):])
    raise CheckpointError(f"{where}: key {key!r} belongs to no component (expected a prefix of "
                          f"{', '.join(HF_PREFIXES.values())})")


def projector_input_width(root: Path, projector_type: str) -> int | None:
    """The projector's input width Cin (``mm_hidden_size``) measured on an hf checkpoint's weights.

    The lowest-indexed ``mm_projector.layers.<i>.weight`` is the first LayerNorm (k*k*Cin,) or Linear
    (D, k*k*Cin) after the k x k space-to-channel block, so Cin = shape[-1] / k**2. Only the
    safetensors header is read. None when the checkpoint has no weights here (a bare config).
    """
    try:
        files = safetensors_files(root)
    except CheckpointError:
        return None
    first: tuple[int, str, Path] | None = None
    for file in files:
        for key in _keys(file):
            parts = key.split(".")
            if key.startswith("mm_projector.layers.") and parts[2].isdigit() and parts[-1] == "weight":
                first = min(first or (int(parts[2]), key, file), (int(parts[2]), key, file))
    if first is None:
        raise CheckpointError(f"{root}: no mm_projector.layers.<i>.weight among the weights")
    with safe_open(first[2], framework="pt") as f:
        shape = f.get_slice(first[1]).get_shape()
    try:
        k = downsample_factor(projector_type)
    except ValueError as e:
        raise CheckpointError(str(e)) from None
    return int(shape[-1]) // (k * k)


def read_states(root: Path, layout: VilaLayout | HFLayout) -> dict[str, dict[str, torch.Tensor]]:
    """{component: {module key: tensor}} of every weight file, as stored (CPU, file dtype)."""
    states: dict[str, dict[str, torch.Tensor]] = {c: {} for c in COMPONENTS}
    for shard, tensors in iter_shards(layout.shards(root)):
        for key, tensor in tensors.items():
            component, module_key = shard.keys[key]
            states[component][module_key] = tensor
    return states


def iter_shards(shards: list[Shard]) -> Iterator[tuple[Shard, dict[str, torch.Tensor]]]:
    """Each shard with its tensors, one file in memory at a time."""
    for shard in shards:
        try:
            with safe_open(shard.path, framework="pt", device="cpu") as f:
                tensors = {k: f.get_tensor(k) for k in f.keys()}
        except (OSError, ValueError, RuntimeError) as e:
            raise CheckpointError(f"{shard.path}: unreadable safetensors file ({e})") from None
        yield shard, tensors


def shard_metadata(path: Path) -> dict[str, str]:
    with safe_open(path, framework="pt") as f:
        return f.metadata() or {}


def _keys(file: Path) -> list[str]:
    try:
        with safe_open(file, framework="pt") as f:
            return list(f.keys())
    except (OSError, ValueError, RuntimeError) as e:
        raise CheckpointError(f"{file}: unreadable safetensors file ({e})") from None


def write_index(directory: Path, weight_map: dict[str, str], total_size: int) -> None:
    """``model.safetensors.index.json`` in transformers' format (names relative to ``directory``)."""
    write_json(directory / INDEX, {"metadata": {"total_size": total_size}, "weight_map": dict(sorted(weight_map.items()))})
