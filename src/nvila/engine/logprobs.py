"""Log-probabilities of sampled tokens in OpenAI's terms (``TokenLogprob``), for requests that ask.

``token_logprob(logits, token, k, speller)`` takes one request's raw logits row (V,) at one step:
``log_softmax`` in float32, the sampled token's value and the ``k`` largest, read to the host in
one transfer (a host sync, only for requests that asked).

``TokenSpeller`` spells ids as text and UTF-8 bytes: for a byte-level BPE (GPT-2 / Qwen2)
vocabulary it maps each token's symbols back to bytes, so a token that ends inside a multi-byte
character keeps its exact bytes; other tokenizers spell a token by decoding it alone.

This module knows a tokenizer only to spell tokens.
"""

from __future__ import annotations

import torch

from .api import TokenLogprob


def _byte_decoder() -> dict[str, int]:
    """GPT-2's byte-level alphabet, inverted: symbol -> byte (printable bytes stand for themselves,
    the others are shifted to 256 + n)."""
    kept = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table, shift = {chr(b): b for b in kept}, 0
    for b in range(256):
        if b not in kept:
            table[chr(256 + shift)] = b
            shift += 1
    return table


class TokenSpeller:
    """Token id -> (text, UTF-8 bytes), cached per id. Ids beyond the tokenizer (a padded lm_head)
    spell as ``("", [])``."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        backend = getattr(tokenizer, "backend_tokenizer", None)
        self._decoder = _byte_decoder() if backend is not None and "ByteLevel" in repr(backend.decoder) else None
        self._cache: dict[int, tuple[str, list[int]]] = {}

    def spell(self, token_id: int) -> tuple[str, list[int]]:
        hit = self._cache.get(token_id)
        if hit is None:
            hit = self._cache[token_id] = self._spell(token_id)
        return hit

    def _spell(self, token_id: int) -> tuple[str, list[int]]:
        piece = self.tokenizer.convert_ids_to_tokens(token_id)
        if piece is None:
            return "", []
        if self._decoder is not None and all(c in self._decoder for c in piece):
            raw = bytes(self._decoder[c] for c in piece)
        else:  # not byte-level, or an added token (written as plain text)
            raw = self.tokenizer.decode([token_id], skip_special_tokens=False).encode("utf-8")
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError:  # part of a multi-byte character: OpenAI's spelling
            text = "bytes:" + "".join(f"\\x{b:02x}" for b in raw)
        return text, list(raw)


def token_logprob(logits: torch.Tensor, token: int, k: int, speller: TokenSpeller) -> TokenLogprob:
    """The sampled ``token``'s log-probability and the step's ``k`` most likely tokens.

    Args:
        logits: (V,) the request's raw logits at this step (before any processor or sampling setting).
        token: the id that was sampled.
        k: alternatives to report (0..20).
        speller: spells ids as text and bytes.
    Returns:
        A ``TokenLogprob``; ``top_logprobs`` sorted most likely first.
    """
    logp = logits.float().log_softmax(-1)  # (V,)
    top = logp.topk(k)  # values and ids (k,), most likely first
    # [chosen, top values..., top ids...] in float64 (exact for float32 values and ids < 2**53):
    # one device -> host transfer
    host = torch.cat([logp[token:token + 1], top.values]).double()
    host = torch.cat([host, top.indices.double()]).tolist()
    alts = []
    for v, i in zip(host[1:k + 1], host[k + 1:]):
        text, raw = speller.spell(int(i))
        alts.append(TokenLogprob(token=text, logprob=v, bytes=raw))
    text, raw = speller.spell(token)
    return TokenLogprob(token=text, logprob=host[0], bytes=raw, top_logprobs=alts)
