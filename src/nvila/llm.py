"""The Qwen2 language model of NVILA, built from transformers' ``Qwen2ForCausalLM``.

Knows the LLM config and the published key layout of ``llm/model*.safetensors`` (identical to
transformers' Qwen2 keys). It does not know the tokenizer: the vocabulary size it is built with is
decided by the loader (``len(tokenizer)`` after the run-time token additions).

Tensor contract: ``llm(inputs_embeds (B, L, H), attention_mask (B, L), position_ids (B, L))`` ->
logits ``(B, L, V)``; the KV cache is transformers' ``cache=`` argument (a ``Cache``; the
name since transformers 5.24, which deprecates ``past_key_values``).
"""

from __future__ import annotations

import torch
from torch import nn
from transformers import Qwen2Config, Qwen2ForCausalLM
from transformers.models.qwen2.modeling_qwen2 import Qwen2RotaryEmbedding

from .config import LLMConfig


def hf_config(cfg: LLMConfig, vocab_size: int | None = None) -> Qwen2Config:
    """Translate our config into transformers' ``Qwen2Config`` (sdpa attention, no sliding window)."""
    hf = Qwen2Config(
        vocab_size=vocab_size or cfg.vocab_size,
        hidden_size=cfg.hidden_size,
        intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.num_hidden_layers,
        num_attention_heads=cfg.num_attention_heads,
        num_key_value_heads=cfg.num_key_value_heads,
        hidden_act=cfg.hidden_act,
        max_position_embeddings=cfg.max_position_embeddings,
        rms_norm_eps=cfg.rms_norm_eps,
        rope_parameters={"rope_type": "default", "rope_theta": cfg.rope_theta},
        tie_word_embeddings=cfg.tie_word_embeddings,
        use_sliding_window=False,
        attention_dropout=0.0,
    )
    hf._attn_implementation = "sdpa"
    return hf


def build_llm(cfg: LLMConfig, vocab_size: int | None = None) -> Qwen2ForCausalLM:
    """A Qwen2 causal LM with weights uninitialised when built under ``torch.device("meta")``."""
    return Qwen2ForCausalLM(hf_config(cfg, vocab_size))


def fit_vocab_rows(weight: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """Resize an embedding / lm_head matrix (V, H) to ``vocab_size`` rows, as the reference does.

    New rows are the mean of the existing rows (transformers' mean-resizing, without its 1e-9 noise);
    extra rows are dropped.
    """
    rows = weight.shape[0]
    if rows == vocab_size:
        return weight
    if rows > vocab_size:
        return weight[:vocab_size]
    mean = weight.float().mean(dim=0, keepdim=True).to(weight.dtype)
    return torch.cat([weight, mean.expand(vocab_size - rows, -1)], dim=0)


def reset_llm_buffers(llm: Qwen2ForCausalLM, device: torch.device | str) -> None:
    """Recompute the non-persistent RoPE buffers (in float32) after ``to_empty``, and re-tie weights."""
    rotary: Qwen2RotaryEmbedding = llm.model.rotary_emb
    with torch.device(device):
        llm.model.rotary_emb = Qwen2RotaryEmbedding(rotary.config)
    if llm.config.tie_word_embeddings:
        llm.lm_head.weight = llm.model.embed_tokens.weight


def embed_tokens(llm: Qwen2ForCausalLM) -> nn.Embedding:
    return llm.model.embed_tokens
