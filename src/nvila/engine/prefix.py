"""Prefix caching: the KV of finished requests, reused by later requests that start the same way.

A request's *key* names what each of its positions holds: the token id for text, and for the
positions of a medium a value derived from that medium's content hash (every image uses the same
placeholder id, so ids alone cannot tell two images apart). Two prompts agree on their first ``p``
positions exactly when their keys do, and then (attention being causal) so does the KV of those
positions: a new request copies the KV of the longest agreeing prefix into its slot and prefills
only the rest.

Entries live on the model's device, bounded by ``capacity_bytes`` with least-recently-used
eviction. An entry whose key is a prefix of a newer one is dropped (the newer one covers it).
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

import numpy as np
import torch

from ..processor import MediumInfo


def media_positions(input_ids: torch.Tensor, media: list[tuple[int, int]]) -> list[np.ndarray]:
    """Per medium, the prompt positions of its placeholder tokens.

    Args:
        input_ids: (L,) the prompt's ids (host), media placeholders expanded.
        media: per medium in prompt order, (placeholder id, visual tokens): a medium takes the next
            that many placeholders of its id.
    """
    ids = input_ids.detach().cpu().numpy()
    where = {token: np.flatnonzero(ids == token) for token in {m[0] for m in media}}
    taken = dict.fromkeys(where, 0)
    out = []
    for token, count in media:
        out.append(where[token][taken[token]:taken[token] + count])
        taken[token] += count
    return out


def prompt_key(input_ids: torch.Tensor, positions: list[np.ndarray], digests: list[str]) -> np.ndarray:
    """The key of a prompt: (L,) int64 ids, with each medium's placeholder ``positions``
    (``media_positions``) replaced by a negative value taken from its content digest (hex; ids are
    never negative)."""
    key = input_ids.detach().cpu().numpy().astype(np.int64)  # a copy
    for at, digest in zip(positions, digests):
        key[at] = -1 - int(digest[:15], 16)  # 60 bits of the digest
    return key


def media_slices(inputs, media: list[MediumInfo]) -> list[tuple[torch.Tensor, list]]:
    """Per medium, its pixels (tiles or frames, (n, 3, S, S)) and what its encoder takes with them:
    ``[block size]`` for an image, ``[frames]`` for a video."""
    rows = {"image": 0, "video": 0}
    blocks = iter(inputs.get("image_block_sizes") or [])
    out = []
    for info in media:
        pixels = inputs["pixel_values" if info.kind == "image" else "pixel_values_videos"]
        out.append((pixels[rows[info.kind]:rows[info.kind] + info.num_tiles],
                    [next(blocks)] if info.kind == "image" else [info.num_tiles]))
        rows[info.kind] += info.num_tiles
    return out


@dataclass
class _Entry:
    key: np.ndarray  # (n,)
    k: torch.Tensor  # (layers, kv_heads, n, head_dim)
    v: torch.Tensor

    @property
    def nbytes(self) -> int:
        return self.k.numel() * self.k.element_size() * 2


def common_prefix(a: np.ndarray, b: np.ndarray) -> int:
    """How many leading positions ``a`` and ``b`` share."""
    n = min(len(a), len(b))
    differ = np.flatnonzero(a[:n] != b[:n])
    return int(differ[0]) if len(differ) else n


class PrefixCache:
    """An LRU store of (key, K, V) for the engine's scheduler thread (not thread-safe)."""

    def __init__(self, capacity_bytes: int):
        self.capacity = capacity_bytes
        self._entries: OrderedDict[int, _Entry] = OrderedDict()
        self._next = 0
        self.bytes = 0
        self.hits = 0
        self.hit_tokens = 0

    def __len__(self) -> int:
        return len(self._entries)

    def longest(self, key: np.ndarray, limit: int) -> tuple[int, _Entry | None]:
        """The longest prefix of ``key`` held, at most ``limit`` positions: (length, entry)."""
        best, found, name = 0, None, None
        for i, e in self._entries.items():
            n = min(common_prefix(key, e.key), limit)
            if n > best:
                best, found, name = n, e, i
        if found is not None:
            self._entries.move_to_end(name)
            self.hits += 1
            self.hit_tokens += best
        return best, found

    def insert(self, key: np.ndarray, k: torch.Tensor, v: torch.Tensor) -> None:
        """Store the KV of ``key`` (k, v: (layers, kv_heads, len(key), head_dim)), evicting as needed."""
        entry = _Entry(key, k, v)
        if self.capacity <= 0 or entry.nbytes > self.capacity:
            return
        for i, e in list(self._entries.items()):
            shared = common_prefix(key, e.key)
            if shared == len(key):  # already covered by a longer (or equal) entry
                self._entries.move_to_end(i)
                return
            if shared == len(e.key):  # the new entry covers this one
                self._drop(i)
        while self._entries and self.bytes + entry.nbytes > self.capacity:
            self._drop(next(iter(self._entries)))
        self._entries[self._next] = entry
        self._next += 1
        self.bytes += entry.nbytes

    def _drop(self, name: int) -> None:
        self.bytes -= self._entries.pop(name).nbytes

    def stats(self) -> dict:
        tokens = sum(len(e.key) for e in self._entries.values())
        return {"entries": len(self._entries), "tokens": tokens, "bytes": self.bytes, "hits": self.hits,
                "hit_tokens": self.hit_tokens}
