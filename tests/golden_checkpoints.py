"""The tiny checkpoints of the golden set, rebuilt from their recipe with numpy + safetensors only.

Contract: ``build_checkpoint(variant, out_dir, tokenizer_dir)`` writes, file for file and byte for
byte, the checkpoint whose sha256s the reference recipe recorded in ``assets/golden/checkpoints.json``
(tests/parity/test_golden_checkpoints.py checks every digest). The expected values of the golden
cases were computed on exactly these weights, so any change here breaks parity on purpose.

Layout (published NVILA, format ``llava_llama``)::

    config.json          top level; llm_cfg / vision_tower_cfg / mm_projector_cfg copy the three below
    llm/                 Qwen2ForCausalLM: config, generation_config, model.safetensors, the golden
                         tokenizer, tokenizer_config.json with VILA's qwen2 chat template
    vision_tower/        SiglipVisionModel: config, model.safetensors ("vision_model.*"), preprocessor
    mm_projector/        config, model.safetensors ("layers.<i>.weight|bias")

Geometry is real (448 px tiles, patch 14 -> 32x32 patches), widths are tiny: SigLIP 3 layers x 64
(4 heads, MLP 128), Qwen2 2 layers x 64 (4 heads, 2 KV heads, MLP 128), untied lm_head, vocabulary
151651 = len(tokenizer).

Weights (float32): one ``numpy.random.default_rng(seed)`` per checkpoint draws the components in the
order llm, vision_tower, mm_projector, and inside a component the tensors in sorted key order, each
``z = rng.standard_normal(shape, dtype=float32)`` scaled by ``init_tensor``.
"""

from __future__ import annotations

import hashlib
import json
import lzma
import math
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from safetensors.numpy import save_file

from nvila_testing import GOLDEN

DIGESTS = GOLDEN / "checkpoints.json"
TOKENIZER_XZ = GOLDEN / "tokenizer"  # <name>.xz for each file of the golden Qwen2 tokenizer

VOCAB, MAX_LEN, IMAGE, PATCH = 151651, 8192, 448, 14
LLM_WIDTH, LLM_MLP, LLM_LAYERS, LLM_HEADS, LLM_KV_HEADS = 64, 128, 2, 4, 2
VIT_WIDTH, VIT_MLP, VIT_LAYERS, VIT_HEADS = 64, 128, 3, 4
TRANSFORMERS = "4.46.0"  # the version the configs claim

# VILA's qwen2 template as the published checkpoints store it in llm/tokenizer_config.json.
CHAT_TEMPLATE = (
    "{% if messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\\nYou are a helpful assistant<|im_end|>\\n' }}"
    "{% endif %}"
    "{% for message in messages if message['content'] is not none %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}"
    "{{ '<|im_start|>assistant\\n' }}"
    "{% endif %}"
)


@dataclass(frozen=True)
class Variant:
    """What differs between the three golden checkpoints; ``s2_scales`` set means dynamic S2."""

    seed: int
    image_aspect_ratio: str
    projector: str
    s2_scales: str | None = None
    video_encoder: dict | None = None
    num_video_frames: int = 8


VARIANTS = {
    "nvila": Variant(0, "dynamic_s2", "mlp_downsample", s2_scales="448,896,1344"),
    "nvila-lite": Variant(1, "dynamic", "mlp_downsample_3x3_fix"),
    "nvila-video": Variant(2, "resize", "mlp_downsample_2x2_fix", num_video_frames=16,
                           video_encoder={"_target_": "llava.model.encoders.TSPVideoEncoder",
                                          "pool_sizes": [[8, 1, 1]]}),
}


# ----------------------------------------------------------------------------------- shapes
def llm_shapes() -> dict[str, tuple[int, ...]]:
    h, kv = LLM_WIDTH, LLM_KV_HEADS * LLM_WIDTH // LLM_HEADS
    shapes = {"model.embed_tokens.weight": (VOCAB, h), "model.norm.weight": (h,), "lm_head.weight": (VOCAB, h)}
    for i in range(LLM_LAYERS):
        p = f"model.layers.{i}."
        shapes |= {p + "input_layernorm.weight": (h,), p + "post_attention_layernorm.weight": (h,),
                   p + "self_attn.o_proj.weight": (h, h), p + "mlp.gate_proj.weight": (LLM_MLP, h),
                   p + "mlp.up_proj.weight": (LLM_MLP, h), p + "mlp.down_proj.weight": (h, LLM_MLP)}
        for proj, d_out in (("q_proj", h), ("k_proj", kv), ("v_proj", kv)):
            shapes |= {p + f"self_attn.{proj}.weight": (d_out, h), p + f"self_attn.{proj}.bias": (d_out,)}
    return shapes


def vision_shapes() -> dict[str, tuple[int, ...]]:
    c, e = VIT_WIDTH, "vision_model.embeddings."
    shapes = {e + "patch_embedding.weight": (c, 3, PATCH, PATCH), e + "patch_embedding.bias": (c,),
              e + "position_embedding.weight": ((IMAGE // PATCH) ** 2, c),
              "vision_model.post_layernorm.weight": (c,), "vision_model.post_layernorm.bias": (c,)}
    for i in range(VIT_LAYERS):
        p = f"vision_model.encoder.layers.{i}."
        layers = {"layer_norm1": (c,), "layer_norm2": (c,), "self_attn.q_proj": (c, c), "self_attn.k_proj": (c, c),
                  "self_attn.v_proj": (c, c), "self_attn.out_proj": (c, c), "mlp.fc1": (VIT_MLP, c),
                  "mlp.fc2": (c, VIT_MLP)}
        for name, shape in layers.items():
            shapes |= {p + name + ".weight": shape, p + name + ".bias": shape[:1]}
    return shapes


def projector_shapes(projector: str, mm_hidden: int) -> dict[str, tuple[int, ...]]:
    """Parameters of the projector's nn.Sequential, keyed by layer index (activations have none).

    2x2 types: 0 DownSample | 1 LayerNorm(4C) | 2 Linear(4C, D) | 3 GELU | 4 Linear(D, D).
    3x3 type:  0 DownSample | 1 LN(9C) | 2 Linear(9C, 3C) | 3 GELU | 4 LN(3C) | 5 Linear(3C, D) | 6 GELU
               | 7 Linear(D, D).
    """
    c, d = mm_hidden, LLM_WIDTH
    layers = {  # index -> (d_in, d_out) of a Linear, or (d,) of a LayerNorm
        "mlp_downsample": {1: (4 * c,), 2: (4 * c, d), 4: (d, d)},
        "mlp_downsample_2x2_fix": {1: (4 * c,), 2: (4 * c, d), 4: (d, d)},
        "mlp_downsample_3x3_fix": {1: (9 * c,), 2: (9 * c, 3 * c), 4: (3 * c,), 5: (3 * c, d), 7: (d, d)},
    }[projector]
    shapes = {}
    for i, dims in layers.items():
        shapes[f"layers.{i}.weight"] = dims if len(dims) == 1 else dims[::-1]
        shapes[f"layers.{i}.bias"] = dims[-1:]
    return shapes


# ----------------------------------------------------------------------------------- weights
def init_tensor(rng: np.random.Generator, key: str, shape: tuple[int, ...], norm: bool) -> np.ndarray:
    """One float32 tensor: ``z ~ N(0, 1)`` drawn from ``rng``, then scaled by the rule for its key.

    ``norm``: the tensor belongs to an RMSNorm / LayerNorm (its weight is 1-D). Every scale is cast to
    float32 before the multiply (and the "1 +" is a float32 add), which the recorded bytes depend on.
    """
    z = rng.standard_normal(shape, dtype=np.float32)
    if key.endswith(".bias"):
        return z * np.float32(0.1 if norm else 0.02)
    if norm:
        return np.float32(1.0) + z * np.float32(0.1)
    if key.endswith("embed_tokens.weight"):
        return z
    if key.endswith("position_embedding.weight"):
        return z * np.float32(0.5)
    gain = 3.0 if key.endswith(("q_proj.weight", "k_proj.weight")) else 1.0  # sharper attention
    return z * np.float32(gain / math.sqrt(math.prod(shape[1:])))


def init_component(rng: np.random.Generator, shapes: dict[str, tuple[int, ...]]) -> dict[str, np.ndarray]:
    """The tensors of one component, drawn in sorted key order."""
    return {key: init_tensor(rng, key, shapes[key], norm=len(shapes[key.rsplit(".", 1)[0] + ".weight"]) == 1)
            for key in sorted(shapes)}


# ----------------------------------------------------------------------------------- configs
def component_configs(v: Variant) -> dict[str, dict]:
    """{path: JSON object} of the component configs: llm, vision tower, projector."""
    llm = {
        "architectures": ["Qwen2ForCausalLM"], "attention_dropout": 0.0, "bos_token_id": 151643,
        "eos_token_id": 151645, "hidden_act": "silu", "hidden_size": LLM_WIDTH, "initializer_range": 0.02,
        "intermediate_size": LLM_MLP, "max_position_embeddings": 32768, "max_window_layers": LLM_LAYERS,
        "model_max_length": MAX_LEN, "model_type": "qwen2", "num_attention_heads": LLM_HEADS,
        "num_hidden_layers": LLM_LAYERS, "num_key_value_heads": LLM_KV_HEADS, "rms_norm_eps": 1e-06,
        "rope_scaling": None, "rope_theta": 1000000.0, "sliding_window": None, "tie_word_embeddings": False,
        "tokenizer_model_max_length": MAX_LEN, "tokenizer_padding_side": "right", "torch_dtype": "float32",
        "transformers_version": TRANSFORMERS, "use_cache": True, "use_sliding_window": False, "vocab_size": VOCAB,
    }
    vision = {
        "architectures": ["SiglipVisionModel"], "attention_dropout": 0.0, "hidden_act": "gelu_pytorch_tanh",
        "hidden_size": VIT_WIDTH, "image_size": IMAGE, "intermediate_size": VIT_MLP, "layer_norm_eps": 1e-06,
        "model_type": "siglip_vision_model", "num_attention_heads": VIT_HEADS, "num_channels": 3,
        "num_hidden_layers": VIT_LAYERS, "patch_size": PATCH, "torch_dtype": "float32",
        "transformers_version": TRANSFORMERS, "vision_use_head": False,
    }
    projector = {"architectures": ["MultimodalProjector"], "mm_projector_type": v.projector,
                 "model_type": "v2l_projector", "torch_dtype": "float32", "transformers_version": TRANSFORMERS}
    return {"llm/config.json": llm, "vision_tower/config.json": vision, "mm_projector/config.json": projector}


def top_config(v: Variant, components: dict[str, dict], mm_hidden: int) -> dict:
    s2 = v.s2_scales is not None
    cfg = {
        "architectures": ["LlavaLlamaModel"], "chat_template": None, "drop_path_rate": 0.0, "dynamic_s2": s2,
        "fps": 0.0, "hidden_size": LLM_WIDTH, "image_aspect_ratio": v.image_aspect_ratio,
        "interpolate_mode": "linear", "llm_cfg": components["llm/config.json"], "max_tiles": 12, "min_tiles": 1,
        "mm_hidden_size": mm_hidden, "mm_projector_cfg": components["mm_projector/config.json"],
        "mm_projector_lr": None, "mm_use_im_patch_token": False, "mm_use_im_start_end": False,
        "mm_vision_select_feature": "cls_patch", "mm_vision_select_layer": -2, "model_dtype": "torch.float32",
        "model_type": "llava_llama", "num_time_tokens": 0, "num_video_frames": v.num_video_frames, "s2": False,
        "s2_max_split_size": IMAGE if s2 else None, "s2_resize_output_to_scale_idx": -1 if s2 else 0,
        "s2_scales": v.s2_scales, "soft_ce_std": 1.0, "time_token_format": "<t{t}>", "time_token_ids": [],
        "transformers_version": TRANSFORMERS, "tune_language_model": True, "tune_mm_projector": True,
        "tune_vision_tower": True, "video_max_tiles": 1, "vision_resolution": -1,
        "vision_tower_cfg": components["vision_tower/config.json"],
    }
    if v.video_encoder is not None:
        cfg["video_encoder"] = json.dumps(v.video_encoder)  # a JSON string, as training writes it
    return cfg


PREPROCESSOR = {
    "do_convert_rgb": None, "do_normalize": True, "do_rescale": True, "do_resize": True,
    "image_mean": [0.5, 0.5, 0.5], "image_processor_type": "SiglipImageProcessor", "image_std": [0.5, 0.5, 0.5],
    "resample": 3, "rescale_factor": 0.00392156862745098, "size": {"height": IMAGE, "width": IMAGE},
}
GENERATION = {"bos_token_id": 151643, "eos_token_id": 151645, "transformers_version": TRANSFORMERS}


def write_json(path: Path, obj: dict) -> None:
    """The recorded JSON format: indent 2, sorted keys, UTF-8 unescaped, LF, trailing newline."""
    path.write_text(json.dumps(obj, indent=2, sort_keys=True, ensure_ascii=False) + "\n", encoding="utf-8",
                    newline="\n")


# ----------------------------------------------------------------------------------- build
def unpack_tokenizer(out_dir: Path) -> Path:
    """Decompress the golden Qwen2 tokenizer (``assets/golden/tokenizer/*.xz``) into ``out_dir``."""
    out_dir.mkdir(parents=True)
    for xz in sorted(TOKENIZER_XZ.glob("*.xz")):
        (out_dir / xz.stem).write_bytes(lzma.decompress(xz.read_bytes()))
    return out_dir


def build_checkpoint(variant: str, out_dir: Path, tokenizer_dir: Path) -> Path:
    """Write golden checkpoint ``variant`` (a key of ``VARIANTS``) into the new directory ``out_dir``.

    Args:
        variant: "nvila", "nvila-lite" or "nvila-video"; its seed is fixed (0, 1, 2).
        out_dir: must not exist yet.
        tokenizer_dir: the golden tokenizer, as ``unpack_tokenizer`` writes it.
    Returns:
        ``out_dir``.
    """
    v = VARIANTS[variant]
    mm_hidden = VIT_WIDTH * (len(v.s2_scales.split(",")) if v.s2_scales else 1)  # S2 concatenates scales
    rng = np.random.default_rng(v.seed)
    shapes_of = {"llm": llm_shapes(), "vision_tower": vision_shapes(),
                 "mm_projector": projector_shapes(v.projector, mm_hidden)}
    for name, shapes in shapes_of.items():  # draw order: llm, vision_tower, mm_projector
        (out_dir / name).mkdir(parents=True)
        save_file(init_component(rng, shapes), out_dir / name / "model.safetensors", metadata={"format": "pt"})

    llm = out_dir / "llm"
    for src in sorted(tokenizer_dir.iterdir()):
        if src.name != "tokenizer_config.json":
            shutil.copyfile(src, llm / src.name)
    tokenizer_config = json.loads((tokenizer_dir / "tokenizer_config.json").read_text(encoding="utf-8"))
    components = component_configs(v)
    for path, obj in {**components, "llm/generation_config.json": GENERATION,
                      "llm/tokenizer_config.json": {**tokenizer_config, "chat_template": CHAT_TEMPLATE},
                      "vision_tower/preprocessor_config.json": PREPROCESSOR,
                      "config.json": top_config(v, components, mm_hidden)}.items():
        write_json(out_dir / path, obj)
    return out_dir


def file_digests(root: Path) -> dict[str, str]:
    """{path relative to ``root`` (POSIX): sha256 hex} of every file under ``root``."""
    return {p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}
