"""Micro-batch collation: sequence packing (one row, block-diagonal causal attention) or padding.

Packing (spec §2.4) concatenates the samples of a micro-batch into one row, restarts the RoPE
positions at 0 for every sample, sets the first label of every sample to -100 (sample k's first
token must not be predicted from sample k-1) and passes a 4-D boolean mask, True = may attend,
that is causal inside each sample and blocks attention across samples. transformers' Qwen2 uses
a 4-D mask as given, and ``NVILAForConditionalGeneration.forward`` keeps explicit ``position_ids``.
With a token-mean loss (sum over labelled tokens / their count) the packed row gives the same
loss as the padded batch, without computing anything for padding.

Padding right-pads ids with the pad id and labels with -100, with a 2-D attention mask.

``use_packed_attention(llm)`` switches the LLM to a registered transformers attention function
(``nvila_packed``) that reads a (1, 1, T, T) boolean mask as packing's block-diagonal causal mask
and runs causal SDPA per sample, so the cost is sum(L_i^2) instead of T^2 (what FlashAttention's
varlen kernels do on GPU); any other mask goes to transformers' SDPA unchanged. The segments found in
the mask are checked against ``block_causal_mask`` once per forward pass.

Media tensors are concatenated in sample order, which is the order of their tokens in the row(s).
This module knows tensors only: no tokenizer, no files.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .data import IGNORE_INDEX, Sample

PACKED_ATTENTION = "nvila_packed"


def block_causal_mask(lengths: list[int], device: torch.device | str | None = None) -> torch.Tensor:
    """(1, 1, T, T) bool: token i may attend to token j iff both are in the same sample and j <= i."""
    seg = torch.repeat_interleave(torch.arange(len(lengths), device=device),
                                  torch.tensor(lengths, device=device))  # (T,) sample id per token
    same = seg[:, None] == seg[None, :]  # (T, T)
    return (same & torch.ones_like(same).tril())[None, None]


def _media(samples: list[Sample]) -> dict:
    out: dict = {}
    images = [s for s in samples if s.pixel_values is not None]
    if images:
        out["pixel_values"] = torch.cat([s.pixel_values for s in images])  # (sum tiles, 3, S, S)
        out["image_block_sizes"] = [b for s in images for b in s.image_block_sizes]
    videos = [s for s in samples if s.pixel_values_videos is not None]
    if videos:
        out["pixel_values_videos"] = torch.cat([s.pixel_values_videos for s in videos])  # (sum frames, 3, S, S)
        out["video_num_frames"] = [n for s in videos for n in s.video_num_frames]
    return out


def pack(samples: list[Sample]) -> dict:
    """Samples -> one packed row: ``input_ids``/``labels``/``position_ids`` (1, T), ``attention_mask`` (1, 1, T, T)."""
    lengths = [s.input_ids.numel() for s in samples]
    labels = []
    for s in samples:
        lab = s.labels.clone()
        lab[0] = IGNORE_INDEX
        labels.append(lab)
    batch = {
        "input_ids": torch.cat([s.input_ids for s in samples])[None],  # (1, T)
        "labels": torch.cat(labels)[None],  # (1, T)
        "position_ids": torch.cat([torch.arange(n) for n in lengths])[None],  # (1, T)
        "attention_mask": block_causal_mask(lengths),  # (1, 1, T, T)
    }
    batch.update(_media(samples))
    return batch


def pad(samples: list[Sample], pad_id: int) -> dict:
    """Samples -> a right-padded batch: ``input_ids``/``labels``/``attention_mask`` (B, L_max)."""
    length = max(s.input_ids.numel() for s in samples)
    ids = torch.full((len(samples), length), pad_id, dtype=torch.long)
    labels = torch.full((len(samples), length), IGNORE_INDEX, dtype=torch.long)
    mask = torch.zeros((len(samples), length), dtype=torch.long)
    for i, s in enumerate(samples):
        n = s.input_ids.numel()
        ids[i, :n], labels[i, :n], mask[i, :n] = s.input_ids, s.labels, 1
    batch = {"input_ids": ids, "labels": labels, "attention_mask": mask}
    batch.update(_media(samples))
    return batch


def collate(samples: list[Sample], *, packed: bool, pad_id: int) -> dict:
    """``pack`` or ``pad`` a micro-batch."""
    return pack(samples) if packed else pad(samples, pad_id)


def token_sources(samples: list[Sample], *, packed: bool) -> torch.Tensor:
    """Each token's ``Sample.source``, laid out as ``collate`` lays out the tokens: (1, T) packed,
    (B, L_max) padded (padding takes its row's source; its labels are ignored anyway)."""
    if packed:
        return torch.cat([torch.full((s.input_ids.numel(),), s.source) for s in samples])[None]
    length = max(s.input_ids.numel() for s in samples)
    return torch.tensor([[s.source] for s in samples]).expand(-1, length)


def num_targets(batch: dict) -> int:
    """Labelled tokens after the causal shift (the denominator of the token-mean loss)."""
    return int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())


def to_device(batch: dict, device: torch.device | str, dtype: torch.dtype) -> dict:
    """Move tensors to ``device``; pixel tensors also to ``dtype``."""
    out = {}
    for k, v in batch.items():
        if isinstance(v, torch.Tensor):
            v = v.to(device=device, dtype=dtype if v.is_floating_point() else None)
        out[k] = v
    return out


# ------------------------------------------------------------------------------ packed attention
_last: dict = {}  # {"mask": the mask tensor itself (kept alive, so identity is safe), "lengths": ...}


def _segments(mask: torch.Tensor) -> list[int] | None:
    """Sample lengths of a packing mask (1, 1, T, T), or None if ``mask`` is not one.

    Every layer of a forward pass gets the same mask object, so the result is computed once per pass.
    """
    if _last.get("mask") is not mask:
        starts = (~mask[0, 0].diagonal(-1)).nonzero().flatten() + 1  # a token that cannot see its predecessor
        bounds = [0, *starts.tolist(), mask.shape[-1]]
        lengths = [b - a for a, b in zip(bounds, bounds[1:])]
        ok = torch.equal(block_causal_mask(lengths, mask.device), mask)
        _last.update(mask=mask, lengths=lengths if ok else None)
    return _last["lengths"]


def packed_attention(module, query, key, value, attention_mask, dropout: float = 0.0, scaling=None, **kwargs):
    """transformers attention function: per-sample causal SDPA for packed rows, SDPA otherwise.

    Shapes: query (1, H, T, d), key/value (1, H_kv, T, d) -> output (1, T, H, d), as transformers expects.
    """
    from transformers.integrations.sdpa_attention import repeat_kv, sdpa_attention_forward

    packed = (attention_mask is not None and attention_mask.dtype == torch.bool and attention_mask.dim() == 4
              and attention_mask.shape[0] == 1 and attention_mask.shape[-2] == attention_mask.shape[-1] == query.shape[2])
    lengths = _segments(attention_mask) if packed else None
    if lengths is None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      **kwargs)
    groups = getattr(module, "num_key_value_groups", 1)
    key, value = repeat_kv(key, groups), repeat_kv(value, groups)  # (1, H, T, d)
    out = torch.cat([F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scaling,
                                                    dropout_p=dropout if module.training else 0.0)
                     for q, k, v in zip(query.split(lengths, 2), key.split(lengths, 2), value.split(lengths, 2))],
                    dim=2)  # (1, H, T, d)
    return out.transpose(1, 2).contiguous(), None


def use_packed_attention(llm) -> None:
    """Route a transformers LLM's attention through ``packed_attention`` (registered once)."""
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask

    AttentionInterface.register(PACKED_ATTENTION, packed_attention)
    ALL_MASK_ATTENTION_FUNCTIONS.register(PACKED_ATTENTION, sdpa_mask)  # 2-D masks (padding, generation)
    llm.config._attn_implementation = PACKED_ATTENTION
