"""``JsonConstraints`` never lets a raw control character (U+0000-U+001F) into a constrained answer.

xgrammar lowers a string with ``minLength``/``maxLength`` (PERSON_SCHEMA's name and tags) to
``[^"\\\r\n]{m,n}``, which admits the byte tokens of \t, \x07 and the rest (its issue #800); JSON
forbids them raw, so ``json.loads`` rejected such answers. Checked on both byte-level BPE vocabularies
of the tests: ``nvila.tiny``'s and the real Qwen2 one.
"""

from __future__ import annotations

import json

import jsonschema
import pytest
import torch

from nvila.checkpoint import load_tokenizer
from nvila.engine import Engine, EngineConfig, GenerationRequest
from nvila.engine.constraints import JsonConstraints

from golden_checkpoints import unpack_tokenizer
from nvila_testing import PERSON_FORMAT, PERSON_SCHEMA

TEXT = [{"role": "user", "content": "Describe a person as JSON."}]
# One valid document per grammar, walked token by token; the mask is checked before every token.
DOCUMENTS = [
    ({"type": "json_schema", "json_schema": {"name": "person", "schema": PERSON_SCHEMA}},
     '{"name": "Ann Lee", "age": 30, "colour": "red", "tags": ["tall", "x"]}'),
    ({"type": "json_object"}, '{"a": "tab\\there", "n": [1, 2.5, true, null, {"x": "y\\u0007"}]}'),
]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A tiny random NVILA-Lite with ``nvila.tiny``'s byte-level BPE tokenizer, behind an engine."""
    from nvila.tiny import build_tiny_checkpoint

    engine = Engine.from_pretrained(build_tiny_checkpoint(tmp_path_factory.mktemp("json") / "lite", "nvila-lite"),
                                    config=EngineConfig(max_batch_size=4, max_seq_len=2048))
    yield engine
    engine.shutdown()


@pytest.fixture(scope="module")
def qwen2(tmp_path_factory):
    """The golden Qwen2 tokenizer (151k byte-level BPE), as the engine loads it."""
    return load_tokenizer(unpack_tokenizer(tmp_path_factory.mktemp("qwen2") / "tokenizer"))


def control_tokens(tokenizer) -> set[int]:
    """Ids whose text holds a C0 control character, read from the tokenizer itself (not xgrammar)."""
    texts = tokenizer.batch_decode([[i] for i in range(len(tokenizer))])
    return {i for i, text in enumerate(texts) if any(ord(ch) < 0x20 for ch in text)}


@pytest.mark.parametrize("vocab", ["tiny", "qwen2"])
@pytest.mark.parametrize("response_format, document", DOCUMENTS, ids=["bounded-strings", "json-object"])
def test_no_token_with_a_control_character_is_ever_allowed(request, vocab, response_format, document):
    tokenizer = request.getfixturevalue(vocab)
    if vocab == "tiny":  # the tokenizer the engine loaded from the checkpoint
        tokenizer = tokenizer.processor.tokenizer
    control = control_tokens(tokenizer)
    assert set(tokenizer.encode("\t\x07", add_special_tokens=False)) <= control  # the vocabulary spells them
    vocab_size = len(tokenizer) + 3  # logits wider than the tokenizer, as the golden checkpoints' are
    constraint = JsonConstraints(tokenizer, vocab_size, [tokenizer.eos_token_id]).processor(response_format)
    ids = tokenizer.encode(document, add_special_tokens=False) + [tokenizer.eos_token_id]
    for step, token in enumerate(ids):
        allowed = torch.isfinite(constraint(ids[:step], torch.zeros(vocab_size))).nonzero().flatten().tolist()
        assert token in allowed, (step, tokenizer.decode(ids[:step]))
        assert not control & set(allowed), (step, tokenizer.decode(ids[:step]))
        assert max(allowed) < len(tokenizer)
        assert constraint.accept(token) == (step == len(ids) - 1)  # complete once the stop token closed it


def test_sampled_answers_over_many_seeds_parse_and_validate(tiny):
    handles = [tiny.submit(GenerationRequest(messages=TEXT, max_tokens=400, response_format=PERSON_FORMAT,
                                             do_sample=True, temperature=1.0, seed=seed)) for seed in range(16)]
    for seed, h in enumerate(handles):
        text = h.text()
        assert h.finish_reason == "stop", (seed, text)
        assert not any(ord(ch) < 0x20 for ch in text), (seed, text)
        jsonschema.validate(json.loads(text), PERSON_SCHEMA)
