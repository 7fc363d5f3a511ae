"""Samples -> ids and labels through the inference processor; mixtures; bad samples are skipped and counted."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest

from nvila.processor import NVILAProcessor
from nvila.timetokens import ensure_time_tokens
from nvila.train.config import TrainConfigError
from nvila.train.data import (IGNORE_INDEX, BadSample, MixtureDataset, SampleEncoder, SampleStream,
                              assistant_labels, load_mixture)

ASSETS = Path(__file__).resolve().parents[2] / "assets"

from trainkit import image_mixture, make_image_data, tiny_ckpts, video_mixture  # noqa: F401 (fixtures)


@pytest.fixture(scope="module")
def processor(tiny_ckpts):
    return NVILAProcessor.from_pretrained(tiny_ckpts["nvila-video"])


def test_labels_are_assistant_tokens_and_closing_im_end(processor, image_mixture):
    ds = MixtureDataset(load_mixture(image_mixture))
    enc = SampleEncoder(processor, 4096)
    record, root = ds[0]  # two turns
    s = enc(record, root)
    tok = processor.tokenizer
    supervised = s.labels[s.labels != IGNORE_INDEX].tolist()
    assert tok.decode(supervised) == "A red circle on a white background.<|im_end|>A circle.<|im_end|>"
    assert (s.labels[s.input_ids == processor.ids.image] == IGNORE_INDEX).all()  # media never supervised
    # the ids are exactly the inference processor's for the same conversation
    conv = [{"role": "user", "content": [{"type": "image", "image": str(root / "0.png")},
                                         {"type": "text", "text": "Describe the image."}]},
            {"role": "assistant", "content": "A red circle on a white background."},
            {"role": "user", "content": "And the shape?"}, {"role": "assistant", "content": "A circle."}]
    ids, _ = processor.prepare([conv], add_generation_prompt=False)
    assert ids["input_ids"][0].tolist() == s.input_ids.tolist()
    assert s.pixel_values.shape[0] == 1


def test_assistant_labels_on_ids():
    header, stop = [1, 2], {9}
    ids = [5, 1, 2, 7, 8, 9, 4, 1, 2, 6, 9, 4]
    assert assistant_labels(ids, header, stop) == [-100, -100, -100, 7, 8, 9, -100, -100, -100, 6, 9, -100]


def test_bad_samples_are_skipped_and_counted(processor, tmp_path):
    mixture = make_image_data(tmp_path, 4, bad=3)
    ds = MixtureDataset(load_mixture(mixture))
    records = [json.loads(ln) for ln in (tmp_path / "shapes.jsonl").read_text().splitlines()]
    records.append({"image": "0.png", "conversations": [{"from": "human", "value": "word " * 400},
                                                        {"from": "gpt", "value": "ok"}]})
    (tmp_path / "shapes.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    ds = MixtureDataset(load_mixture(mixture))
    stream = SampleStream(ds, SampleEncoder(processor, 500), shuffle=False)
    good = stream.take(4)
    assert len(good) == 4
    stream.take(1)  # wraps into the next epoch, after every bad sample was met once
    assert dict(stream.skipped) == {"missing media": 1, "unreadable media": 1, "empty answer": 1, "too long": 1}


def test_mixture_repeat_and_fraction(tmp_path):
    make_image_data(tmp_path, 8)
    mix = tmp_path / "mix.yaml"
    mix.write_text("datasets:\n  - {name: a, path: shapes.jsonl, media_root: images, repeat: 3}\n"
                   "  - {name: b, path: shapes.jsonl, media_root: images, fraction: 0.5}\n")
    ds = MixtureDataset(load_mixture(mix), seed=1)
    assert len(ds) == 3 * 8 + 4
    assert ds[0][0] == ds[8][0]
    mix.write_text("datasets:\n  - {name: a, path: shapes.jsonl, repeat: 0}\n")
    with pytest.raises(TrainConfigError, match="repeat must be an integer"):
        load_mixture(mix)


def test_stream_splits_a_global_batch_identically(processor, image_mixture):
    """With no bad samples, 2 ranks x 2 together read the same 4 samples as 1 rank x 4."""
    ds = MixtureDataset(load_mixture(image_mixture))
    enc = SampleEncoder(processor, 4096)
    one = SampleStream(ds, enc, seed=3).take(4)
    two = SampleStream(ds, enc, rank=0, world=2, seed=3).take(2) + SampleStream(ds, enc, rank=1, world=2,
                                                                                  seed=3).take(2)
    key = lambda s: tuple(s.input_ids.tolist())  # noqa: E731
    assert sorted(map(key, one)) == sorted(map(key, two))


# ---------------------------------------------------------------------------------- time tokens
@pytest.fixture(scope="module")
def timed_processor(tiny_ckpts):
    """The tiny video checkpoint's processor with 8 time tokens (added at load)."""
    processor = NVILAProcessor.from_pretrained(tiny_ckpts["nvila-video"])
    cfg = replace(processor.config, num_time_tokens=8)
    ensure_time_tokens(processor.tokenizer, 8)
    return NVILAProcessor(processor.tokenizer, cfg)


def _timed_record(answer, **extra):
    return {"video": "example.mp4", "conversations": [{"from": "human", "value": "<video>\nWhen does it flash?"},
                                                      {"from": "gpt", "value": answer}], **extra}


def test_timestamps_become_time_tokens_with_the_clamp_counted(timed_processor):
    enc = SampleEncoder(timed_processor, 8192)
    tok = timed_processor.tokenizer
    s = enc(_timed_record("From <1.4> to <7> then <99>.", duration=7.0), ASSETS)
    supervised = tok.decode(s.labels[s.labels != IGNORE_INDEX].tolist())
    assert supervised == "From <t1> to <t7> then <t7>.<|im_end|>"  # round(1.4 / 7 * 7) = 1; 99 s clamps to 7
    assert s.fixes == {"clamped timestamp": 1}
    first = tok.convert_tokens_to_ids("<t0>")
    assert set(s.labels[(s.labels >= first) & (s.labels < first + 8)].tolist()) == {first + 1, first + 7}
    # without a declared duration, the file's own: frames / rate
    own = enc(_timed_record("At <0> and <100>."), ASSETS)
    assert tok.decode(own.labels[own.labels != IGNORE_INDEX].tolist()) == "At <t0> and <t7>.<|im_end|>"


@pytest.mark.parametrize("record, reason", [
    ({"conversations": [{"from": "human", "value": "When?"}, {"from": "gpt", "value": "<1> <2>"}]},
     "timestamps without one video"),
    (_timed_record("<1> <2>", duration=0), "bad video duration"),
])
def test_records_with_unusable_timestamps_are_skipped_with_a_reason(timed_processor, record, reason):
    with pytest.raises(BadSample) as e:
        SampleEncoder(timed_processor, 8192)(record, ASSETS)
    assert e.value.reason == reason
