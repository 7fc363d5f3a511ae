"""``logprobs`` / ``top_logprobs`` and ``response_format`` through the HTTP app and the real engine
(in process: a tiny random NVILA-Lite behind ``create_app``), read with the official ``openai``
client, whose types check OpenAI's shapes."""

from __future__ import annotations

import json

import jsonschema
import openai
import pytest
from fastapi.testclient import TestClient

from nvila.engine import Engine, EngineConfig
from nvila.server import ServerLimits, create_app

from nvila_testing import PERSON_FORMAT, PERSON_SCHEMA

SCHEMA, PERSON = PERSON_SCHEMA, PERSON_FORMAT
USER = [{"role": "user", "content": "Describe a person as JSON."}]


@pytest.fixture(scope="module")
def http(tiny_lite):
    engine = Engine.from_pretrained(tiny_lite, config=EngineConfig(max_batch_size=4, max_seq_len=2048))
    with TestClient(create_app(engine, limits=ServerLimits(max_tokens=512))) as c:
        yield c


@pytest.fixture(scope="module")
def client(http) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{http.base_url}/v1", api_key="unused", http_client=http, max_retries=0)


def test_logprobs_in_openai_shape_streamed_or_not(client):
    r = client.chat.completions.create(model="m", messages=USER, max_tokens=10, temperature=0, logprobs=True,
                                       top_logprobs=3)
    content = r.choices[0].logprobs.content
    answer = r.usage.completion_tokens - (r.choices[0].finish_reason == "stop")  # a stop token has no entry
    assert len(content) == answer > 0
    for lp in content:
        assert lp.logprob <= 0 and len(lp.top_logprobs) == 3
        assert [t.logprob for t in lp.top_logprobs] == sorted((t.logprob for t in lp.top_logprobs), reverse=True)
        assert (lp.token, lp.logprob, lp.bytes) == (lp.top_logprobs[0].token, lp.top_logprobs[0].logprob,
                                                     lp.top_logprobs[0].bytes)  # greedy: the most likely
    text = r.choices[0].message.content
    assert b"".join(bytes(lp.bytes) for lp in content).decode("utf-8", "replace").startswith(text)
    chunks = list(client.chat.completions.create(model="m", messages=USER, max_tokens=10, temperature=0,
                                                 logprobs=True, top_logprobs=3, stream=True))
    streamed = [lp for ch in chunks if ch.choices and ch.choices[0].logprobs for lp in ch.choices[0].logprobs.content]
    # the same tokens; the second request reuses the first one's KV (prefix cache), so its float
    # logprobs may differ in the last bits
    assert [(lp.token, lp.bytes, [t.token for t in lp.top_logprobs]) for lp in streamed] == \
        [(lp.token, lp.bytes, [t.token for t in lp.top_logprobs]) for lp in content]
    for a, b in zip(streamed, content):
        assert a.logprob == pytest.approx(b.logprob, abs=1e-5)
        assert [t.logprob for t in a.top_logprobs] == pytest.approx([t.logprob for t in b.top_logprobs], abs=1e-5)
    assert "".join(ch.choices[0].delta.content or "" for ch in chunks) == text
    plain = client.chat.completions.create(model="m", messages=USER, max_tokens=4, temperature=0)
    assert plain.choices[0].logprobs is None
    chunks = list(client.chat.completions.create(model="m", messages=USER, max_tokens=4, temperature=0, stream=True))
    assert all(ch.choices[0].logprobs is None for ch in chunks)


def test_usage_reports_the_prompt_tokens_reused_from_the_prefix_cache(client):
    messages = [{"role": "user", "content": "A question asked twice, word for word."}]
    first = client.chat.completions.create(model="m", messages=messages, max_tokens=3, temperature=0)
    again = client.chat.completions.create(model="m", messages=messages, max_tokens=3, temperature=0)
    assert first.usage.prompt_tokens_details.cached_tokens < first.usage.prompt_tokens - 1
    assert again.usage.prompt_tokens_details.cached_tokens == again.usage.prompt_tokens - 1
    assert again.choices[0].message.content == first.choices[0].message.content


@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.parametrize("seed", [None, 0, 1])
def test_json_schema_answers_parse_and_validate(client, stream, seed):
    kw = dict(model="m", messages=USER, max_tokens=400, response_format=PERSON,
              **({"temperature": 0} if seed is None else {"temperature": 1, "seed": seed}))
    if stream:
        chunks = list(client.chat.completions.create(stream=True, **kw))
        text = "".join(ch.choices[0].delta.content or "" for ch in chunks)
        finish = chunks[-1].choices[0].finish_reason
    else:
        r = client.chat.completions.create(**kw)
        text, finish = r.choices[0].message.content, r.choices[0].finish_reason
    assert finish == "stop"
    jsonschema.validate(json.loads(text), SCHEMA)


def test_json_object_answer_is_an_object(client):
    r = client.chat.completions.create(model="m", messages=USER, max_tokens=400, temperature=0,
                                       response_format={"type": "json_object"})
    assert r.choices[0].finish_reason == "stop" and isinstance(json.loads(r.choices[0].message.content), dict)


@pytest.mark.parametrize("schema, message", [
    ({"type": "strange"}, "invalid JSON schema at type: 'strange' is not valid"),
    ({"type": "object", "properties": {"a": {"$ref": "#/$defs/missing"}}}, "unsupported JSON schema"),
])
def test_invalid_schemas_get_a_400_naming_response_format(http, schema, message):
    r = http.post("/v1/chat/completions", json={"messages": USER, "response_format": {
        "type": "json_schema", "json_schema": {"name": "x", "schema": schema}}})
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["param"] == "response_format" and err["code"] == "invalid_response_format"
    assert message in err["message"] and "\n" not in err["message"]
    assert http.post("/v1/chat/completions", json={"messages": USER, "max_tokens": 2}).status_code == 200
