"""The published-layout writer and the tiny builders: save -> load gives the same model."""

from __future__ import annotations

import json

import pytest
import torch

from nvila import NVILAConfig, NVILAForConditionalGeneration, NVILAProcessor
from nvila.checkpoint import save_pretrained
from nvila.tiny import TINY_FAMILIES, build_tiny_checkpoint, build_tokenizer


@pytest.fixture(scope="module")
def tokenizer():
    return build_tokenizer()


def test_tokenizer_has_nvila_specials_and_single_newline(tokenizer):
    for t in ("<|im_start|>", "<|im_end|>", "<image>", "<vila/video>", "<vila/sentinel>", "[PAD]"):
        assert len(tokenizer(t, add_special_tokens=False).input_ids) == 1
    assert len(tokenizer("\n", add_special_tokens=False).input_ids) == 1
    assert tokenizer.eos_token == "<|im_end|>" and tokenizer.pad_token == "[PAD]"


@pytest.mark.parametrize("family", sorted(TINY_FAMILIES))
def test_save_load_round_trip(family, tokenizer, tmp_path):
    path = build_tiny_checkpoint(tmp_path / family, family, seed=3, tokenizer=tokenizer)
    assert sorted(p.name for p in path.iterdir()) == ["config.json", "llm", "mm_projector", "vision_tower"]
    top = json.loads((path / "config.json").read_text())
    assert top["model_type"] == "llava_llama" and top["mm_projector_cfg"]["mm_projector_type"] == TINY_FAMILIES[family]["projector_type"]
    model = NVILAForConditionalGeneration.from_pretrained(path)
    # saving the loaded model again reproduces the config and every tensor
    again = save_pretrained(model, NVILAProcessor.from_pretrained(path).tokenizer, tmp_path / "again")
    assert NVILAConfig.from_pretrained(again) == NVILAConfig.from_pretrained(path)
    reloaded = NVILAForConditionalGeneration.from_pretrained(again)
    for (k, a), (_, b) in zip(model.state_dict().items(), reloaded.state_dict().items()):
        assert torch.equal(a, b), k
    processor = NVILAProcessor.from_pretrained(again)
    conv = [{"role": "user", "content": [{"type": "image", "image": _image()}, {"type": "text", "text": "What is this?"}]}]
    inputs = processor.apply_chat_template(conv, add_generation_prompt=True, tokenize=True, return_dict=True,
                                           return_tensors="pt")
    with torch.no_grad():
        assert torch.equal(model(**inputs).logits, reloaded(**inputs).logits)


def _image():
    from PIL import Image

    return Image.new("RGB", (500, 300), (10, 200, 30))


def test_failed_save_leaves_nothing_behind(tokenizer, tmp_path):
    path = build_tiny_checkpoint(tmp_path / "ok", "nvila-lite", tokenizer=tokenizer)
    model = NVILAForConditionalGeneration.from_pretrained(path)

    class Broken:
        def save_pretrained(self, _):
            raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        save_pretrained(model, Broken(), tmp_path / "out")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ok"]
