"""Recipe smoke runs: every stage config and the fine-tuning configs train a few steps on a tiny
checkpoint, the loss goes down, and the saved checkpoint loads and answers in ``nvila infer``."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from nvila.cli import main as nvila_main
from nvila.train.cli import main

from trainkit import image_mixture, make_image_data, tiny_ckpts, video_mixture  # noqa: F401 (fixtures)


# recipe -> (tiny family, extra overrides). Every run uses 1-tile images (Lite with max_tiles 1, or
# the video family's resize) to keep the CPU cost small; dynamic-S2 batches are covered by
# test_packing.py, which runs the tiny NVILA (dynamic-S2) model on a packed batch.
CASES = {
    "nvila_stage1_projector": ("nvila-lite", ["data.max_tiles=1"]),
    "nvila_stage2_vep": ("nvila-lite", ["data.max_tiles=1"]),
    "nvila_stage3_pretrain": ("nvila-video", []),
    "nvila_stage4_image_sft": ("nvila-lite", ["data.max_tiles=1"]),
    "nvila_stage5_video_sft": ("nvila-video", ["data.num_video_frames=8"]),
    "finetune_lora": ("nvila-lite", ["data.max_tiles=1", "model.lora.r=8"]),
    "finetune_qlora": ("nvila-video", ["model.lora.r=8"]),
}


@pytest.fixture(scope="module")
def small_mixture(tmp_path_factory):
    return make_image_data(tmp_path_factory.mktemp("smoke"), 2)


@pytest.mark.slow  # each trains 5 steps: ~60 s for the seven recipes
@pytest.mark.parametrize("recipe", list(CASES))
def test_recipe_smoke(recipe, tiny_ckpts, small_mixture, video_mixture, tmp_path, capsys):
    family, extra = CASES[recipe]
    mixture = video_mixture if "video" in recipe else small_mixture
    steps = 5
    out = tmp_path / "run"
    # The recipe as shipped, on tiny data: fixed batch (the whole tiny mixture), float32 on CPU.
    code = main(["--config", recipe, f"model.path={tiny_ckpts[family]}",
                 f"data.mixture={mixture}", f"run.output_dir={out}", "model.dtype=float32",
                 "optim.global_batch_size=2", "optim.micro_batch_size=1", f"optim.max_steps={steps}",
                 "run.save_every=2", "run.keep_last=1", "run.progress=false", "--threads", "2", *extra])
    assert code == 0
    losses = [json.loads(ln)["loss"] for ln in (out / "metrics.jsonl").read_text().splitlines()]
    assert len(losses) == steps
    assert losses[-1] < losses[0], losses
    ckpts = sorted(out.glob("checkpoint-*"))
    assert [p.name for p in ckpts] == [f"checkpoint-{steps:07d}"]  # keep_last=1
    image = next(Path(small_mixture).parent.glob("images/*.png"))
    capsys.readouterr()
    assert nvila_main(["infer", "--model", str(ckpts[-1]), "--media", str(image), "--text", "What is it?",
                       "--max-new-tokens", "3", "--json", "--threads", "2"]) == 0
    assert json.loads(capsys.readouterr().out)["new_tokens"] >= 1
