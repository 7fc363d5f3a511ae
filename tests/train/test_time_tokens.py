"""Time tokens end to end: a checkpoint without them gets 8, trains on localization records with the
smoothed loss, saves, reloads, and ``nvila infer`` answers in seconds of the clip (slow: a training run)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from nvila.cli import main as nvila_main
from nvila.config import NVILAConfig
from nvila.processor import NVILAProcessor
from nvila.train.cli import main

from trainkit import tiny_ckpts  # noqa: F401 (fixture)

ASSETS = Path(__file__).resolve().parents[2] / "assets"
STEPS = 40


@pytest.mark.slow
def test_add_time_tokens_train_reload_and_answer_in_seconds(tiny_ckpts, tmp_path, capsys):
    media = tmp_path / "data" / "media"
    media.mkdir(parents=True)
    shutil.copy(ASSETS / "example.mp4", media / "clip.mp4")
    record = {"video": "clip.mp4", "duration": 7.0,
              "conversations": [{"from": "human", "value": "<video>\nWhen does it flash?"},
                                {"from": "gpt", "value": "<2.0> <5.0>"}]}
    (tmp_path / "data" / "rtl.jsonl").write_text(json.dumps(record) + "\n", encoding="utf-8")
    mixture = tmp_path / "data" / "mixture.yaml"
    mixture.write_text("datasets:\n  - name: rtl\n    path: rtl.jsonl\n    media_root: media\n", encoding="utf-8")
    out = tmp_path / "run"
    args = ["--config", "nvila_stage3_pretrain", f"model.path={tiny_ckpts['nvila-video']}",
            f"data.mixture={mixture}", f"run.output_dir={out}", "model.dtype=float32", "model.llm=full",
            "model.gradient_checkpointing=false", "model.num_time_tokens=8", "optim.loss=soft_ce",
            "optim.lr.llm=3e-3", "optim.lr.projector=3e-3", "optim.global_batch_size=1", "optim.micro_batch_size=1",
            f"optim.max_steps={STEPS}", "optim.warmup_ratio=0.1", f"run.save_every={STEPS}", "run.progress=false",
            "--threads", "2"]
    assert main(args) == 0
    losses = [json.loads(ln)["loss"] for ln in (out / "metrics.jsonl").read_text().splitlines()]
    assert len(losses) == STEPS and losses[-1] < 0.5 * losses[0]

    final = sorted(out.glob("checkpoint-*"))[-1]
    cfg = NVILAConfig.from_pretrained(final)
    processor = NVILAProcessor.from_pretrained(final)
    first = processor.tokenizer.convert_tokens_to_ids("<t0>")
    assert cfg.num_time_tokens == 8 and cfg.time_token_ids == tuple(range(first, first + 8))
    assert json.loads((final / "config.json").read_text())["soft_ce_std"] == 1.0

    code = nvila_main(["infer", "--model", str(final), "--media", str(media / "clip.mp4"), "--text",
                       "When does it flash?", "--max-new-tokens", "8", "--json"])
    report = json.loads(capsys.readouterr().out)
    assert code == 0
    duration = report["media"][0]["frames"] and processor.prepare(
        [[{"role": "user", "content": [{"type": "video", "video": str(media / "clip.mp4")}]}]])[1][0][0].duration_s
    assert report["segments"], report["answer"]
    assert all(0 <= s <= duration for seg in report["segments"] for s in seg)
    assert "<t" not in report["answer"]
