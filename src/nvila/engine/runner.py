"""Prefill and decode steps of the Qwen2 LLM over a preallocated KV cache.

The runner knows only embeddings, ids and positions. It reuses the LLM's own modules (projections,
norms, MLP, rotary tables) and owns only the attention over its static cache:

* ``prefill(slot, embeds)``: one request's prompt (1, L, H), positions 0..L-1, writes K/V of the slot;
* ``decode(tokens, positions, length)``: one new token for each of the first B slots (continuous
  batching keeps the active requests in slots 0..B-1), writes K/V at ``positions``.

Cache layout per layer: (slots, kv_heads, max_len, head_dim); slot b holds request b's tokens at
their positions, so a row's valid keys are ``[0, position]``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from transformers.models.qwen2.modeling_qwen2 import apply_rotary_pos_emb


class KVCache(nn.Module):
    """Keys and values of every layer: (layers, slots, kv_heads, max_len, head_dim)."""

    def __init__(self, layers: int, slots: int, kv_heads: int, max_len: int, head_dim: int,
                 dtype: torch.dtype, device: torch.device | str):
        super().__init__()
        shape = (layers, slots, kv_heads, max_len, head_dim)
        self.register_buffer("k", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        self.register_buffer("v", torch.zeros(shape, dtype=dtype, device=device), persistent=False)

    @property
    def max_len(self) -> int:
        return self.k.shape[3]

    def move(self, src: int, dst: int, length: int) -> None:
        """Copy the first ``length`` positions of slot ``src`` into slot ``dst``."""
        self.k[:, dst, :, :length] = self.k[:, src, :, :length]
        self.v[:, dst, :, :length] = self.v[:, src, :, :length]


class Runner:
    """Runs a transformers ``Qwen2ForCausalLM`` step by step over a ``KVCache``."""

    def __init__(self, llm: nn.Module, slots: int, max_len: int):
        cfg = llm.config
        self.llm = llm
        self.heads = cfg.num_attention_heads
        self.kv_heads = cfg.num_key_value_heads
        self.head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        weight = llm.get_input_embeddings().weight
        self.cache = KVCache(cfg.num_hidden_layers, slots, self.kv_heads, max_len, self.head_dim,
                             weight.dtype, weight.device)

    def _qkv(self, attn: nn.Module, h: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
        b, n, _ = h.shape
        q = attn.q_proj(h).view(b, n, self.heads, self.head_dim).transpose(1, 2)  # (B, nh, n, hd)
        k = attn.k_proj(h).view(b, n, self.kv_heads, self.head_dim).transpose(1, 2)  # (B, nkv, n, hd)
        v = attn.v_proj(h).view(b, n, self.kv_heads, self.head_dim).transpose(1, 2)
        q, k = apply_rotary_pos_emb(q, k, cos, sin)
        return q, k, v

    @torch.inference_mode()
    def prefill(self, slot: int, embeds: torch.Tensor) -> torch.Tensor:
        """Run a prompt (1, L, H) into ``slot``; returns the last position's logits (V,)."""
        model = self.llm.model
        n = embeds.shape[1]
        if n > self.cache.max_len:
            raise ValueError(f"prompt of {n} tokens exceeds the engine's context of {self.cache.max_len}")
        positions = torch.arange(n, device=embeds.device)[None]  # (1, L)
        x = embeds
        cos, sin = model.rotary_emb(x, positions)
        for i, layer in enumerate(model.layers):
            attn = layer.self_attn
            q, k, v = self._qkv(attn, layer.input_layernorm(x), cos, sin)
            self.cache.k[i, slot, :, :n] = k[0]
            self.cache.v[i, slot, :, :n] = v[0]
            o = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=attn.scaling,
                                               enable_gqa=self.heads != self.kv_heads)  # (1, nh, L, hd)
            x = x + attn.o_proj(o.transpose(1, 2).reshape(1, n, -1))
            x = x + layer.mlp(layer.post_attention_layernorm(x))
        return self.llm.lm_head(model.norm(x[:, -1:]))[0, -1]

    @torch.inference_mode()
    def decode(self, tokens: torch.Tensor, positions: torch.Tensor, length: int) -> torch.Tensor:
        """One step for slots 0..B-1.

        Args:
            tokens: (B,) the last token of each active request.
            positions: (B,) its position (= tokens already in the slot's cache).
            length: host-side ``max(positions) + 1``, the key length to attend over.
        Returns:
            (B, V) logits.
        """
        model = self.llm.model
        b = tokens.shape[0]
        group = self.heads // self.kv_heads
        x = model.embed_tokens(tokens)[:, None]  # (B, 1, H)
        cos, sin = model.rotary_emb(x, positions[:, None])
        rows = torch.arange(b, device=tokens.device)
        valid = torch.arange(length, device=tokens.device)[None] <= positions[:, None]  # (B, T)
        bias = torch.zeros(valid.shape, dtype=torch.float32, device=tokens.device).masked_fill(~valid, float("-inf"))
        bias = bias[:, None, None, :]  # (B, 1, 1, T)
        for i, layer in enumerate(model.layers):
            attn = layer.self_attn
            q, k, v = self._qkv(attn, layer.input_layernorm(x), cos, sin)  # q (B, nh, 1, hd)
            self.cache.k[i, rows, :, positions] = k[:, :, 0]
            self.cache.v[i, rows, :, positions] = v[:, :, 0]
            keys = self.cache.k[i, :b, :, :length]  # (B, nkv, T, hd)
            values = self.cache.v[i, :b, :, :length]
            qg = q.reshape(b, self.kv_heads, group, self.head_dim)  # heads of one KV group are adjacent
            scores = (qg @ keys.transpose(-1, -2)).float() * attn.scaling + bias  # (B, nkv, g, T)
            o = scores.softmax(-1).to(values.dtype) @ values  # (B, nkv, g, hd)
            x = x + attn.o_proj(o.reshape(b, 1, -1))
            x = x + layer.mlp(layer.post_attention_layernorm(x))
        return self.llm.lm_head(model.norm(x))[:, 0]
