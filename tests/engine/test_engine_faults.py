"""Engine fault isolation: every request ends with one final event whatever fails, a failure ends
only the requests it concerns, and the engine keeps serving (failures are injected by patching)."""

from __future__ import annotations

import threading

import pytest

from nvila import NVILAForConditionalGeneration, NVILAProcessor
from nvila.engine import Engine, EngineClosed, EngineConfig, GenerationRequest
from nvila.engine import engine as engine_module

LONG = [{"role": "user", "content": "Write a haiku about mountains in winter."}]
SHORT = [{"role": "user", "content": "Hi"}]


def _engine(path, slots: int) -> Engine:
    return Engine(NVILAForConditionalGeneration.from_pretrained(path), NVILAProcessor.from_pretrained(path),
                  EngineConfig(max_batch_size=slots))


@pytest.fixture(scope="module")
def engine(tiny_checkpoints):
    e = _engine(tiny_checkpoints["nvila-lite"], slots=2)
    yield e
    e.shutdown()


def _alone(engine: Engine, messages: list[dict], n: int = 12) -> list[int]:
    h = engine.submit(GenerationRequest(messages=messages, max_tokens=n))
    h.text()
    assert h.finish_reason == "length"  # runs its full length: it is still running when others fail
    return h.token_ids


def _hold_decoding(engine: Engine, monkeypatch) -> threading.Event:
    """Decode steps wait until the returned event is set, so that requests submitted before it is
    set join a running batch (admissions do not wait)."""
    go = threading.Event()
    step = engine._step
    monkeypatch.setattr(engine, "_step", lambda: (go.wait(60), step())[1])
    return go


def _assert_idle(engine: Engine) -> None:
    later = engine.submit(GenerationRequest(messages=SHORT, max_tokens=3))
    later.text()
    assert later.finish_reason in ("stop", "length")
    stats = engine.stats()
    assert stats["running"] == 0 and stats["waiting"] == 0 and stats["kv_tokens"] == 0


def test_seeds_outside_torchs_range_are_refused_at_submit(engine):
    for seed in (2**64, -2**63 - 1):
        with pytest.raises(ValueError, match=r"seed must be in \[-2\*\*63, 2\*\*64\)"):
            engine.submit(GenerationRequest(messages=SHORT, seed=seed))
    kw = dict(messages=LONG, max_tokens=6, do_sample=True, temperature=1.5)
    handles = [engine.submit(GenerationRequest(seed=seed, **kw)) for seed in (2**64 - 1, -1, -2**63, 2**63)]
    for h in handles:
        h.text()
    assert {h.finish_reason for h in handles} <= {"stop", "length"}
    assert handles[0].token_ids == handles[1].token_ids  # -1 wraps to 2**64 - 1
    assert handles[2].token_ids == handles[3].token_ids  # -2**63 wraps to 2**63
    _assert_idle(engine)


def test_a_failing_admission_ends_only_that_request(engine, monkeypatch):
    alone = _alone(engine, LONG)
    real_sample, running_at_failure = engine_module.sample, []

    def sample(logits, seen, params, generator=None):
        if generator is not None and generator.initial_seed() == 666:  # the victim's seeded first sample
            running_at_failure.append(engine.stats()["running"])
            raise RuntimeError("injected generator failure")
        return real_sample(logits, seen, params, generator)

    monkeypatch.setattr(engine_module, "sample", sample)
    go = _hold_decoding(engine, monkeypatch)
    bystander = engine.submit(GenerationRequest(messages=LONG, max_tokens=12))
    victim = engine.submit(GenerationRequest(messages=SHORT, max_tokens=12, do_sample=True, seed=666))
    go.set()
    [end] = list(victim)
    assert end.finish_reason == "error" and end.error == "RuntimeError: injected generator failure"
    assert victim.token_ids == []
    assert running_at_failure == [1]  # the bystander was decoding when the victim failed
    bystander.text()
    assert bystander.finish_reason == "length" and bystander.token_ids == alone
    _assert_idle(engine)


def test_a_failure_in_one_requests_decode_ends_only_that_request(engine, monkeypatch):
    alone = _alone(engine, LONG)
    victim_messages = [{"role": "user", "content": "Why is the sky blue?"}]
    real_accept, running_at_failure = engine._accept, []

    def accept(r, token):
        if r.request.messages is victim_messages and r.new_tokens == 3:  # its 4th token, from a decode step
            running_at_failure.append(engine.stats()["running"])
            raise KeyError("injected detokenizer failure")
        real_accept(r, token)

    monkeypatch.setattr(engine, "_accept", accept)
    go = _hold_decoding(engine, monkeypatch)
    bystander = engine.submit(GenerationRequest(messages=LONG, max_tokens=12))
    victim = engine.submit(GenerationRequest(messages=victim_messages, max_tokens=12))
    go.set()
    events = list(victim)
    assert events[-1].finish_reason == "error" and "injected detokenizer failure" in events[-1].error
    assert [ev.finish_reason for ev in events[:-1]] == [None] * (len(events) - 1)
    assert len(victim.token_ids) == 3
    assert running_at_failure == [2]
    bystander.text()
    assert bystander.finish_reason == "length" and bystander.token_ids == alone
    _assert_idle(engine)


def test_a_failing_batched_decode_ends_the_requests_of_that_step_only(engine, monkeypatch):
    alone = _alone(engine, SHORT)
    decode, failed_batches = engine.runner.decode, []

    def flaky_decode(tokens, positions):
        if tokens.shape[0] == 2 and not failed_batches:  # once, when both slots decode
            failed_batches.append(2)
            raise RuntimeError("injected device failure")
        return decode(tokens, positions)

    monkeypatch.setattr(engine.runner, "decode", flaky_decode)
    go = _hold_decoding(engine, monkeypatch)
    in_step = [engine.submit(GenerationRequest(messages=LONG, max_tokens=12)) for _ in range(2)]
    waiting = engine.submit(GenerationRequest(messages=SHORT, max_tokens=12))  # 2 slots: it waits
    go.set()
    for h in in_step:
        end = list(h)[-1]
        assert end.finish_reason == "error" and end.error == "RuntimeError: injected device failure"
    assert failed_batches == [2]
    waiting.text()
    assert waiting.finish_reason == "length" and waiting.token_ids == alone
    _assert_idle(engine)


def test_a_scheduler_that_dies_closes_the_engine_and_ends_every_request(tiny_checkpoints, monkeypatch):
    """A bug that escapes even the scheduler's last-resort handler: here, describing the error fails."""
    engine = _engine(tiny_checkpoints["nvila-lite"], slots=1)
    go = threading.Event()

    def admit(r):
        go.wait(60)
        raise RuntimeError("injected admission failure")

    def describe(e):
        raise TypeError("injected failure while handling a failure")

    monkeypatch.setattr(engine, "_admit", admit)
    monkeypatch.setattr(engine_module, "_describe", describe)
    try:
        handles = [engine.submit(GenerationRequest(messages=SHORT, max_tokens=3)) for _ in range(2)]
        go.set()
        assert [list(h)[-1].finish_reason for h in handles] == ["abort", "abort"]
        with pytest.raises(EngineClosed):
            engine.submit(GenerationRequest(messages=SHORT))
    finally:
        engine.shutdown()
