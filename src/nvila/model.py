"""NVILA: vision tower + projector + Qwen2, fused with one ``masked_scatter``.

Contract: the processor has already expanded every media placeholder into exactly as many
media-token ids (``TokenIds.image`` / ``TokenIds.video``) as there are visual feature rows, in order;
start/end tokens such as the trailing ``"\\n"`` are ordinary token ids. The model embeds the ids,
encodes the media, checks the counts, and writes the features into the media positions. It knows
no tokenizer and no file formats (see checkpoint.py).
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .checkpoint import CheckpointError, check_layout, load_component, load_llm_state, resolve_chat_template, token_ids
from .config import ConfigError, NVILAConfig, TokenIds
from .layouts import detect, read_states
from .llm import build_llm, reset_llm_buffers
from .projector import build_projector
from .quant.format import apply_quant_metadata, read_quant_metadata
from .temporal import encode_video_features
from .timetokens import ensure_time_tokens
from .tiling import dynamic_s2_num_tiles
from .vision import VisionTower, s2_blocks, s2_output_grid, s2_unblock

logger = logging.getLogger(__name__)


@dataclass
class NVILAOutput:
    logits: torch.Tensor  # (B, L, V) or (B, logits_to_keep, V)
    cache: object | None = None  # transformers' Cache, updated in place; None unless use_cache
    loss: torch.Tensor | None = None


class NVILAForConditionalGeneration(nn.Module):
    """The NVILA model. Submodules ``vision_tower``, ``mm_projector`` and ``llm`` mirror the layout."""

    def __init__(self, config: NVILAConfig, ids: TokenIds):
        super().__init__()
        self.config = config
        self.ids = ids
        self.vision_tower = VisionTower(config.vision)
        self.mm_projector = build_projector(config.projector_type, config.mm_hidden_size, config.llm.hidden_size)
        self.llm = build_llm(config.llm, vocab_size=ids.vocab_size)

    # --------------------------------------------------------------------------------- loading
    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, *, torch_dtype: torch.dtype | None = None,
                        dtype: torch.dtype | None = None, device: torch.device | str | None = None,
                        local_files_only: bool = False, config: NVILAConfig | None = None
                        ) -> "NVILAForConditionalGeneration":
        """Load a checkpoint in either layout of ``nvila.layouts`` (vila or hf): a directory, or a Hub id ``ORG/NAME[@REVISION]``
        fetched into the Hugging Face cache (``checkpoint.resolve_checkpoint``; ``local_files_only``
        or ``HF_HUB_OFFLINE=1``: the cache only).

        Modules are built on the meta device, then allocated on ``device`` in ``dtype`` (default
        float32) and filled from safetensors through the per-component key maps. A quantized
        checkpoint declares its quantized modules in its safetensors metadata (``nvila.quant.format``);
        those linears are swapped for the runtime modules before the weights are loaded.

        ``config`` replaces the stored config (e.g. the trainer's, with preprocessing overrides or
        time tokens added: the vocabulary then grows, with mean-initialised rows).
        """
        root = check_layout(path, local_files_only=local_files_only)
        dtype = dtype or torch_dtype or torch.float32
        device = torch.device(device or "cpu")
        if config is None:
            try:
                config = NVILAConfig.from_pretrained(root)
            except ConfigError as e:
                raise CheckpointError(str(e)) from None
        layout = detect(root)
        tok = layout.load_tokenizer(root)
        ensure_time_tokens(tok, config.num_time_tokens, config.time_token_format)
        ids = token_ids(tok, resolve_chat_template(config, tok))
        model = cls.on_meta(config, ids)
        quantized = read_quant_metadata(root)  # {component: {module: scheme spec}}, {} if full precision
        apply_quant_metadata(model, quantized)  # swap the listed linears on meta, before allocation
        model = model.materialize(device, dtype)
        states = read_states(root, layout)  # {component: {module key: tensor}}
        load_llm_state(model.llm, states["llm"], ids.vocab_size, config.llm.tie_word_embeddings)
        load_component(model.vision_tower, "vision_tower", states["vision_tower"])
        load_component(model.mm_projector, "mm_projector", states["mm_projector"])
        return model.eval()

    @classmethod
    def on_meta(cls, config: NVILAConfig, ids: TokenIds | None = None) -> "NVILAForConditionalGeneration":
        """The model with no storage: for shape inspection, parameter counts, or ``materialize``.

        Without ``ids`` (a bare config, no tokenizer) the stored ``llm.vocab_size`` is used and the
        special ids are unset (-1): such a model can be counted but not run.
        """
        if ids is None:
            ids = TokenIds(image=-1, video=-1, pad=-1, stop=(), newline=(), vocab_size=config.llm.vocab_size)
        with torch.device("meta"):
            return cls(config, ids)

    def num_parameters(self) -> dict[str, int]:
        """Parameter count per component (tied weights counted once) and the total."""
        counts = {}
        for name in ("vision_tower", "mm_projector", "llm"):
            seen = {id(p): p.numel() for p in getattr(self, name).parameters()}
            counts[name] = sum(seen.values())
        counts["total"] = sum(counts.values())
        return counts

    def materialize(self, device: torch.device | str, dtype: torch.dtype) -> "NVILAForConditionalGeneration":
        """Allocate (uninitialised) storage for a meta model, and rebuild its non-persistent buffers."""
        self.to(dtype=dtype)
        self.to_empty(device=device)
        reset_llm_buffers(self.llm, device)
        self.vision_tower.reset_buffers(device)
        return self

    @property
    def device(self) -> torch.device:
        return self.llm.model.embed_tokens.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.llm.model.embed_tokens.weight.dtype

    # -------------------------------------------------------------------------------- encoders
    def encode_images(self, pixel_values: torch.Tensor, block_sizes: list) -> torch.Tensor:
        """Tiles of all image media -> visual feature rows, in media order.

        Args:
            pixel_values: (N_tiles, 3, S, S); for a dynamic-S2 image with block (r, c) its
                1 + 4 + r*c multi-scale tiles, otherwise one tile per medium.
            block_sizes: one (rows, cols) or None per medium.
        Returns:
            (N_visual, D)
        """
        feats = self.vision_tower(pixel_values.to(self.vision_tower.dtype))  # (N, g*g, C)
        if not self.config.is_dynamic_s2:
            return self.mm_projector(feats).flatten(0, 1)
        scales, tile = self.config.s2_scales, self.config.vision.image_size
        blocks, grids, start = [], [], 0
        for bs in block_sizes:
            n = dynamic_s2_num_tiles(bs, scales, tile)
            blocks.append(s2_blocks(feats[start:start + n], bs, scales, tile, self.config.s2_resize_output_to_scale_idx))
            grids.append(None if bs is None else s2_output_grid(bs, scales, tile, self.config.s2_resize_output_to_scale_idx))
            start += n
        if start != feats.shape[0]:
            raise ValueError(f"pixel_values has {feats.shape[0]} tiles but the block sizes account for {start}")
        tokens = self.mm_projector(torch.cat(blocks))  # (sum blocks, t, D)
        out, start = [], 0
        for b, grid in zip(blocks, grids):
            chunk = tokens[start:start + b.shape[0]]
            out.append(s2_unblock(chunk, grid) if grid is not None else chunk.flatten(0, 1))
            start += b.shape[0]
        return torch.cat(out)

    def encode_videos(self, pixel_values_videos: torch.Tensor, num_frames: list[int]) -> torch.Tensor:
        """Frames of all videos (N_frames, 3, S, S) -> visual feature rows (N_visual, D), video order."""
        feats = self.vision_tower(pixel_values_videos.to(self.vision_tower.dtype))  # (N, g*g, C)
        if self.config.is_dynamic_s2:
            feats = feats.repeat(1, 1, len(self.config.s2_scales))  # spec §6.3: one scale, repeated
        frames = self.mm_projector(feats)  # (N, t, D)
        return torch.cat([encode_video_features(v, self.config.video_encoder) for v in frames.split(num_frames)])

    # --------------------------------------------------------------------------------- forward
    def embed(self, input_ids: torch.Tensor, pixel_values: torch.Tensor | None = None,
              image_block_sizes: list | None = None, pixel_values_videos: torch.Tensor | None = None,
              video_num_frames: list[int] | None = None) -> torch.Tensor:
        """Token embeddings with the visual features written into the media positions: (B, L, D)."""
        image_feats = video_feats = None
        if pixel_values is not None:
            if image_block_sizes is None:
                raise ValueError("pixel_values were given without image_block_sizes")
            image_feats = self.encode_images(pixel_values, image_block_sizes)
        if pixel_values_videos is not None:
            if video_num_frames is None:
                raise ValueError("pixel_values_videos were given without video_num_frames")
            video_feats = self.encode_videos(pixel_values_videos, video_num_frames)
        return self.fuse(input_ids, image_feats, video_feats)

    def fuse(self, input_ids: torch.Tensor, image_feats: torch.Tensor | None = None,
             video_feats: torch.Tensor | None = None) -> torch.Tensor:
        """Embed ``input_ids`` (B, L) and write visual rows (N, D) into the media positions, in order.

        Raises:
            ValueError: if the number of media tokens differs from the number of feature rows.
        """
        embeds = self.llm.get_input_embeddings()(input_ids)  # (B, L, D)
        for kind, token, feats in (("image", self.ids.image, image_feats), ("video", self.ids.video, video_feats)):
            mask = input_ids == token  # (B, L)
            if feats is None:
                if mask.any():
                    raise ValueError(f"input_ids contain {kind} tokens but no {kind} pixels were given")
                continue
            n_tokens = int(mask.sum())  # one host sync per prefill, for a clear error below
            if n_tokens != feats.shape[0]:
                raise ValueError(f"{kind} token count mismatch: input_ids hold {n_tokens} {kind} tokens but "
                                 f"the media produce {feats.shape[0]} feature rows; expand placeholders with "
                                 f"NVILAProcessor")
            embeds = embeds.masked_scatter(mask.unsqueeze(-1), feats.to(embeds.dtype))
        return embeds

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                pixel_values: torch.Tensor | None = None, image_block_sizes: list | None = None,
                pixel_values_videos: torch.Tensor | None = None, video_num_frames: list[int] | None = None,
                position_ids: torch.Tensor | None = None, cache=None, use_cache: bool = False,
                labels: torch.Tensor | None = None, logits_to_keep: int = 0) -> NVILAOutput:
        """input_ids (B, L) -> logits (B, L, V). Left or right padding; positions restart after padding.

        ``cache`` is a transformers ``Cache`` (e.g. ``DynamicCache()``) that the LLM extends in place.
        """
        embeds = self.embed(input_ids, pixel_values, image_block_sizes, pixel_values_videos, video_num_frames)
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        if position_ids is None:
            position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
        out = self.llm(inputs_embeds=embeds, attention_mask=attention_mask, position_ids=position_ids,
                       cache=cache, use_cache=use_cache, logits_to_keep=logits_to_keep)
        loss = None
        if labels is not None:
            logits = out.logits[:, :-1].float()
            loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1), ignore_index=-100)
        return NVILAOutput(logits=out.logits, cache=out.cache, loss=loss)

    # -------------------------------------------------------------------------------- generate
    @torch.inference_mode()
    def generate(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, *,
                 max_new_tokens: int | None = None, do_sample: bool = False, temperature: float = 1.0,
                 top_k: int = 0, top_p: float = 1.0, repetition_penalty: float = 1.0, seed: int | None = None,
                 eos_token_id: int | list[int] | None = None, pad_token_id: int | None = None,
                 streamer=None, logits_processors: list[list] | None = None, **media) -> torch.Tensor:
        """Decode new tokens after the prompt; returns (B, L + new) ids, as transformers does.

        Defaults follow the reference (spec §3.4): greedy, stop on the checkpoint's stop tokens,
        and at most ``model_max_length - L`` new tokens. Finished rows are filled with ``pad``.
        ``streamer`` (transformers' protocol) gets ``put(ids (B,))`` per step and ``end()``.
        ``logits_processors``: one list per row of ``engine.LogitsProcessor``s, applied to that
        row's float32 logits before sampling; a processor whose ``accept(token)`` returns True ends
        its row (as a stop token does).

        The decode path is the engine's (``llm.Runner``): each row's real tokens (padding dropped,
        left or right) are prefilled into its own cache slot at positions 0..n-1, then all rows
        decode together, so a batch row equals the same prompt run alone. Attention is torch's
        fused kernel, which makes a single row's logits bitwise those of transformers' forward.
        """
        from .llm import Runner
        from .sampling import SamplingParams, sample

        params = SamplingParams(do_sample=do_sample, temperature=temperature, top_k=top_k, top_p=top_p,
                                repetition_penalty=repetition_penalty)
        b, n = input_ids.shape
        device = input_ids.device
        if logits_processors is not None and len(logits_processors) != b:
            raise ValueError(f"logits_processors needs one list per row: got {len(logits_processors)} for {b} rows")
        stop = torch.tensor(self.ids.stop if eos_token_id is None else
                            ([eos_token_id] if isinstance(eos_token_id, int) else list(eos_token_id)),
                            device=device)
        pad = self.ids.pad if pad_token_id is None else pad_token_id
        if max_new_tokens is None:
            max_new_tokens = max(self.config.llm.model_max_length - n, 0)
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        generator = None
        if seed is not None:
            generator = torch.Generator(device=device).manual_seed(seed)
        out = torch.full((b, n + max_new_tokens), pad, dtype=input_ids.dtype, device=device)
        out[:, :n] = input_ids
        if max_new_tokens == 0:
            return out
        real = attention_mask.bool()
        positions = real.sum(-1).tolist()  # host: each row's real length = its next position
        embeds = self.embed(input_ids, **media)  # (B, L, H)
        runner = Runner(self.llm, b, max(positions) + min(max_new_tokens, 256), attention="sdpa")
        logits = torch.stack([runner.prefill(i, embeds[i:i + 1, real[i]]) for i in range(b)])  # (B, V)
        done = torch.zeros(b, dtype=torch.bool, device=device)
        generated: list[list[int]] = [[] for _ in range(b)]  # host copies, kept for the processors only
        ended, stop_ids = [False] * b, set(stop.tolist())
        for step in range(max_new_tokens):
            scores = logits.float()
            if logits_processors is not None:
                for i, procs in enumerate(logits_processors):
                    for proc in procs if not ended[i] else ():
                        scores[i] = proc(generated[i], scores[i])
            nxt = sample(scores, out[:, :n + step], params, generator)  # (B,)
            nxt = torch.where(done, torch.full_like(nxt, pad), nxt)
            out[:, n + step] = nxt
            if streamer is not None:
                streamer.put(nxt)
            done = done | torch.isin(nxt, stop)
            if logits_processors is not None:  # the processors need host ids; every one is told the token
                for i, (procs, token) in enumerate(zip(logits_processors, nxt.tolist())):
                    if not ended[i]:
                        generated[i].append(token)
                        complete = [bool(p.accept(token)) for p in procs if hasattr(p, "accept")]
                        ended[i] = token in stop_ids or any(complete)
                done = done | torch.tensor(ended, device=device)
            if bool(done.all()) or step + 1 == max_new_tokens:
                out = out[:, :n + step + 1]
                break
            if max(positions) + 1 > runner.cache.max_len:
                runner.cache.grow(min(2 * runner.cache.max_len, max(positions) + max_new_tokens - step))
            logits = runner.decode(nxt, positions)
            positions = [p + 1 for p in positions]
        if streamer is not None:
            streamer.end()
        return out
