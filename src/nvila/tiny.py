"""Small NVILA checkpoints built from scratch: a locally trained tokenizer and tiny random models.

Nothing here downloads anything. The tokenizer is a byte-level BPE trained with ``tokenizers`` on
text the caller provides, with the NVILA special tokens and VILA's qwen2 chat template. The tiny
models use the real geometry (448 px tiles, patch 14) and the real architecture of each family at
toy widths, with random weights; ``build_tiny_checkpoint`` writes them in the published layout.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from dataclasses import replace
from pathlib import Path

import torch

from .checkpoint import CHAT_TEMPLATES, save_pretrained, token_ids
from .config import LLMConfig, NVILAConfig, VideoEncoderConfig, VisionConfig

SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "[BOS]", "[PAD]", "<vila/sentinel>", "<image>",
                  "<vila/video>"]

DEFAULT_CORPUS = [
    "The image shows a red circle, a blue square and a green triangle on a white background.",
    "In this video a small ball moves from the left to the right and changes colour.",
    "What is written in this picture? Describe the image in detail. What happens in this video?",
    "There are three shapes. The largest shape is the square. The text says hello world.",
    "Count the objects, name the colours, and tell which event happened first and which came last.",
]

# Tiny families: the same three as the golden set (nvila / nvila-lite / nvila-video).
_VISION = VisionConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4)
_LLM = LLMConfig(vocab_size=0, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, max_position_embeddings=32768, model_max_length=8192)
TINY_FAMILIES = {
    "nvila": dict(image_aspect_ratio="dynamic_s2", projector_type="mlp_downsample", s2_scales=(448, 896, 1344)),
    "nvila-lite": dict(image_aspect_ratio="dynamic", projector_type="mlp_downsample_3x3_fix", s2_scales=None),
    "nvila-video": dict(image_aspect_ratio="resize", projector_type="mlp_downsample_2x2_fix", s2_scales=None,
                        num_video_frames=16, video_encoder=VideoEncoderConfig(kind="tsp", pool_sizes=[(8, 1, 1)])),
}


def build_tokenizer(texts: Iterable[str] = DEFAULT_CORPUS, vocab_size: int = 1000, *, repeat: int = 20):
    """A byte-level BPE tokenizer with NVILA's special tokens (eos ``<|im_end|>``, pad ``[PAD]``).

    Args:
        texts: training text.
        vocab_size: target vocabulary size (specials and the 256 byte symbols included).
        repeat: how many times the text is seen (small corpora need a few passes for merges).
    Returns:
        A transformers fast tokenizer, chat template set.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    texts = list(texts)
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    bpe.train_from_iterator((t for _ in range(repeat) for t in texts), trainer)
    bpe.add_special_tokens(SPECIAL_TOKENS)
    tok = PreTrainedTokenizerFast(tokenizer_object=bpe, bos_token="[BOS]", eos_token="<|im_end|>",
                                  pad_token="[PAD]", model_max_length=8192, padding_side="right")
    tok.chat_template = CHAT_TEMPLATES["qwen2"]
    return tok


def tiny_config(family: str, vocab_size: int) -> NVILAConfig:
    """The tiny config of ``family`` (a key of ``TINY_FAMILIES``)."""
    if family not in TINY_FAMILIES:
        raise ValueError(f"unknown tiny family {family!r}; valid: {sorted(TINY_FAMILIES)}")
    return NVILAConfig(llm=replace(_LLM, vocab_size=vocab_size), vision=replace(_VISION), **TINY_FAMILIES[family])


def build_tiny_checkpoint(out_dir: str | os.PathLike, family: str = "nvila", *, seed: int = 0,
                          tokenizer=None) -> Path:
    """Write a randomly initialised tiny checkpoint of ``family`` in the published layout.

    Args:
        out_dir: destination (replaced if it exists).
        family: "nvila" | "nvila-lite" | "nvila-video".
        seed: weight initialisation seed.
        tokenizer: a tokenizer with the NVILA specials; default ``build_tokenizer()``.
    Returns:
        The checkpoint path.
    """
    from .model import NVILAForConditionalGeneration

    tok = tokenizer if tokenizer is not None else build_tokenizer()
    config = tiny_config(family, len(tok))
    ids = token_ids(tok, CHAT_TEMPLATES["qwen2"])
    with torch.random.fork_rng(devices=[]):  # seed locally, leave the caller's RNG untouched
        torch.manual_seed(seed)
        model = NVILAForConditionalGeneration(config, ids)
    return save_pretrained(model, tok, out_dir, metadata={"nvila_weights": "random"})


# SynthVILA: the bundled small model (spec training.md §7.2/7.4 sizes, geometry chosen for a 2-core
# CPU). 24-px tiles with 4-px patches give a 6x6 patch grid, which 2x2 and 3x3 space-to-channel both
# divide; Dynamic-S2 over (24, 72) sees 72-px canvases at native resolution (1 + 9 tiles), three
# times the single-tile resolution in both axes.
SYNTH_TILE, SYNTH_PATCH, SYNTH_SCALES = 24, 4, (24, 72)
SYNTH_VISION = VisionConfig(hidden_size=128, intermediate_size=512, num_hidden_layers=4, num_attention_heads=4,
                            image_size=SYNTH_TILE, patch_size=SYNTH_PATCH, select_layer=-1)
SYNTH_LLM = LLMConfig(vocab_size=0, hidden_size=256, intermediate_size=704, num_hidden_layers=4,
                      num_attention_heads=4, num_key_value_heads=2, rope_theta=10_000.0,
                      max_position_embeddings=4096, model_max_length=2048)


def synthvila_config(vocab_size: int, *, dynamic_s2: bool = True, projector_type: str = "mlp_downsample",
                     num_video_frames: int = 16, temporal_pool: int = 4) -> NVILAConfig:
    """The SynthVILA model config: SigLIP-style ViT, spatial-to-channel projector, Qwen2-style LLM.

    Args:
        vocab_size: the tokenizer's length.
        dynamic_s2: Dynamic-S2 over ``SYNTH_SCALES``; False gives a single low-res tile per image.
        projector_type: ``mlp_downsample`` (2x2) or ``mlp_downsample_3x3_fix`` (3x3).
        num_video_frames: frames sampled per video.
        temporal_pool: frames averaged per group (TSP); 1 keeps every frame.
    """
    video = (VideoEncoderConfig(kind="tsp", pool_sizes=[(temporal_pool, 1, 1)]) if temporal_pool > 1
             else VideoEncoderConfig())
    return NVILAConfig(llm=replace(SYNTH_LLM, vocab_size=vocab_size), vision=replace(SYNTH_VISION),
                       projector_type=projector_type, image_aspect_ratio="dynamic_s2" if dynamic_s2 else "resize",
                       s2_scales=SYNTH_SCALES if dynamic_s2 else None, max_tiles=12,
                       num_video_frames=num_video_frames, video_encoder=video)
