"""Parity with the reference implementation on the golden cases (tests/assets/golden).

Criteria (golden README): identical sequence length and per-medium embedding lengths, identical ids
outside media spans, max |Δ| <= 1e-4 on the last two prompt positions' logits and on every medium's
embedding rows (float32), identical greedy ids.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from nvila_testing import golden_case, golden_messages as _messages
from nvila import NVILAForConditionalGeneration, NVILAProcessor

CASES = ["nvila__text", "nvila__image", "nvila-lite__image", "nvila-video__video"]
TOL = 1e-4


@pytest.fixture(scope="module")
def loaded(tiny_checkpoints):
    cache = {}

    def get(variant):
        if variant not in cache:
            path = tiny_checkpoints[variant]
            cache[variant] = (NVILAProcessor.from_pretrained(path),
                              NVILAForConditionalGeneration.from_pretrained(path, torch_dtype=torch.float32))
        return cache[variant]

    return get


@pytest.mark.parametrize("name", CASES)
def test_golden_case(name, loaded):
    case, arrays = golden_case(name)
    processor, model = loaded(case["variant"])
    messages = _messages(case)

    assert processor.apply_chat_template(messages, add_generation_prompt=True) == case["prompt_text"]
    inputs, infos = processor.prepare([messages], add_generation_prompt=True)
    ids = inputs["input_ids"][0]

    # 1. token counts and block sizes
    assert ids.shape[0] == case["seq_len"]
    assert [i.num_tokens for i in infos[0]] == case["embed_lengths"]
    got_blocks = [list(i.block_size) if i.block_size else None for i in infos[0]]
    assert got_blocks == [b for b in case["block_sizes"]] or (not case["block_sizes"] and not got_blocks)

    # 2. ids outside the media spans
    expected_ids = torch.tensor(case["expanded_input_ids"])
    outside = torch.ones_like(ids, dtype=torch.bool)
    for m in case["media"]:
        outside[m["embed_offset"]:m["embed_offset"] + m["embed_length"]] = False
    assert torch.equal(ids[outside], expected_ids[outside])

    # pixel sums per medium (the exact u8 tiles are checked in tests/unit/test_tiling.py)
    pixel_rows = {"image": 0, "video": 0}
    for m, info in zip(case["media"], infos[0]):
        key = "pixel_values" if m["type"] == "image" else "pixel_values_videos"
        n = m["pixel_shape"][0]
        px = inputs[key][pixel_rows[m["type"]]:pixel_rows[m["type"]] + n]
        pixel_rows[m["type"]] += n
        assert list(px.shape) == m["pixel_shape"]
        assert px.double().sum().item() == pytest.approx(m["pixel_sum"], abs=1e-3)

    with torch.no_grad():
        # 3a. media embeddings: the rows that replace each placeholder
        embeds = model.embed(inputs["input_ids"], inputs.get("pixel_values"), inputs.get("image_block_sizes"),
                             inputs.get("pixel_values_videos"), inputs.get("video_num_frames"))[0]
        for i, m in enumerate(case["media"]):
            span = embeds[m["embed_offset"]:m["embed_offset"] + m["embed_length"]]
            err = (span - torch.from_numpy(arrays[f"media_embeds_{i}"])).abs().max().item()
            assert err <= TOL, f"medium {i}: max |Δ| {err:.2e}"
        # 3b. logits of the last two prompt positions
        logits = model(**inputs).logits[0, -2:]
        err = (logits - torch.from_numpy(arrays["logits_last2"])).abs().max().item()
        assert logits.shape[-1] == arrays["logits_last2"].shape[-1]
        assert err <= TOL, f"logits max |Δ| {err:.2e}"

    # 4. greedy ids
    out = model.generate(**inputs, max_new_tokens=case["max_new_tokens"], do_sample=False)
    new = out[0, ids.shape[0]:].tolist()
    assert new == case["generated_ids"]
    assert processor.decode(new) == case["generated_text"]


def test_argmax_agrees_where_margin_is_clear(loaded):
    """Debugging aid from the golden README, used as a check on the text case (27 positions)."""
    case, _ = golden_case("nvila__text")
    processor, model = loaded("nvila")
    inputs = processor.apply_chat_template(_messages(case), add_generation_prompt=True, tokenize=True,
                                           return_dict=True, return_tensors="pt")
    with torch.no_grad():
        argmax = model(**inputs).logits[0].argmax(-1).numpy()
    margin = np.array(case["argmax_margin"])
    clear = margin > 1e-3
    assert clear.sum() > 20
    assert (argmax[clear] == np.array(case["argmax"])[clear]).all()
