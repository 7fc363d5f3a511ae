"""Parity of the hf layout: the golden cases through a checkpoint converted by ``nvila convert``
give the same inputs and bitwise the same logits as through the original vila checkpoint."""

from __future__ import annotations

import pytest
import torch

from nvila import NVILAForConditionalGeneration, NVILAProcessor
from nvila_testing import golden_case, golden_messages

# The text case in the default tier; the media cases (vision tower on 448-px tiles) are slow.
CASES = ["nvila__text", *(pytest.param(c, marks=pytest.mark.slow)
                          for c in ("nvila__image", "nvila-lite__image", "nvila-video__video"))]


@pytest.mark.parametrize("name", CASES)
def test_hf_copy_has_the_original_logits(name, tiny_checkpoints, tiny_hf_checkpoints):
    case, _ = golden_case(name)
    outputs = []
    for path in (tiny_checkpoints[case["variant"]], tiny_hf_checkpoints[case["variant"]]):
        processor = NVILAProcessor.from_pretrained(path)
        model = NVILAForConditionalGeneration.from_pretrained(path, torch_dtype=torch.float32)
        inputs, _ = processor.prepare([golden_messages(case)], add_generation_prompt=True)
        with torch.no_grad():
            outputs.append((inputs, model(**inputs).logits))
    (vila_inputs, vila_logits), (hf_inputs, hf_logits) = outputs
    assert vila_inputs.keys() == hf_inputs.keys()
    for key, value in vila_inputs.items():
        assert torch.equal(value, hf_inputs[key]) if torch.is_tensor(value) else value == hf_inputs[key]
    assert torch.equal(vila_logits, hf_logits)
