"""Typed configs for NVILA models, and the one place that reads published ``config.json`` files.

A published checkpoint (format ``llava_llama``) has a top-level ``config.json`` that embeds copies of
the three component configs (``llm_cfg``, ``vision_tower_cfg``, ``mm_projector_cfg``). Each component
directory (``llm/``, ``vision_tower/``, ``mm_projector/``) also carries its own ``config.json``; when
present, those win. Everything is translated here, once, into the dataclasses below; the rest of the
package never looks at raw JSON.

These configs describe the model and its preprocessing only. They hold no training settings.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

IMAGE_ASPECT_RATIOS = ("dynamic_s2", "dynamic", "resize", "pad", "plain")


class ConfigError(ValueError):
    """A config file is missing, unreadable or describes a model this package cannot build."""


@dataclass
class LLMConfig:
    """A Qwen2 causal language model (field names follow ``transformers.Qwen2Config``)."""

    vocab_size: int = 151648
    hidden_size: int = 3584
    intermediate_size: int = 18944
    num_hidden_layers: int = 28
    num_attention_heads: int = 28
    num_key_value_heads: int = 4
    rms_norm_eps: float = 1e-6
    rope_theta: float = 1_000_000.0
    max_position_embeddings: int = 32768
    tie_word_embeddings: bool = False
    model_max_length: int = 8192
    hidden_act: str = "silu"

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads


# Qwen2.5 bases of the NVILA family, keyed by hidden size: used only when a config omits `llm_cfg`
# (the partial published configs do).
LLM_PRESETS: dict[int, LLMConfig] = {
    1536: LLMConfig(hidden_size=1536, intermediate_size=8960, num_hidden_layers=28, num_attention_heads=12,
                    num_key_value_heads=2, tie_word_embeddings=True),
    3584: LLMConfig(),
    5120: LLMConfig(hidden_size=5120, intermediate_size=13824, num_hidden_layers=48, num_attention_heads=40,
                    num_key_value_heads=8),
}


@dataclass
class VisionConfig:
    """A SigLIP vision transformer (defaults: so400m-patch14-448)."""

    hidden_size: int = 1152
    intermediate_size: int = 4304
    num_hidden_layers: int = 27
    num_attention_heads: int = 16
    image_size: int = 448
    patch_size: int = 14
    num_channels: int = 3
    layer_norm_eps: float = 1e-6
    hidden_act: str = "gelu_pytorch_tanh"
    select_layer: int = -2  # index into hidden_states (embeddings + one entry per layer)
    select_feature: str = "cls_patch"  # "cls_patch": all tokens; "patch": drop token 0

    def __post_init__(self) -> None:
        if self.image_size % self.patch_size:
            raise ConfigError(f"image_size {self.image_size} is not a multiple of patch_size {self.patch_size}")
        if self.select_feature not in ("cls_patch", "patch"):
            raise ConfigError(f"unknown mm_vision_select_feature {self.select_feature!r}; valid: cls_patch, patch")
        if not -self.num_hidden_layers - 1 <= self.select_layer <= self.num_hidden_layers:
            raise ConfigError(f"mm_vision_select_layer {self.select_layer} is out of range")

    @property
    def grid(self) -> int:
        """Patches per side of one tile (448 / 14 = 32)."""
        return self.image_size // self.patch_size

    @property
    def num_layers_used(self) -> int:
        """Encoder layers that must run to produce ``hidden_states[select_layer]``."""
        n = self.num_hidden_layers + 1
        return (self.select_layer % n)


@dataclass
class VideoEncoderConfig:
    """How per-frame features become LLM tokens.

    ``kind`` is ``"basic"`` (every frame kept) or ``"tsp"`` (average-pool groups of frames/rows/cols,
    one output per entry of ``pool_sizes``, each ``(frames, rows, cols)``).
    """

    kind: str = "basic"
    pool_sizes: list[tuple[int, int, int]] = field(default_factory=list)
    start_tokens: str | None = None
    end_tokens: str | None = "\n"
    sep_tokens: str | None = None


@dataclass
class ImageEncoderConfig:
    start_tokens: str | None = None
    end_tokens: str | None = "\n"


# `_target_` class names written by the reference training code -> our encoder kinds.
VIDEO_ENCODERS = {"BasicVideoEncoder": "basic", "TSPVideoEncoder": "tsp"}
IMAGE_ENCODERS = {"BasicImageEncoder"}

# The -hf layout's model types -> the projector types each can hold (the first is the default when
# the config names none). Sources: SGLang python/sglang/srt/models/nvila.py (model_type "nvila": a
# 2x2 space-to-channel block, then LayerNorm, Linear, GELU, Linear) and nvila_lite.py ("nvila_lite":
# 3x3 block, then LayerNorm, Linear, GELU, LayerNorm, Linear, GELU, Linear); both read `text_config`
# (Qwen2Config), `vision_config` (SiglipVisionConfig), `image_token_id` and `video_token_id`.
HF_MODEL_TYPES: dict[str, tuple[str, ...]] = {
    "nvila": ("mlp_downsample", "mlp_downsample_2x2_fix"),
    "nvila_lite": ("mlp_downsample_3x3_fix",),
}
# `architectures` written per model type: SGLang's EntryClass names in the same files.
HF_ARCHITECTURES = {"nvila": "NVILAForConditionalGeneration", "nvila_lite": "NVILALiteForConditionalGeneration"}
# Keys of an -hf config that are not vila top-level fields, and vila top-level keys `to_hf` leaves out.
_HF_ONLY = ("architectures", "model_type", "text_config", "vision_config", "image_token_id", "video_token_id")
_NOT_HF_EXTRAS = ("architectures", "model_type", "llm_cfg", "vision_tower_cfg", "mm_projector_cfg", "hidden_size",
                  "mm_hidden_size")


@dataclass
class NVILAConfig:
    """Everything that changes NVILA inference behaviour."""

    llm: LLMConfig = field(default_factory=LLMConfig)
    vision: VisionConfig = field(default_factory=VisionConfig)
    projector_type: str = "mlp_downsample"
    image_aspect_ratio: str = "dynamic_s2"
    s2_scales: tuple[int, ...] | None = (448, 896, 1344)
    s2_resize_output_to_scale_idx: int = -1
    max_tiles: int = 12
    min_tiles: int = 1
    video_max_tiles: int = 1
    num_video_frames: int = 8
    fps: float = 0.0
    image_encoder: ImageEncoderConfig = field(default_factory=ImageEncoderConfig)
    video_encoder: VideoEncoderConfig = field(default_factory=VideoEncoderConfig)
    num_time_tokens: int = 0
    time_token_format: str = "<t{t}>"
    soft_ce_std: float = 1.0  # sigma of the smoothed time-token loss, in token-index units (spec training.md §6)
    time_token_ids: tuple[int, ...] = ()  # their ids, as the reference saves them (informational)
    chat_template: str | None = None
    image_mean: tuple[float, float, float] = (0.5, 0.5, 0.5)
    image_std: tuple[float, float, float] = (0.5, 0.5, 0.5)
    mm_hidden_size: int = field(init=False)

    def __post_init__(self) -> None:
        if self.image_aspect_ratio not in IMAGE_ASPECT_RATIOS:
            # The reference falls through to a plain resize for any other value.
            logger.warning("image_aspect_ratio %r is not special-cased; images are resized to one tile",
                           self.image_aspect_ratio)
            self.image_aspect_ratio = "plain"
        if self.image_aspect_ratio == "dynamic_s2":
            if not self.s2_scales:
                raise ConfigError("image_aspect_ratio 'dynamic_s2' needs s2_scales")
            self.s2_scales = tuple(int(s) for s in self.s2_scales)
            if self.s2_scales[0] != self.vision.image_size or any(s % self.vision.image_size for s in self.s2_scales):
                raise ConfigError(f"s2_scales {self.s2_scales} must be multiples of the tile size "
                                  f"{self.vision.image_size}, starting with it")
        else:
            self.s2_scales = None
        if not 1 <= self.min_tiles <= self.max_tiles:
            raise ConfigError(f"need 1 <= min_tiles <= max_tiles, got {self.min_tiles}, {self.max_tiles}")
        if self.num_video_frames < 1:
            raise ConfigError(f"num_video_frames must be >= 1, got {self.num_video_frames}")
        self.mm_hidden_size = self.vision.hidden_size * (len(self.s2_scales) if self.s2_scales else 1)

    @property
    def is_dynamic_s2(self) -> bool:
        return self.image_aspect_ratio == "dynamic_s2"

    def with_overrides(self, **changes: Any) -> "NVILAConfig":
        """A copy with some preprocessing fields changed (e.g. ``max_tiles``, ``num_video_frames``)."""
        init = {f.name: getattr(self, f.name) for f in fields(self) if f.init}
        unknown = set(changes) - set(init)
        if unknown:
            raise ConfigError(f"unknown config fields {sorted(unknown)}; valid: {sorted(init)}")
        init.update(changes)
        return NVILAConfig(**init)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def to_published(self) -> dict[str, dict]:
        """The published JSON files: {"config.json", "llm", "vision_tower", "mm_projector",
        "preprocessor"} -> dict. ``from_dict`` of these gives back an equal config."""
        llm = {"architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", **asdict(self.llm),
               "bos_token_id": None, "eos_token_id": None, "use_sliding_window": False, "sliding_window": None,
               "max_window_layers": self.llm.num_hidden_layers, "rope_scaling": None, "attention_dropout": 0.0}
        vision = {"architectures": ["SiglipVisionModel"], "model_type": "siglip_vision_model", "vision_use_head": False,
                  **{k: v for k, v in asdict(self.vision).items() if k not in ("select_layer", "select_feature")}}
        projector = {"architectures": ["MultimodalProjector"], "model_type": "v2l_projector",
                     "mm_projector_type": self.projector_type}
        s2 = self.s2_scales is not None
        top = {
            "architectures": ["LlavaLlamaModel"], "model_type": "llava_llama", "chat_template": self.chat_template,
            "image_aspect_ratio": self.image_aspect_ratio, "dynamic_s2": s2, "s2": False,
            "s2_scales": ",".join(str(v) for v in self.s2_scales) if s2 else None,
            "s2_max_split_size": self.vision.image_size if s2 else None,
            "s2_resize_output_to_scale_idx": self.s2_resize_output_to_scale_idx,
            "max_tiles": self.max_tiles, "min_tiles": self.min_tiles, "video_max_tiles": self.video_max_tiles,
            "num_video_frames": self.num_video_frames, "fps": self.fps,
            "mm_hidden_size": self.mm_hidden_size, "hidden_size": self.llm.hidden_size,
            "mm_vision_select_layer": self.vision.select_layer, "mm_vision_select_feature": self.vision.select_feature,
            "num_time_tokens": self.num_time_tokens, "time_token_format": self.time_token_format,
            **({"time_token_ids": list(self.time_token_ids), "soft_ce_std": self.soft_ce_std}
               if self.num_time_tokens else {}),
            "image_encoder": json.dumps({"_target_": "llava.model.encoders.BasicImageEncoder",
                                         **asdict(self.image_encoder)}),
            "video_encoder": json.dumps({"_target_": "llava.model.encoders." + next(
                k for k, v in VIDEO_ENCODERS.items() if v == self.video_encoder.kind),
                **{k: v for k, v in asdict(self.video_encoder).items() if k != "kind"}}),
            "llm_cfg": llm, "vision_tower_cfg": vision, "mm_projector_cfg": projector,
        }
        preprocessor = {"image_processor_type": "SiglipImageProcessor", "do_resize": True, "do_rescale": True,
                        "do_normalize": True, "resample": 3, "rescale_factor": 1 / 255,
                        "image_mean": list(self.image_mean), "image_std": list(self.image_std),
                        "size": {"height": self.vision.image_size, "width": self.vision.image_size}}
        return {"config.json": top, "llm": llm, "vision_tower": vision, "mm_projector": projector,
                "preprocessor": preprocessor}

    def to_hf(self, image_token_id: int, video_token_id: int) -> dict[str, dict]:
        """The -hf layout's JSON files: {"config.json", "processor_config.json"} -> dict.

        ``config.json`` holds what SGLang's loaders read (``model_type``, ``text_config``,
        ``vision_config``, ``image_token_id``, ``video_token_id``) plus the preprocessing fields of the
        vila layout's top-level config under the same names (extra keys, which those loaders ignore),
        so that ``from_hf`` gives back an equal config. ``mm_hidden_size`` is not stored: the reader
        derives it (from ``s2_scales`` here, from the projector weights for other writers).
        """
        model_type = next((t for t, types in HF_MODEL_TYPES.items() if self.projector_type in types), None)
        if model_type is None:
            valid = ", ".join(p for types in HF_MODEL_TYPES.values() for p in types)
            raise ConfigError(f"the hf layout has no model_type for mm_projector_type {self.projector_type!r}; "
                              f"valid: {valid}")
        published = self.to_published()
        extras = {k: v for k, v in published["config.json"].items() if k not in _NOT_HF_EXTRAS}
        top = {"architectures": [HF_ARCHITECTURES[model_type]], "model_type": model_type,
               "text_config": published["llm"], "vision_config": published["vision_tower"],
               "image_token_id": image_token_id, "video_token_id": video_token_id,
               "mm_projector_type": self.projector_type, **extras}
        processor = {"processor_class": "NVILAProcessor", "image_mean": list(self.image_mean),
                     "image_std": list(self.image_std)}
        return {"config.json": top, "processor_config.json": processor}

    # ------------------------------------------------------------------------------------ loading
    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, *, local_files_only: bool = False) -> "NVILAConfig":
        """Read a checkpoint directory (either layout of ``nvila.layouts``), a bare top-level
        ``config.json``, or a Hub id ``ORG/NAME[@REVISION]`` (its configs and tokenizer files only are
        fetched, see ``checkpoint.resolve_checkpoint``)."""
        from .checkpoint import resolve_checkpoint  # checkpoint.py imports this module
        from .layouts import layout_of

        path = resolve_checkpoint(path, weights=False, local_files_only=local_files_only)
        cfg_file = path / "config.json" if path.is_dir() else path
        return layout_of(_read_json(cfg_file), cfg_file.parent).read_config(path)

    @classmethod
    def from_vila(cls, path: Path) -> "NVILAConfig":
        """Read a vila-layout checkpoint directory, or its bare top-level ``config.json``."""
        root = path if path.is_dir() else path.parent
        cfg_file = path / "config.json" if path.is_dir() else path
        top = _read_json(cfg_file)
        llm_raw = _component(root, "llm", top.get("llm_cfg"), path.is_dir())
        vis_raw = _component(root, "vision_tower", top.get("vision_tower_cfg"), path.is_dir())
        proj_raw = _component(root, "mm_projector", top.get("mm_projector_cfg"), path.is_dir())
        pre_raw = {}
        if path.is_dir() and (root / "vision_tower" / "preprocessor_config.json").is_file():
            pre_raw = _read_json(root / "vision_tower" / "preprocessor_config.json")
        tok_max_len = None
        if path.is_dir() and (root / "llm" / "tokenizer_config.json").is_file():
            tok_max_len = _read_json(root / "llm" / "tokenizer_config.json").get("model_max_length")
        return cls.from_dict(top, llm_raw, vis_raw, proj_raw, pre_raw, tok_max_len)

    @classmethod
    def from_hf(cls, top: dict, pre_raw: dict | None = None, tokenizer_max_length: int | None = None,
                mm_hidden_size: int | None = None) -> "NVILAConfig":
        """Translate an -hf root ``config.json`` (``model_type`` a key of ``HF_MODEL_TYPES``).

        Fields the vila layout keeps at the top level are read under the same names when present
        (``to_hf`` writes them). A config without them (NVIDIA's -hf uploads) gets the model type's
        projector and a tiling derived from ``mm_hidden_size``, the projector's input width measured
        on its weights: n = mm_hidden_size / vision hidden scales; n > 1 is dynamic S2 at scales
        ``image_size * (1..n)`` (SGLang nvila.py: 3456 = 3 x 1152 with scales 448, 896, 1344),
        n = 1 dynamic tiling without S2 (SGLang nvila_lite.py: 1152, no S2 merge).

        Args:
            top: the parsed root ``config.json``.
            pre_raw: ``processor_config.json`` (``image_mean`` / ``image_std`` if present).
            tokenizer_max_length: the tokenizer's ``model_max_length``, used if ``text_config`` has none.
            mm_hidden_size: the projector input width from the weights; checked against the config.
        """
        model_type = top.get("model_type")
        if model_type not in HF_MODEL_TYPES:
            raise ConfigError(f"unsupported hf model_type {model_type!r}; valid: {', '.join(HF_MODEL_TYPES)}")
        llm_raw, vis_raw = top.get("text_config"), top.get("vision_config")
        if not isinstance(llm_raw, dict) or not isinstance(vis_raw, dict):
            raise ConfigError("an hf config needs text_config and vision_config objects")
        vila_top = {k: v for k, v in top.items() if k not in _HF_ONLY}
        vila_top["model_type"] = "vila"
        projector = vila_top.setdefault("mm_projector_type", HF_MODEL_TYPES[model_type][0])
        if projector not in HF_MODEL_TYPES[model_type]:
            raise ConfigError(f"mm_projector_type {projector!r} does not belong to model_type {model_type!r}; "
                              f"valid: {', '.join(HF_MODEL_TYPES[model_type])}")
        if "image_aspect_ratio" not in top:
            if mm_hidden_size is None:
                raise ConfigError("the hf config stores no tiling; deriving it needs the projector weights, "
                                  "which are not available")
            width = int(vis_raw.get("hidden_size", VisionConfig.hidden_size))
            n, rest = divmod(mm_hidden_size, width)
            if rest or n < 1:
                raise ConfigError(f"the projector input width {mm_hidden_size} is not a multiple of the vision "
                                  f"hidden size {width}")
            size = int(vis_raw.get("image_size", VisionConfig.image_size))
            vila_top["image_aspect_ratio"] = "dynamic_s2" if n > 1 else "dynamic"
            vila_top["s2_scales"] = [size * (i + 1) for i in range(n)] if n > 1 else None
        cfg = cls.from_dict(vila_top, llm_raw, vis_raw, None, pre_raw, tokenizer_max_length)
        if mm_hidden_size is not None and mm_hidden_size != cfg.mm_hidden_size:
            raise ConfigError(f"the projector weights take width {mm_hidden_size}, the config describes "
                              f"{cfg.mm_hidden_size} (vision hidden x S2 scales)")
        return cfg

    @classmethod
    def from_dict(cls, top: dict, llm_raw: dict | None = None, vis_raw: dict | None = None,
                  proj_raw: dict | None = None, pre_raw: dict | None = None,
                  tokenizer_max_length: int | None = None) -> "NVILAConfig":
        model_type = top.get("model_type", "llava_llama")
        if model_type not in ("llava_llama", "vila"):
            raise ConfigError(f"unsupported model_type {model_type!r}; this loader reads the published "
                              f"NVILA layout (model_type 'llava_llama' or 'vila')")
        llm = _llm_config(top, llm_raw, tokenizer_max_length)
        vision = _vision_config(top, vis_raw or {})
        proj_raw = proj_raw or {}
        projector_type = proj_raw.get("mm_projector_type") or top.get("mm_projector_type")
        if projector_type is None:
            raise ConfigError("the config names no mm_projector_type (mm_projector_cfg)")
        dynamic_s2 = bool(top.get("dynamic_s2")) or top.get("image_aspect_ratio") == "dynamic_s2"
        aspect = top.get("image_aspect_ratio") or "plain"
        if dynamic_s2:
            aspect = "dynamic_s2"
        if top.get("s2") and not dynamic_s2:
            raise ConfigError("non-dynamic S2 (config 's2': true) is not used by any published NVILA "
                              "checkpoint and is not supported")
        scales = top.get("s2_scales")
        if isinstance(scales, str):
            scales = [int(s) for s in scales.split(",")]
        pre_raw = pre_raw or {}
        cfg = cls(
            llm=llm,
            vision=vision,
            projector_type=projector_type,
            image_aspect_ratio=aspect,
            s2_scales=tuple(scales) if scales else None,
            s2_resize_output_to_scale_idx=int(top.get("s2_resize_output_to_scale_idx", -1) if dynamic_s2 else 0),
            max_tiles=int(top.get("max_tiles") or 12),
            min_tiles=int(top.get("min_tiles") or 1),
            video_max_tiles=int(top.get("video_max_tiles") or 1),
            num_video_frames=int(top.get("num_video_frames") or 8),
            fps=float(top.get("fps") or 0.0),
            image_encoder=_image_encoder(top.get("image_encoder")),
            video_encoder=_video_encoder(top.get("video_encoder")),
            num_time_tokens=int(top.get("num_time_tokens") or 0),
            time_token_format=top.get("time_token_format") or "<t{t}>",
            soft_ce_std=float(top.get("soft_ce_std") or 1.0),
            time_token_ids=tuple(top.get("time_token_ids") or ()),
            chat_template=top.get("chat_template"),
            image_mean=tuple(pre_raw.get("image_mean", (0.5, 0.5, 0.5))),
            image_std=tuple(pre_raw.get("image_std", (0.5, 0.5, 0.5))),
        )
        stored_mm = top.get("mm_hidden_size")
        if stored_mm is not None and int(stored_mm) != cfg.mm_hidden_size:
            logger.info("config mm_hidden_size %s recomputed as %s (vision hidden x scales), as the reference does",
                        stored_mm, cfg.mm_hidden_size)
        return cfg


def _read_json(path: Path) -> dict:
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such file") from None
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ConfigError(f"{path}: not a readable JSON config ({e})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a JSON object")
    return data


def _component(root: Path, name: str, embedded: Any, is_dir: bool) -> dict | None:
    """A component config: its own ``<root>/<name>/config.json`` if present, else the embedded copy."""
    own = root / name / "config.json"
    if is_dir and own.is_file():
        return _read_json(own)
    if isinstance(embedded, str):
        embedded = json.loads(embedded)
    return embedded if isinstance(embedded, dict) else None


def _llm_config(top: dict, raw: dict | None, tokenizer_max_length: int | None) -> LLMConfig:
    if raw is None:
        hidden = top.get("hidden_size")
        if hidden not in LLM_PRESETS:
            raise ConfigError(f"the config has no llm_cfg and hidden_size {hidden!r} matches no known "
                              f"Qwen2.5 base; known hidden sizes: {sorted(LLM_PRESETS)}")
        logger.warning("config has no llm_cfg; assuming the Qwen2.5 base with hidden size %s", hidden)
        return replace(LLM_PRESETS[hidden])
    model_type = raw.get("model_type", "qwen2")
    if model_type != "qwen2":
        raise ConfigError(f"unsupported LLM model_type {model_type!r}; valid: qwen2")
    base = LLM_PRESETS.get(raw.get("hidden_size"), LLMConfig())
    values = {f.name: raw[f.name] for f in fields(LLMConfig) if f.name in raw and raw[f.name] is not None}
    if "model_max_length" not in values:
        values["model_max_length"] = raw.get("tokenizer_model_max_length") or tokenizer_max_length or 8192
    if raw.get("use_sliding_window"):
        raise ConfigError("sliding-window attention is not used by NVILA and not supported")
    return replace(base, **values)


def _vision_config(top: dict, raw: dict) -> VisionConfig:
    model_type = raw.get("model_type", "siglip_vision_model")
    if model_type != "siglip_vision_model":
        raise ConfigError(f"unsupported vision tower model_type {model_type!r}; valid: siglip_vision_model")
    if raw.get("vision_use_head"):
        logger.info("vision_use_head is set; the pooling head is not used by NVILA features")
    values = {f.name: raw[f.name] for f in fields(VisionConfig) if f.name in raw}
    values["select_layer"] = int(top.get("mm_vision_select_layer", -2))
    values["select_feature"] = top.get("mm_vision_select_feature", "cls_patch")
    return VisionConfig(**values)


def _encoder_spec(raw: Any) -> dict | None:
    if raw is None:
        return None
    if isinstance(raw, str):
        try:
            raw = json.loads(raw)
        except json.JSONDecodeError:
            raise ConfigError(f"encoder config {raw!r} is not valid JSON") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"encoder config must be an object, got {type(raw).__name__}")
    return raw


def _image_encoder(raw: Any) -> ImageEncoderConfig:
    spec = _encoder_spec(raw)
    if spec is None:
        return ImageEncoderConfig()
    target = spec.get("_target_", "BasicImageEncoder").rsplit(".", 1)[-1]
    if target not in IMAGE_ENCODERS:
        raise ConfigError(f"unknown image encoder {target!r}; valid: {sorted(IMAGE_ENCODERS)}")
    return ImageEncoderConfig(start_tokens=spec.get("start_tokens"), end_tokens=spec.get("end_tokens", "\n"))


def _video_encoder(raw: Any) -> VideoEncoderConfig:
    spec = _encoder_spec(raw)
    if spec is None:
        return VideoEncoderConfig()
    target = spec.get("_target_", "BasicVideoEncoder").rsplit(".", 1)[-1]
    if target not in VIDEO_ENCODERS:
        raise ConfigError(f"unknown video encoder {target!r}; valid: {sorted(VIDEO_ENCODERS)}")
    kind = VIDEO_ENCODERS[target]
    pools = [tuple(int(v) for v in p) for p in spec.get("pool_sizes", [])]
    if kind == "tsp" and (not pools or any(len(p) != 3 or min(p) < 1 for p in pools)):
        raise ConfigError(f"TSP video encoder needs pool_sizes of positive (frames, rows, cols), got {pools}")
    return VideoEncoderConfig(kind=kind, pool_sizes=pools, start_tokens=spec.get("start_tokens"),
                              end_tokens=spec.get("end_tokens", "\n"), sep_tokens=spec.get("sep_tokens"))


@dataclass(frozen=True)
class TokenIds:
    """Special token ids of a checkpoint, derived from its tokenizer at load time (never hard-coded)."""

    image: int
    video: int
    pad: int
    stop: tuple[int, ...]
    newline: tuple[int, ...]
    vocab_size: int
