"""The Qwen2 language model of NVILA, built from transformers' ``Qwen2ForCausalLM``, and its decode steps.

Knows the LLM config and the published key layout of ``llm/model*.safetensors`` (identical to
transformers' Qwen2 keys). It does not know the tokenizer: the vocabulary size it is built with is
decided by the loader (``len(tokenizer)`` after the run-time token additions).

Two ways to run it:

* the whole-sequence forward (training, scoring): ``llm(inputs_embeds (B, L, H), attention_mask (B, L),
  position_ids (B, L))`` -> logits ``(B, L, V)``, transformers' module as is;
* the decode steps (``Runner``), the one path every generation takes (``model.generate``, the
  engine, and through them ``nvila infer``, ``nvila eval``, the demo and the server): prefill and
  one-token decode over a preallocated ``KVCache``, reusing the module's projections, norms, MLP and
  rotary tables. With ``attention="sdpa"`` a single row's logits are bitwise those of transformers'
  forward with its own cache. A short continuation of a reused prefix (a follow-up turn) runs its
  float32 CPU linears on oneDNN instead (``_onednn_linear``), equal to float rounding.
"""

from __future__ import annotations

import contextlib
import logging

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel
from transformers import Qwen2Config, Qwen2ForCausalLM
from transformers.models.qwen2.modeling_qwen2 import Qwen2RotaryEmbedding, apply_rotary_pos_emb

from .config import LLMConfig

logger = logging.getLogger(__name__)


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


# ------------------------------------------------------------------------------------- decode steps
class KVCache(nn.Module):
    """Keys and values of every layer: (layers, slots, kv_heads, max_len, head_dim).

    Slot b holds one sequence's keys at its positions, so a row's valid keys are ``[0, position]``.
    """

    def __init__(self, layers: int, slots: int, kv_heads: int, max_len: int, head_dim: int,
                 dtype: torch.dtype, device: torch.device | str):
        super().__init__()
        shape = (layers, slots, kv_heads, max_len, head_dim)
        self.register_buffer("k", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        self.register_buffer("v", torch.zeros(shape, dtype=dtype, device=device), persistent=False)

    @property
    def max_len(self) -> int:
        return self.k.shape[3]

    def grow(self, max_len: int) -> None:
        """Reallocate to hold ``max_len`` positions per slot, keeping the contents."""
        if max_len <= self.max_len:
            return
        for name in ("k", "v"):
            old = getattr(self, name)
            new = old.new_zeros(old.shape[:3] + (max_len,) + old.shape[4:])
            new[:, :, :, :old.shape[3]] = old
            setattr(self, name, new)

    def move(self, src: int, dst: int, length: int) -> None:
        """Copy the first ``length`` positions of slot ``src`` into slot ``dst``."""
        self.k[:, dst, :, :length] = self.k[:, src, :, :length]
        self.v[:, dst, :, :length] = self.v[:, src, :, :length]

    def read(self, slot: int, length: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Copies of slot ``slot``'s first ``length`` positions: k, v (layers, kv_heads, length, head_dim)."""
        return self.k[:, slot, :, :length].clone(), self.v[:, slot, :, :length].clone()

    def write(self, slot: int, k: torch.Tensor, v: torch.Tensor) -> None:
        """Put ``read``'s tensors into positions ``[0, k.shape[2])`` of slot ``slot``."""
        self.k[:, slot, :, :k.shape[2]] = k
        self.v[:, slot, :, :v.shape[2]] = v


def _sdpa_decode(q, keys, values, valid, scaling):
    """torch's fused attention. ``valid`` (B, T) bool, or None when every row sees every key."""
    mask = None if valid is None else valid[:, None, None, :]
    return F.scaled_dot_product_attention(q, keys, values, attn_mask=mask, scale=scaling,
                                          enable_gqa=q.shape[1] != keys.shape[1])  # (B, nh, 1, hd)


def _grouped_decode(q, keys, values, valid, scaling):
    """Two matmuls over each KV group's query heads, softmax in float32: 1.3-2.1x faster than torch's
    fused kernel for one query row on CPU (benchmarks/bench_decode_attention.py, RESULTS.md issue 23)."""
    b, heads, _, head_dim = q.shape
    kv_heads = keys.shape[1]
    qg = q.reshape(b, kv_heads, heads // kv_heads, head_dim)  # heads of one KV group are adjacent
    scores = (qg @ keys.transpose(-1, -2)).float() * scaling  # (B, nkv, g, T)
    if valid is not None:
        scores = scores.masked_fill(~valid[:, None, None, :], float("-inf"))
    return (scores.softmax(-1).to(values.dtype) @ values).reshape(b, heads, 1, head_dim)


DECODE_ATTENTION = {"sdpa": _sdpa_decode, "grouped": _grouped_decode}


def decode_attention(name: str, device: torch.device) -> str:
    """Resolve ``"auto"`` (grouped on CPU, sdpa elsewhere) and check the name."""
    if name == "auto":
        return "grouped" if device.type == "cpu" else "sdpa"
    if name not in DECODE_ATTENTION:
        raise ValueError(f"unknown decode attention {name!r}; valid: auto, {', '.join(DECODE_ATTENTION)}")
    return name


# The SDPA backends of the prefill on CUDA: all but cuDNN's, which builds a plan for every new shape.
# On an H200 a prompt of a length not seen before took 0.170 s to its first token with cuDNN and
# 0.100 s without (one 896x896 image, NVILA-Lite-2B shape, bf16; RESULTS.md, issue 23). Decode keeps
# torch's choice: its CUDA graphs plan once per capture, and there cuDNN decoded 254 tok/s against
# 182 without.
CUDA_SDPA_BACKENDS = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]


def _sdpa_backends(device: torch.device):
    """``CUDA_SDPA_BACKENDS`` on CUDA, torch's own choice elsewhere. ``sdpa_kernel`` sets flags of the
    process for its duration: SDPA calls made meanwhile by other threads also leave cuDNN out."""
    return sdpa_kernel(CUDA_SDPA_BACKENDS) if device.type == "cuda" else contextlib.nullcontext()


def _error_line(e: Exception) -> str:
    """The first line of an exception's message, at most 200 characters, for a one-line warning."""
    return str(e).splitlines()[0][:200] if str(e) else type(e).__name__


CONTINUATION_ROWS = 64  # a prefill after a reused prefix with at most this many tokens may run oneDNN


def _call(m: nn.Module, x: torch.Tensor) -> torch.Tensor:
    return m(x)


def _onednn_linear(m: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``m(x)``; a float32 ``nn.Linear`` runs oneDNN's matmul on its plain weight (no packed copy).

    For a few rows on the CPU it beat MKL's sgemm, which ``F.linear`` runs: 1536 -> 8960 at 2
    threads, 4.02 vs 5.61 ms at 31 rows and 2.28 vs 3.66 at 4 (benchmarks/RESULTS.md, issue 23). The
    sums are ordered differently (about 1e-6 relative to MKL's). Other modules (quantized linears)
    run as they are.
    """
    if type(m) is not nn.Linear:
        return m(x)
    y = torch.ops.mkldnn._linear_pointwise(x.reshape(-1, x.shape[-1]), m.weight, m.bias, "none", [], "")
    return y.view(*x.shape[:-1], y.shape[-1])


class Runner:
    """Prefill and decode steps of a transformers ``Qwen2ForCausalLM`` over a ``KVCache``.

    * ``prefill(slot, embeds, start)``: one sequence's tokens at positions ``start..start+n-1``
      (keys ``[0, start)`` already in the slot, e.g. a reused prefix); writes their K/V;
    * ``decode(tokens, positions)``: one new token for each of the first B slots at its position.

    ``cuda_graphs`` (CUDA only): decode steps replay CUDA graphs (``DecodeGraphs``) instead of
    launching each layer's kernels from Python. On CUDA the prefill runs SDPA without its cuDNN
    backend (``CUDA_SDPA_BACKENDS``).
    """

    def __init__(self, llm: nn.Module, slots: int, max_len: int, *, attention: str = "auto",
                 cuda_graphs: bool = False):
        cfg = llm.config
        self.llm = llm
        self.heads = cfg.num_attention_heads
        self.kv_heads = cfg.num_key_value_heads
        self.head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        weight = llm.get_input_embeddings().weight
        self.attention = DECODE_ATTENTION[decode_attention(attention, weight.device)]
        self.cache = KVCache(cfg.num_hidden_layers, slots, self.kv_heads, max_len, self.head_dim,
                             weight.dtype, weight.device)
        # a short continuation of a reused prefix (a follow-up turn) runs its float32 linears on oneDNN
        self.onednn_continuations = (weight.device.type == "cpu" and weight.dtype == torch.float32
                                     and torch.backends.mkldnn.is_available()
                                     and hasattr(torch.ops.mkldnn, "_linear_pointwise"))
        self.graphs = DecodeGraphs(self) if cuda_graphs and weight.device.type == "cuda" else None

    def _qkv(self, attn: nn.Module, h: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, linear=_call):
        b, n, _ = h.shape
        q = linear(attn.q_proj, h).view(b, n, self.heads, self.head_dim).transpose(1, 2)  # (B, nh, n, hd)
        k = linear(attn.k_proj, h).view(b, n, self.kv_heads, self.head_dim).transpose(1, 2)  # (B, nkv, n, hd)
        v = linear(attn.v_proj, h).view(b, n, self.kv_heads, self.head_dim).transpose(1, 2)
        q, k = apply_rotary_pos_emb(q, k, cos, sin)
        return q, k, v

    @torch.inference_mode()
    def prefill(self, slot: int, embeds: torch.Tensor, start: int = 0) -> torch.Tensor:
        """Run ``embeds`` (1, n, H) at positions ``start..start+n-1`` into ``slot``; returns the last
        position's logits (V,). A continuation (``start`` > 0) of at most ``CONTINUATION_ROWS`` tokens
        runs float32 CPU linears on oneDNN (``_onednn_linear``); a whole prompt runs them as the
        modules do, which keeps its logits those of transformers' forward. Should oneDNN's op fail
        (it is a private torch op), the step runs again on the modules, which every later one keeps
        to, after one warning."""
        if self.onednn_continuations and start and embeds.shape[1] <= CONTINUATION_ROWS:
            try:
                return self._prefill(slot, embeds, start, _onednn_linear)
            except RuntimeError as e:  # rerunning rewrites the same cache positions
                self.onednn_continuations = False
                logger.warning("oneDNN's linear failed (%s); prefill continuations use the modules' linears",
                               _error_line(e))
        with _sdpa_backends(embeds.device):
            return self._prefill(slot, embeds, start, _call)

    def _prefill(self, slot: int, embeds: torch.Tensor, start: int, linear) -> torch.Tensor:
        model = self.llm.model
        n = embeds.shape[1]
        end = start + n
        if end > self.cache.max_len:
            raise ValueError(f"prompt of {end} tokens exceeds the engine's context of {self.cache.max_len}")
        positions = torch.arange(start, end, device=embeds.device)[None]  # (1, n)
        causal = None
        if start:  # queries see the reused prefix and the causal part of their own chunk: (n, end)
            causal = torch.arange(end, device=embeds.device)[None] <= positions[0, :, None]
        x = embeds
        cos, sin = model.rotary_emb(x, positions)
        for i, layer in enumerate(model.layers):
            attn = layer.self_attn
            q, k, v = self._qkv(attn, layer.input_layernorm(x), cos, sin, linear)
            self.cache.k[i, slot, :, start:end] = k[0]
            self.cache.v[i, slot, :, start:end] = v[0]
            if start:
                k, v = self.cache.k[i, slot:slot + 1, :, :end], self.cache.v[i, slot:slot + 1, :, :end]
            o = F.scaled_dot_product_attention(q, k, v, attn_mask=causal, is_causal=causal is None, scale=attn.scaling,
                                               enable_gqa=self.heads != self.kv_heads)  # (1, nh, n, hd)
            x = x + linear(attn.o_proj, o.transpose(1, 2).reshape(1, n, -1))
            h, mlp = layer.post_attention_layernorm(x), layer.mlp  # Qwen2MLP's forward, op for op
            x = x + linear(mlp.down_proj, mlp.act_fn(linear(mlp.gate_proj, h)) * linear(mlp.up_proj, h))
        return self.llm.lm_head(model.norm(x[:, -1:]))[0, -1]

    @torch.inference_mode()
    def decode(self, tokens: torch.Tensor, positions: list[int]) -> torch.Tensor:
        """One step for slots 0..B-1.

        Args:
            tokens: (B,) the last token of each row, on the model's device.
            positions: B host ints, each row's position (= tokens already in its slot).
        Returns:
            (B, V) logits.
        """
        length = max(positions) + 1
        if length > self.cache.max_len:
            raise ValueError(f"position {length - 1} is outside the cache of {self.cache.max_len}")
        if self.graphs is not None:
            try:
                return self.graphs.run(tokens, positions, length)
            except RuntimeError as e:  # a module that cannot be captured: eager from now on
                self.graphs = None
                logger.warning("CUDA graph decode failed (%s); decoding eagerly", _error_line(e))
        pos = torch.tensor(positions, device=tokens.device)
        valid = None  # rows at different positions mask the keys past their own
        if min(positions) != length - 1:
            valid = torch.arange(length, device=tokens.device)[None] <= pos[:, None]  # (B, T)
        return self._decode(tokens, pos, length, valid)

    def _decode(self, tokens: torch.Tensor, pos: torch.Tensor, span: int, valid: torch.Tensor | None) -> torch.Tensor:
        """The layers of one step: tokens (B,), pos (B,) on the device; attention over keys [0, span)
        of each slot, masked by ``valid`` (B, span) unless None. Returns (B, V) logits."""
        model = self.llm.model
        b = tokens.shape[0]
        x = model.embed_tokens(tokens)[:, None]  # (B, 1, H)
        cos, sin = model.rotary_emb(x, pos[:, None])
        rows = torch.arange(b, device=tokens.device)
        for i, layer in enumerate(model.layers):
            attn = layer.self_attn
            q, k, v = self._qkv(attn, layer.input_layernorm(x), cos, sin)  # q (B, nh, 1, hd)
            self.cache.k[i, rows, :, pos] = k[:, :, 0]
            self.cache.v[i, rows, :, pos] = v[:, :, 0]
            o = self.attention(q, self.cache.k[i, :b, :, :span], self.cache.v[i, :b, :, :span], valid,
                               attn.scaling)  # (B, nh, 1, hd)
            x = x + attn.o_proj(o.transpose(1, 2).reshape(b, 1, -1))
            x = x + layer.mlp(layer.post_attention_layernorm(x))
        return self.llm.lm_head(model.norm(x))[:, 0]


class DecodeGraphs:
    """CUDA graphs of ``Runner``'s decode step, one per (rows B, key span), captured on first use.

    A step of eager decode launches every layer's ~40 kernels from Python, and on a GPU that launch
    time, not the math, sets the step's time; a graph replays them all in one launch. Graphs need
    fixed shapes, so attention reads a key span that is a power of two (at least ``MIN_SPAN``,
    at most the cache) and masks the keys past each row's position: the same result as the eager
    step up to the order of float sums. Inputs are copied into the graph's own tensors; the logits
    returned are a copy (the next replay overwrites the graph's). All graphs share one memory pool,
    and all are dropped when the cache is reallocated (``KVCache.grow``).
    Capture runs the step once first (lazy kernel setup must not happen during capture): with the
    real inputs, so the keys and values it writes are the ones the step writes.
    """

    MIN_SPAN = 256

    def __init__(self, runner: Runner):
        self.runner = runner
        self.graphs: dict[tuple[int, int], tuple[torch.cuda.CUDAGraph, torch.Tensor, torch.Tensor, torch.Tensor]] = {}
        self.pool = None
        self.cache_at = runner.cache.k.data_ptr()  # graphs read the cache where it was at capture

    def span(self, length: int) -> int:
        return min(max(self.MIN_SPAN, 1 << (length - 1).bit_length()), self.runner.cache.max_len)

    def run(self, tokens: torch.Tensor, positions: list[int], length: int) -> torch.Tensor:
        if self.runner.cache.k.data_ptr() != self.cache_at:  # KVCache.grow reallocated: capture again
            self.graphs.clear()
            self.pool, self.cache_at = None, self.runner.cache.k.data_ptr()
        key = (tokens.shape[0], self.span(length))
        pos = torch.tensor(positions)
        if key not in self.graphs:
            self.graphs[key] = self._capture(tokens, pos, *key)
        graph, static_tokens, static_pos, logits = self.graphs[key]
        static_tokens.copy_(tokens)
        static_pos.copy_(pos)
        graph.replay()
        return logits.clone()

    def _capture(self, tokens: torch.Tensor, pos: torch.Tensor, b: int, span: int):
        device = tokens.device
        static_tokens, static_pos = tokens.clone(), pos.to(device)

        def step() -> torch.Tensor:  # every tensor it makes is the graph's (a freed outside one would be reused)
            valid = torch.arange(span, device=device)[None] <= static_pos[:, None]  # (B, span)
            return self.runner._decode(static_tokens, static_pos, span, valid)

        with torch.cuda.device(device):
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                step()
            torch.cuda.current_stream().wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=self.pool, capture_error_mode="thread_local"):
                logits = step()
        self.pool = graph.pool()
        logger.debug("captured a decode graph for %d rows over %d keys", b, span)
        return graph, static_tokens, static_pos, logits
