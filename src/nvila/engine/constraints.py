"""Structured output: a request's ``response_format`` as a logits processor that masks every token
which would break the JSON.

Built on xgrammar (the ``json`` extra): a JSON schema is compiled once against the tokenizer's
vocabulary into a grammar, and each request gets its own matcher, which fills a (V,) token bitmask
per step on the CPU. ``JsonConstraints`` owns the vocabulary table and an LRU of compiled grammars
keyed by the schema's text; ``JsonConstraint`` is the per-request processor.

Choices, stated once:

* ``json_object`` compiles the schema ``{"type": "object"}`` (any object, as OpenAI's JSON mode);
  ``json_schema`` compiles the given schema in xgrammar's strict mode (objects take no properties
  beyond the schema's unless it allows them; the output still validates against the schema);
* separators are fixed (``", "`` and ``": "``, no other whitespace), so that a model cannot spend
  its budget on whitespace;
* special tokens (chat markers, media placeholders) are never allowed; the checkpoint's stop
  tokens are allowed exactly when the JSON is complete, and the request then ends with "stop";
* tokens holding a raw control character (U+0000-U+001F) are never allowed, so that an answer is
  valid JSON even where xgrammar's grammar would admit one (length-bounded strings).

This module knows a tokenizer and token ids, nothing about models.
"""

from __future__ import annotations

import json
import threading
from collections import OrderedDict
from typing import Any

import torch

from .api import ConstraintError, LogitsProcessor



def json_schema_of(response_format: dict[str, Any] | None) -> tuple[dict[str, Any], bool] | None:
    """(schema, strict) of what a ``response_format`` (OpenAI's shape) asks for; None for free text.

    ``json_object`` is the schema ``{"type": "object"}``, non-strict (any properties);
    ``json_schema`` is strict (xgrammar's strict mode: no properties beyond the schema's unless it
    allows them).

    Raises:
        ConstraintError: an unknown type, or a json_schema without a schema object.
    """
    if response_format is None:
        return None
    kind = response_format.get("type")
    if kind == "text":
        return None
    if kind == "json_object":
        return {"type": "object"}, False
    if kind == "json_schema":
        spec = response_format.get("json_schema")
        schema = spec.get("schema") if isinstance(spec, dict) else None
        if not isinstance(schema, dict):
            raise ConstraintError("response_format.json_schema.schema must be a JSON object (a JSON schema)")
        return schema, True
    raise ConstraintError(f"response_format type {kind!r} is not supported; valid: 'text', 'json_object', "
                          "'json_schema'")


class JsonConstraints:
    """Compiles JSON schemas for one tokenizer and makes per-request constraints.

    Thread-safe: ``submit`` calls it from the callers' threads.

    Args:
        tokenizer: the checkpoint's transformers fast tokenizer.
        vocab_size: the width V of the model's logits (may exceed ``len(tokenizer)``: the ids beyond
            the tokenizer are never allowed).
        stop_ids: the checkpoint's stop tokens, allowed once the JSON is complete.
        cache_size: compiled grammars kept (LRU).
    """

    def __init__(self, tokenizer, vocab_size: int, stop_ids: list[int], cache_size: int = 64):
        try:
            import jsonschema
            import xgrammar as xgr
        except ImportError as e:
            raise ConstraintError(f"structured output needs the 'json' extra (pip install 'nvila[json]'): {e}") \
                from None
        self._xgr, self._jsonschema = xgr, jsonschema
        stop = list(stop_ids) or None  # none: the tokenizer's eos
        base = xgr.TokenizerInfo.from_huggingface(tokenizer, vocab_size=vocab_size, stop_token_ids=stop)
        # The same table with tokens blanked (xgrammar never allows an empty token), the stop tokens
        # excepted:
        # * every special token, so that a constrained answer holds no chat markers or media placeholders;
        # * every token whose bytes hold a C0 control character (U+0000-U+001F). No answer these
        #   grammars should accept holds one: JSON strings escape them, and the fixed separators leave
        #   no \t, \n or \r between values. xgrammar lowers a string with minLength/maxLength to
        #   [^"\\\r\n]{m,n} (its issue #800), which admits them; blanking them here keeps every answer
        #   valid JSON whatever the schema. ``base.decoded_vocab`` holds each token's bytes as the
        #   vocabulary type detected from the tokenizer (byte-level, byte fallback, raw) spells them.
        special = {i for i, t in tokenizer.added_tokens_decoder.items() if t.special}
        control = {i for i, spelled in enumerate(base.decoded_vocab) if any(b < 0x20 for b in spelled)}
        blank = (special | control) - set(base.stop_token_ids)
        vocab = [""] * vocab_size
        for token, i in tokenizer.get_vocab().items():
            if i < vocab_size and i not in blank:
                vocab[i] = token
        self.info = xgr.TokenizerInfo(vocab, base.vocab_type, vocab_size=vocab_size, stop_token_ids=base.stop_token_ids,
                                      add_prefix_space=base.add_prefix_space)
        self.vocab_size = vocab_size
        self._compiler = xgr.GrammarCompiler(self.info, max_threads=1, cache_enabled=False)
        self._grammars: OrderedDict[str, Any] = OrderedDict()
        self._cache_size = cache_size
        self._lock = threading.Lock()

    def compile(self, schema: dict[str, Any], strict: bool = True):
        """The compiled grammar of ``schema`` (cached by its text and ``strict``). Properties come
        out in the schema's order, so the key order is part of the text.

        Raises:
            ConstraintError: the schema is not a valid JSON schema, or uses what xgrammar cannot compile.
        """
        try:
            text = json.dumps(schema, separators=(",", ":"), allow_nan=False)
        except (TypeError, ValueError) as e:
            raise ConstraintError(f"the JSON schema is not JSON: {e}") from None
        key = f"{int(strict)}{text}"
        with self._lock:  # one compile at a time (xgrammar's compiler is shared)
            grammar = self._grammars.get(key)
            if grammar is None:
                grammar = self._grammars[key] = self._compile(schema, text, strict)
                while len(self._grammars) > self._cache_size:
                    self._grammars.popitem(last=False)
            self._grammars.move_to_end(key)
        return grammar

    def _compile(self, schema: dict[str, Any], text: str, strict: bool):
        try:
            self._jsonschema.validators.validator_for(schema).check_schema(schema)
        except self._jsonschema.SchemaError as e:
            where = f" at {'/'.join(str(p) for p in e.path)}" if e.path else ""
            raise ConstraintError(f"invalid JSON schema{where}: {_first_line(e.message)}") from None
        try:
            return self._compiler.compile_json_schema(text, any_whitespace=False, strict_mode=strict)
        except Exception as e:  # xgrammar's RuntimeError: "[time] file.cc:line: message"
            raise ConstraintError(f"unsupported JSON schema: {_xgrammar_message(e)}") from None

    def processor(self, response_format: dict[str, Any] | None) -> JsonConstraint | None:
        """A new constraint (its own matcher) for one request; None for free text.

        Raises:
            ConstraintError: see ``json_schema_of`` and ``compile``.
        """
        spec = json_schema_of(response_format)
        if spec is None:
            return None
        return JsonConstraint(self._xgr, self.compile(*spec), self.vocab_size)


class JsonConstraint(LogitsProcessor):
    """One request's JSON constraint: masks the logits to the tokens the grammar allows next.

    Per step: one bitmask fill on the CPU (V/32 int32 words) and one masked write into the row;
    ``accept`` advances the matcher and reports completion once a stop token closed the JSON.
    """

    def __init__(self, xgr, grammar, vocab_size: int):
        self._xgr = xgr
        self.matcher = xgr.GrammarMatcher(grammar)
        self.bitmask = xgr.allocate_token_bitmask(1, vocab_size)  # (1, ceil(V / 32)) int32, on the CPU

    def __call__(self, generated: list[int], logits: torch.Tensor) -> torch.Tensor:
        self.matcher.fill_next_token_bitmask(self.bitmask)
        row = logits[None]  # (1, V): a view, masked in place
        # xgrammar's C++ kernel on the CPU; elsewhere its plain-torch one (no triton or compile step)
        backend = "cpu" if logits.device.type == "cpu" else "torch_native"
        self._xgr.apply_token_bitmask_inplace(row, self.bitmask.to(logits.device), backend=backend)
        return logits

    def accept(self, token: int) -> bool:
        if not self.matcher.accept_token(token):
            raise RuntimeError(f"token {token} breaks the response_format grammar")
        return self.matcher.is_terminated()


def _first_line(text: str) -> str:
    lines = str(text).strip().splitlines()
    return lines[0] if lines else ""


def _xgrammar_message(e: Exception) -> str:
    """xgrammar's error without its ``[hh:mm:ss] /path/file.cc:line:`` prefix and check noise."""
    line = _first_line(str(e))
    if line.startswith("[") and ".cc:" in line:
        line = line.split(".cc:", 1)[1].split(":", 1)[-1].strip()
    return line.removeprefix("Check failed: (error.empty()) is false: ") or type(e).__name__
