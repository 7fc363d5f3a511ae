"""SynthVILA through the trainer's data loader, and ``nvila eval`` end to end on a tiny random checkpoint."""

from __future__ import annotations

import argparse
import json

import pytest
import torch

from nvila.data import synthetic as S
from nvila.eval import cli as eval_cli
from nvila.eval import evaluate, normalise, to_markdown
from nvila.processor import NVILAProcessor
from nvila.tiny import build_tiny_checkpoint
from nvila.train.data import IGNORE_INDEX, MixtureDataset, SampleEncoder, SampleStream, load_mixture


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    tok = S.build_synth_tokenizer(vocab_size=400)
    return build_tiny_checkpoint(tmp_path_factory.mktemp("ckpt") / "synth", "nvila", seed=0, tokenizer=tok)


def test_every_family_loads_through_the_trainer(ckpt, tmp_path):
    data = tmp_path / "data"
    lines = ["datasets:"]
    for family in S.FAMILIES:
        opts = {"canvas": (448, 448)} if S.FAMILIES[family].kind == "image" else {}
        S.generate(family, 2, data, 0, **opts)
        lines.append(f"  - {{name: {family}, path: data/{family}.jsonl}}")
    (tmp_path / "mix.yaml").write_text("\n".join(lines) + "\n")
    dataset = MixtureDataset(load_mixture(tmp_path / "mix.yaml"))
    assert len(dataset) == 2 * len(S.FAMILIES)
    processor = NVILAProcessor.from_pretrained(ckpt)
    stream = SampleStream(dataset, SampleEncoder(processor, 8192), shuffle=False)
    samples = stream.take(len(dataset))
    assert not stream.skipped  # no bad samples
    tok = processor.tokenizer
    for (record, _), s in zip((dataset[i] for i in range(len(dataset))), samples):
        answer = tok.decode(s.labels[s.labels != IGNORE_INDEX].tolist())
        assert answer == record["conversations"][1]["value"] + "<|im_end|>"
        kind = S.FAMILIES[record["meta"]["family"]].kind
        if kind in ("video", "localization"):
            assert s.pixel_values_videos is not None and s.video_num_frames
        else:
            assert s.pixel_values is not None
            assert (s.input_ids == processor.ids.image).any()


def test_normalise():
    assert normalise("  Red.\n") == "red"
    assert normalise("RED  blue\tgreen") == "red blue green"


def _run_cli(argv):
    parser = argparse.ArgumentParser()
    eval_cli.add_arguments(parser)
    return eval_cli.run(parser.parse_args(argv))


def test_cli_on_a_family_name(ckpt, tmp_path, capsys):
    md = tmp_path / "out.md"
    torch.manual_seed(0)
    assert _run_cli(["--model", str(ckpt), "--task", "coarse_colour", "--limit", "3", "--json",
                     "--max-new-tokens", "4", "--markdown", str(md)]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["n"] == 3 and 0.0 <= result["accuracy"] <= 1.0
    assert set(result["families"]) == {"coarse_colour"}
    assert result["task"] == "coarse_colour"
    assert all(s["answer"] in S.COLOURS for s in result["samples"])
    assert md.read_text() == to_markdown(result)
    assert "| coarse_colour | 3 |" in md.read_text()


def test_evaluate_mixed_jsonl_groups_by_family_and_honours_limit(ckpt, tmp_path):
    a = S.generate("video_count", 2, tmp_path, 1)
    b = S.generate("compare_count", 2, tmp_path, 1)
    mixed = tmp_path / "mixed.jsonl"
    mixed.write_text(a.read_text() + b.read_text())
    result = evaluate(ckpt, mixed, limit=3, max_new_tokens=3, progress=False)
    assert result["n"] == 3
    assert {k: v["n"] for k, v in result["families"].items()} == {"video_count": 2, "compare_count": 1}
    for f in result["families"].values():
        assert 0.0 <= f["accuracy"] <= 1.0 and f["accuracy"] == f["correct"] / f["n"]


def test_cli_rejects_an_unknown_task(ckpt):
    with pytest.raises(ValueError, match="families: all, fine_code"):
        _run_cli(["--model", str(ckpt), "--task", "nope", "--limit", "1"])
    with pytest.raises(ValueError, match="--limit must be >= 1"):
        _run_cli(["--model", str(ckpt), "--task", "coarse_count", "--limit", "0"])


def test_cli_all_families_prints_a_markdown_table(ckpt, capsys):
    assert _run_cli(["--model", str(ckpt), "--task", "all", "--limit", "1", "--max-new-tokens", "2",
                     "--no-progress"]) == 0
    out = capsys.readouterr().out
    qa = [f for f in S.FAMILIES if S.FAMILIES[f].kind != "localization"]
    for family in qa:
        assert f"| {family} | 1 |" in out
    assert f"| **all** | {len(qa)} |" in out
    assert "| video_localize | 1 | 1 |" in out  # the localization table: n, videos, mIoU, P@0.5


def test_evaluate_reports_a_record_without_an_answer(ckpt, tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"id": "x", "conversations": [{"from": "human", "value": "hi"}]}) + "\n")
    with pytest.raises(ValueError, match="record 0 \\(x\\): cannot evaluate \\(no answer\\)"):
        evaluate(ckpt, bad, progress=False)


@pytest.mark.slow
def test_engine_batch_sizes_agree_with_generate(ckpt, tmp_path):
    """Batched engine answers are the answers of one sample at a time and of ``model.generate``."""
    from nvila import NVILAForConditionalGeneration, NVILAProcessor
    from nvila.eval import _prompt_and_answer

    split = S.generate("coarse_colour", 5, tmp_path, 3)
    one, many = (evaluate(ckpt, split, max_new_tokens=4, batch_size=b, progress=False) for b in (1, 4))
    assert [s["prediction"] for s in one["samples"]] == [s["prediction"] for s in many["samples"]]
    processor, model = NVILAProcessor.from_pretrained(ckpt), NVILAForConditionalGeneration.from_pretrained(ckpt)
    messages, _ = _prompt_and_answer(json.loads(split.read_text().splitlines()[0]), split.parent)
    inputs, _ = processor.prepare([messages], add_generation_prompt=True)
    ids = model.generate(**inputs, max_new_tokens=4)
    assert processor.decode(ids[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True).strip() == \
        one["samples"][0]["prediction"]
    with pytest.raises(ValueError, match="--batch-size must be >= 1"):
        _run_cli(["--model", str(ckpt), "--task", "coarse_count", "--batch-size", "0"])


# ------------------------------------------------------------------------ temporal localization
class _ScriptedHandle:
    def __init__(self, text, media):
        self._text, self.media = text, media

    def text(self):
        return self._text


class _ScriptedEngine:
    """Answers each request with the next scripted text; its one video lasts 10 s unless told."""

    def __init__(self, answers, duration):
        self.answers, self.duration = list(answers), duration

    def submit(self, request):
        from nvila.processor import MediumInfo

        return _ScriptedHandle(self.answers.pop(0), [MediumInfo("video", "v", 1, 1, 1, duration_s=self.duration)])

    def shutdown(self):
        pass


def test_localization_records_get_miou_and_precision(tmp_path, monkeypatch):
    from nvila.engine import Engine

    frames = tmp_path / "clip"
    frames.mkdir()
    records = [
        {"id": "a", "video": "clip", "segment": [2, 4], "meta": {"family": "when"},
         "conversations": [{"from": "human", "value": "<video>\nWhen?"}, {"from": "gpt", "value": "<2> <4>"}]},
        {"id": "b", "video": "clip", "segment": [2, 4], "meta": {"family": "when"},
         "conversations": [{"from": "human", "value": "<video>\nWhen?"}, {"from": "gpt", "value": "<2> <4>"}]},
        {"id": "c", "video": "other", "segment": [0, 5], "duration": 20.0, "meta": {"family": "when"},
         "conversations": [{"from": "human", "value": "<video>\nWhen?"}, {"from": "gpt", "value": "<0> <5>"}]},
        {"id": "d", "video": "clip", "meta": {"family": "colour"},
         "conversations": [{"from": "human", "value": "<video>\nColour?"}, {"from": "gpt", "value": "red"}]},
    ]
    (tmp_path / "other").mkdir()
    task = tmp_path / "task.jsonl"
    task.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    answers = ["from <4> to <2>", "no idea", "<0> <30> <1>", "Red."]  # sorted; whole clip; clamped to 20
    monkeypatch.setattr(Engine, "from_pretrained", classmethod(lambda cls, *a, **k: _ScriptedEngine(answers, 10.0)))
    result = evaluate("unused", task, progress=False)
    when = result["families"]["when"]
    # per video: clip -> IoUs 1.0 (a) and 0.2 ([0, 10] vs [2, 4], b); other -> [0, 20] vs [0, 5] = 0.25 (c)
    assert when["miou"] == pytest.approx(((1.0 + 0.2) / 2 + 0.25) / 2)
    assert when["p_at_0.5"] == pytest.approx((0.5 + 0.0) / 2) and when["videos"] == 2
    assert result["families"]["colour"] == {"n": 1, "correct": 1, "accuracy": 1.0}
    assert [s.get("predicted") for s in result["samples"]] == [[2.0, 4.0], [0.0, 10.0], [0.0, 20.0], None]
    table = to_markdown(result)
    assert "| when | 3 | 2 | 0.425 | 0.250 |" in table and "| colour | 1 | 1 | 1.000 |" in table


def test_a_malformed_segment_is_one_clear_error(tmp_path):
    (tmp_path / "clip").mkdir()
    record = {"video": "clip", "segment": [5, 1],
              "conversations": [{"from": "human", "value": "<video>\nWhen?"}, {"from": "gpt", "value": "<1> <5>"}]}
    task = tmp_path / "task.jsonl"
    task.write_text(json.dumps(record) + "\n", encoding="utf-8")
    with pytest.raises(ValueError, match="segment must be"):
        evaluate("unused", task, progress=False)
