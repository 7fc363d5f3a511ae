"""The engine's per-request logits hook, logprobs and structured output, on the golden tiny NVILA-Lite
(random weights, the real Qwen2 tokenizer): processors steer and end requests without touching the
others, logprobs equal log_softmax of an uncached forward, and JSON answers always parse and validate."""

from __future__ import annotations

import json
import sys

import jsonschema
import pytest
import torch

from nvila import NVILAForConditionalGeneration, NVILAProcessor
from nvila.engine import ConstraintError, Engine, EngineConfig, GenerationRequest, LogitsProcessor
from nvila.engine.logprobs import TokenSpeller

from nvila_testing import GOLDEN, PERSON_FORMAT, PERSON_SCHEMA

IMAGE = str(GOLDEN / "inputs" / "image_1000x700.png")
TEXT = [{"role": "user", "content": "Describe a person as JSON."}]
WITH_IMAGE = [{"role": "user", "content": [{"type": "image", "image": IMAGE}, {"type": "text", "text": "What is it?"}]}]
SCHEMA, JSON_SCHEMA = PERSON_SCHEMA, PERSON_FORMAT


@pytest.fixture(scope="module")
def lite(tiny_checkpoints):
    path = tiny_checkpoints["nvila-lite"]
    model, processor = NVILAForConditionalGeneration.from_pretrained(path), NVILAProcessor.from_pretrained(path)
    engine = Engine(model, processor, EngineConfig(max_batch_size=4, max_seq_len=2048))
    yield model, processor, engine
    engine.shutdown()


class Script(LogitsProcessor):
    """Forces ``ids`` one by one and says the answer is complete after the last; records its calls."""

    def __init__(self, ids: list[int]):
        self.ids, self.calls, self.accepted = ids, [], []

    def __call__(self, generated, logits):
        self.calls.append(list(generated))
        forced = self.ids[len(self.accepted)]
        return torch.full_like(logits, float("-inf")).index_fill_(0, torch.tensor([forced]), 0.0)

    def accept(self, token):
        self.accepted.append(token)
        return len(self.accepted) == len(self.ids)


def test_processors_steer_and_end_a_request_and_leave_the_others_alone(lite):
    _, _, engine = lite
    alone = engine.submit(GenerationRequest(messages=TEXT, max_tokens=6))
    alone.text()
    script = Script([alone.token_ids[3], alone.token_ids[0], 11, 12])
    banned = alone.token_ids[0]

    def ban(generated, logits):  # a plain callable works too (no accept)
        logits[banned] = float("-inf")
        return logits

    handles = [engine.submit(GenerationRequest(messages=TEXT, max_tokens=6)),
               engine.submit(GenerationRequest(messages=TEXT, max_tokens=20, logits_processors=[script])),
               engine.submit(GenerationRequest(messages=TEXT, max_tokens=6, logits_processors=[ban])),
               engine.submit(GenerationRequest(messages=TEXT, max_tokens=6))]
    for h in handles:
        h.text()
    plain, scripted, without, plain2 = handles
    assert plain.token_ids == plain2.token_ids == alone.token_ids  # batched with processors: unchanged
    assert scripted.token_ids == script.ids and scripted.finish_reason == "stop"  # complete after the last
    assert script.calls == [script.ids[:i] for i in range(4)]  # first token (prefill) and every step
    assert script.accepted == script.ids
    assert banned not in without.token_ids[:1] and len(without.token_ids) == 6


def test_a_failing_processor_ends_only_its_request(lite):
    _, _, engine = lite
    alone = engine.submit(GenerationRequest(messages=TEXT, max_tokens=8))
    alone.text()

    def fails_at_third(generated, logits):
        if len(generated) == 2:
            raise RuntimeError("injected processor failure")
        return logits

    class RejectsFirst(LogitsProcessor):
        def __call__(self, generated, logits):
            return logits

        def accept(self, token):
            raise ValueError("injected accept failure")

    bystander = engine.submit(GenerationRequest(messages=TEXT, max_tokens=8))
    victims = [engine.submit(GenerationRequest(messages=TEXT, max_tokens=8, logits_processors=[p]))
               for p in (fails_at_third, RejectsFirst())]
    ends = [list(v)[-1] for v in victims]
    assert [(e.finish_reason, e.error) for e in ends] == [("error", "RuntimeError: injected processor failure"),
                                                          ("error", "ValueError: injected accept failure")]
    assert [len(v.token_ids) for v in victims] == [2, 1]
    bystander.text()
    assert bystander.token_ids == alone.token_ids and bystander.finish_reason == "length"
    assert engine.stats()["running"] == 0


def _reference_logprobs(model, processor, msgs, token_ids) -> torch.Tensor:
    """log_softmax of an uncached forward over prompt + answer: row t is the distribution of token t."""
    inputs = processor.apply_chat_template(msgs, add_generation_prompt=True, tokenize=True, return_dict=True,
                                           return_tensors="pt")
    n = inputs["input_ids"].shape[1]
    ids = torch.cat([inputs["input_ids"], torch.tensor([token_ids])], dim=1)
    with torch.no_grad():
        logits = model(**dict(inputs, input_ids=ids, attention_mask=torch.ones_like(ids))).logits[0]
    return logits.float().log_softmax(-1)[n - 1:n - 1 + len(token_ids)]  # (T, V)


@pytest.mark.parametrize("sampling", [{}, {"do_sample": True, "temperature": 1.5, "top_p": 0.9, "seed": 3},
                                      {"response_format": JSON_SCHEMA}], ids=["greedy", "sampled", "constrained"])
def test_logprobs_equal_log_softmax_of_an_uncached_forward(lite, sampling):
    """The model's own distribution: before temperature, top-p and the JSON mask."""
    model, processor, engine = lite
    k = 5
    h = engine.submit(GenerationRequest(messages=WITH_IMAGE, max_tokens=8, logprobs=True, top_logprobs=k, **sampling))
    events = list(h)
    content = [lp for ev in events for lp in ev.logprobs]
    assert all(ev.logprobs is not None for ev in events)
    answer = h.token_ids[:-1] if h.finish_reason == "stop" else h.token_ids  # the stop token has none
    assert len(content) == len(answer) > 0
    ref = _reference_logprobs(model, processor, WITH_IMAGE, answer)
    tokenizer = processor.tokenizer
    for t, (token, lp) in enumerate(zip(answer, content)):
        assert abs(lp.logprob - ref[t, token].item()) <= 1e-5
        alone = tokenizer.convert_tokens_to_string([tokenizer.convert_ids_to_tokens(token)])
        assert bytes(lp.bytes) == alone.encode() or lp.token.startswith("bytes:")
        values = [alt.logprob for alt in lp.top_logprobs]
        assert len(values) == k and values == sorted(values, reverse=True)
        assert torch.allclose(torch.tensor(values, dtype=torch.float64), ref[t].topk(k).values.double(), atol=1e-5)
        if (ref[t] > ref[t, token]).sum() < k:  # the sampled token ranks in the top k: it is listed
            assert any(alt.bytes == lp.bytes and alt.logprob == lp.logprob for alt in lp.top_logprobs)
        if not sampling:
            assert lp.top_logprobs[0].logprob == lp.logprob
    if "response_format" in sampling:  # the mask moved the choice away from the model's favourite
        assert any(lp.top_logprobs[0].logprob > lp.logprob for lp in content)
    assert b"".join(bytes(lp.bytes) for lp in content).decode("utf-8", "replace") == "".join(ev.text for ev in events)


def test_tokens_spell_as_their_exact_bytes(lite):
    _, processor, engine = lite
    tok = processor.tokenizer
    speller = TokenSpeller(tok)
    text = "Grüße, 世界 𝔘𝔫𝔦"
    spelled = [speller.spell(i) for i in tok(text, add_special_tokens=False).input_ids]
    assert b"".join(bytes(raw) for _, raw in spelled) == text.encode()
    assert any(t.startswith("bytes:\\x") for t, _ in spelled)  # a character split across tokens
    assert speller.spell(engine.model.ids.stop[0])[0] == tok.convert_ids_to_tokens(engine.model.ids.stop[0])
    assert speller.spell(engine.model.config.llm.vocab_size + 5) == ("", [])


def test_no_logprobs_unless_asked_and_top_logprobs_is_bounded(lite):
    _, _, engine = lite
    h = engine.submit(GenerationRequest(messages=TEXT, max_tokens=3))
    assert all(ev.logprobs is None for ev in h)
    h = engine.submit(GenerationRequest(messages=TEXT, max_tokens=3, logprobs=True))
    assert [lp.top_logprobs for ev in h for lp in ev.logprobs] == [[], [], []]
    with pytest.raises(ValueError, match="top_logprobs"):
        engine.submit(GenerationRequest(messages=TEXT, logprobs=True, top_logprobs=21))
    with pytest.raises(ValueError, match="top_logprobs needs logprobs"):
        engine.submit(GenerationRequest(messages=TEXT, top_logprobs=2))


@pytest.mark.parametrize("sampling", [{}, *({"do_sample": True, "temperature": 1.0, "seed": s} for s in range(3))],
                         ids=["greedy", "seed0", "seed1", "seed2"])
def test_json_schema_answers_parse_and_validate(lite, sampling):
    _, processor, engine = lite
    h = engine.submit(GenerationRequest(messages=TEXT, max_tokens=400, response_format=JSON_SCHEMA, **sampling))
    text = h.text()
    assert h.finish_reason == "stop", text
    jsonschema.validate(json.loads(text), SCHEMA)
    assert list(json.loads(text)) == list(SCHEMA["properties"])  # the schema's order
    special = set(processor.tokenizer.all_special_ids) | {engine.model.ids.image, engine.model.ids.video}
    assert not special & set(h.token_ids[:-1]) and h.token_ids[-1] in engine.model.ids.stop


@pytest.fixture(scope="module")
def small_vocab(tmp_path_factory):
    """A tiny random NVILA-Lite with ``nvila.tiny``'s 446-token tokenizer: there a random model
    closes strings and objects within a few hundred tokens; over the 151k Qwen2 vocabulary it
    almost never picks the closing quote, and an unbounded ``json_object`` answer runs to its budget."""
    from nvila.tiny import build_tiny_checkpoint

    engine = Engine.from_pretrained(build_tiny_checkpoint(tmp_path_factory.mktemp("json") / "lite", "nvila-lite"),
                                    config=EngineConfig(max_batch_size=4, max_seq_len=2048))
    yield engine
    engine.shutdown()


def test_json_object_answers_parse_and_an_exhausted_budget_shows_as_length(small_vocab, lite):
    answers = {}
    runs = {"greedy": {}, "seed0": {"do_sample": True, "seed": 0}, "seed2": {"do_sample": True, "seed": 2}}
    for name, kw in runs.items():
        h = small_vocab.submit(GenerationRequest(messages=TEXT, max_tokens=600, response_format={"type": "json_object"},
                                                 logprobs=True, **kw))
        events = list(h)
        text = "".join(ev.text for ev in events)
        assert h.finish_reason == "stop", (name, text)
        answers[name] = json.loads(text)
        assert isinstance(answers[name], dict)
        assert len([lp for ev in events for lp in ev.logprobs]) == len(h.token_ids) - 1  # all but the stop token
    assert any(answers.values())  # not only empty objects
    _, _, engine = lite
    for response_format in ({"type": "json_object"}, JSON_SCHEMA):
        short = engine.submit(GenerationRequest(messages=TEXT, max_tokens=6, response_format=response_format))
        text = short.text()  # the JSON cannot close in 6 tokens: cut short, as OpenAI does
        assert short.finish_reason == "length" and text.startswith('{"')
        with pytest.raises(json.JSONDecodeError):
            json.loads(text)
    free = engine.submit(GenerationRequest(messages=TEXT, max_tokens=4, response_format={"type": "text"}))
    plain = engine.submit(GenerationRequest(messages=TEXT, max_tokens=4))
    assert free.text() == plain.text()


@pytest.mark.parametrize("response_format, message", [
    ({"type": "xml"}, "type 'xml' is not supported"),
    ({"type": "json_schema", "json_schema": {"name": "x"}}, "schema must be a JSON object"),
    ({"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "strange"}}}, "invalid JSON schema"),
    ({"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "object", "required": "name"}}},
     "invalid JSON schema at required"),
    ({"type": "json_schema", "json_schema": {"name": "x", "schema": {"$ref": "#/nowhere"}}}, "unsupported JSON schema"),
])
def test_bad_response_formats_are_refused_at_submit(lite, response_format, message):
    _, _, engine = lite
    with pytest.raises(ConstraintError, match=message) as e:
        engine.submit(GenerationRequest(messages=TEXT, response_format=response_format))
    assert "\n" not in str(e.value)
    assert engine.stats()["waiting"] == 0


def test_without_the_json_extra_a_response_format_is_refused_in_one_line(lite, monkeypatch):
    model, processor, _ = lite
    monkeypatch.setitem(sys.modules, "xgrammar", None)  # import fails, as without `pip install 'nvila[json]'`
    engine = Engine(model, processor, EngineConfig(max_batch_size=1, max_seq_len=2048))
    try:
        with pytest.raises(ConstraintError, match=r"needs the 'json' extra \(pip install 'nvila\[json\]'\)") as e:
            engine.submit(GenerationRequest(messages=TEXT, response_format={"type": "json_object"}))
        assert "\n" not in str(e.value)
        assert engine.submit(GenerationRequest(messages=TEXT, max_tokens=2)).text() is not None  # still serving
    finally:
        engine.shutdown()
