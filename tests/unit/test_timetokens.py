"""Time tokens: ids and order, the encode / decode rules, streaming, and the localization scorer."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from nvila import NVILAForConditionalGeneration, NVILAProcessor
from nvila.cli import generate_report
from nvila.tiny import build_tokenizer
from nvila.timetokens import (TimeTokenError, TimeTokenStream, decode_time_tokens, encode_timestamps,
                              ensure_time_tokens, iou, localization_scores, predicted_interval, segments)


def test_tokens_are_added_once_in_order_with_contiguous_ids():
    tok = build_tokenizer()
    before = len(tok)
    ids = ensure_time_tokens(tok, 8)
    assert ids == list(range(before, before + 8))
    assert tok.convert_ids_to_tokens(ids) == [f"<t{k}>" for k in range(8)]
    assert tok.encode("<t3><t7>", add_special_tokens=False) == [ids[3], ids[7]]
    assert not any(t in tok.all_special_tokens for t in tok.convert_ids_to_tokens(ids))  # regular tokens
    assert ensure_time_tokens(tok, 8) == ids and len(tok) == before + 8  # a tokenizer that holds them: as it is


def test_a_tokenizer_that_disagrees_with_num_time_tokens_is_refused():
    tok = build_tokenizer()
    ensure_time_tokens(tok, 4)
    with pytest.raises(TimeTokenError, match="holds 4 of the tokens"):
        ensure_time_tokens(tok, 8)
    with pytest.raises(TimeTokenError, match="num_time_tokens is 2 but the tokenizer holds 4 time tokens"):
        ensure_time_tokens(tok, 2)


def test_encode_rule_with_clamp():
    # N = 100, D = 20 s: round(s / 20 * 99)
    text, clamped = encode_timestamps("from <5> to <12.5>, then <25>", 20.0, 100)
    assert text == "from <t25> to <t62>, then <t99>" and clamped == 1  # 24.75 -> 25, 61.875 -> 62, 25 s clamps
    assert encode_timestamps("<0> <20>", 20.0, 100) == ("<t0> <t99>", 0)
    with pytest.raises(TimeTokenError, match="duration"):
        encode_timestamps("<1>", 0.0, 100)


def test_decode_rule_including_k_at_least_n():
    assert decode_time_tokens("<t0> <t50> <t99>", 20.0, 100) == "<0.0> <10.1> <20.0>"  # 50 * 20 / 99 = 10.10
    assert decode_time_tokens("<t3>", 7.0, 8) == "<3.0>"
    assert decode_time_tokens("<t8> <t120>", 7.333, 8) == "<7.33> <7.33>"  # k >= N -> the duration
    assert decode_time_tokens("no tokens <x>", 5.0, 8) == "no tokens <x>"
    assert decode_time_tokens("[T3]", 7.0, 8, fmt="[T{t}]") == "<3.0>"


def test_streamed_decoding_equals_decoding_the_whole_text():
    text = "It starts at <t2> and ends at <t5>; <t is not a token, nor <5>."
    for cut in (1, 2, 3, 7):
        stream = TimeTokenStream(7.0, 8)
        pieces = [stream.push(text[i:i + cut]) for i in range(0, len(text), cut)]
        assert "".join(pieces) + stream.flush() == decode_time_tokens(text, 7.0, 8)


def test_scorer_against_hand_computed_cases():
    assert predicted_interval("between <4.0> and <2.0>", 10) == (2.0, 4.0)
    assert predicted_interval("<-1> <12> <3>", 10) == (3.0, 10.0)  # "<-1>" is no timestamp; 12 clamps to 10
    assert predicted_interval("at <3>", 10) == (0.0, 10.0)  # fewer than two: the whole clip
    assert predicted_interval("malformed <a> <b>", 10) == (0.0, 10.0)
    assert iou((2, 4), (3, 5)) == pytest.approx(1 / 3)
    assert iou((0, 1), (2, 3)) == 0.0 and iou((1, 1), (1, 1)) == 0.0
    scores = localization_scores([
        ("v1", "<2> <4>", (2.0, 4.0), 10.0),  # IoU 1
        ("v1", "<0> <2>", (2.0, 4.0), 10.0),  # IoU 0
        ("v2", "<3> <5>", (2.0, 4.0), 10.0),  # IoU 1/3
    ])
    assert scores["miou"] == pytest.approx((0.5 + 1 / 3) / 2)  # mean over videos of per-video means
    assert scores["p_at_0.5"] == pytest.approx((0.5 + 0.0) / 2)
    assert segments("<1.5> <4> and <9> <7> <2>") == [[1.5, 4.0], [7.0, 9.0]]


# ------------------------------------------------------------------------------ on a checkpoint
REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def timed(tiny_checkpoints, tmp_path_factory) -> Path:
    """The tiny NVILA-8B-Video checkpoint with ``num_time_tokens: 8`` (its tokenizer lacks them)."""
    path = tmp_path_factory.mktemp("timed") / "nvila-video"
    shutil.copytree(tiny_checkpoints["nvila-video"], path)
    config = json.loads((path / "config.json").read_text())
    (path / "config.json").write_text(json.dumps({**config, "num_time_tokens": 8}))
    return path


class Force:
    """Forces the given ids, one per step."""

    def __init__(self, ids):
        self.ids = ids

    def __call__(self, generated, logits):
        logits.fill_(float("-inf"))
        logits[self.ids[len(generated)]] = 0.0
        return logits


def test_loading_adds_the_time_tokens_and_answers_come_back_in_seconds(timed):
    processor = NVILAProcessor.from_pretrained(timed)
    model = NVILAForConditionalGeneration.from_pretrained(timed)
    first = processor.tokenizer.convert_tokens_to_ids("<t0>")
    assert model.ids.vocab_size == len(processor.tokenizer) == first + 8
    messages = [{"role": "user", "content": [{"type": "video", "video": str(REPO / "assets" / "example.mp4")},
                                             {"type": "text", "text": "When does it flash?"}]}]
    inputs, infos = processor.prepare([messages])
    duration = infos[0][0].duration_s
    assert duration and duration > 0
    script = processor.tokenizer.encode("from <t2> to <t5>", add_special_tokens=False) + [model.ids.stop[0]]
    out = model.generate(**inputs, max_new_tokens=len(script), logits_processors=[[Force(script)]])
    new = out[0, inputs["input_ids"].shape[1]:]
    seconds = [round(2 * duration / 7, 2), round(5 * duration / 7, 2)]
    assert processor.decode(new, decode_time_tokens=duration) == f"from <{seconds[0]}> to <{seconds[1]}>"
    assert processor.batch_decode(new[None], decode_time_tokens=[None]) == ["from <t2> to <t5>"]
    report = generate_report(model, processor, inputs, infos[0], [messages[0]["content"][0]],
                             max_new_tokens=len(script), logits_processors=[[Force(script)]])
    assert report["segments"] == [seconds] and all(0 <= s <= duration for s in seconds)


def test_frame_directories_need_a_declared_frame_rate(timed, caplog):
    processor = NVILAProcessor.from_pretrained(timed)
    frames = [{"type": "video", "video": str(REPO / "assets" / "frames")}, {"type": "text", "text": "When?"}]
    _, infos = processor.prepare([[{"role": "user", "content": frames}]])
    assert infos[0][0].duration_s is None
    _, infos = processor.prepare([[{"role": "user", "content": frames}]], video_fps=4.0)
    n = len(list((REPO / "assets" / "frames").iterdir()))
    assert infos[0][0].duration_s == pytest.approx(n / 4.0)
    frames[0]["fps"] = 2.0  # the part's own declaration wins
    _, infos = processor.prepare([[{"role": "user", "content": frames}]], video_fps=4.0)
    assert infos[0][0].duration_s == pytest.approx(n / 2.0)
    frames[0]["fps"] = 0
    with pytest.raises(ValueError, match="fps"):
        processor.prepare([[{"role": "user", "content": frames}]])


def test_the_engine_streams_seconds(timed):
    from nvila.engine import Engine, EngineConfig, GenerationRequest

    engine = Engine.from_pretrained(timed, config=EngineConfig(max_batch_size=1, max_seq_len=4096))
    try:
        video = {"type": "video", "video": str(REPO / "assets" / "example.mp4")}
        script = engine.processor.tokenizer.encode("at <t1> and <t7> or <t3>", add_special_tokens=False)
        handle = engine.submit(GenerationRequest(messages=[{"role": "user", "content": [video, "When?"]}],
                                                 max_tokens=len(script), logits_processors=[Force(script)]))
        pieces = [ev.text for ev in handle]
        duration = handle.media[0].duration_s
        want = f"at <{round(duration / 7, 2)}> and <{round(duration, 2)}> or <{round(3 * duration / 7, 2)}>"
        assert "".join(pieces) == want
        assert not any("<t" in p for p in pieces)  # no piece carries a partial time token
        text_only = engine.submit(GenerationRequest(messages=[{"role": "user", "content": "When?"}],
                                                    max_tokens=len(script), logits_processors=[Force(script)]))
        assert text_only.text() == "at <t1> and <t7> or <t3>"  # no video: left as they are
    finally:
        engine.shutdown()
