"""Packing: one row, positions reset, block-diagonal causal mask; the loss equals the padded token mean."""

from __future__ import annotations

import pytest
import torch

from trainkit import image_mixture, tiny_ckpts  # noqa: F401 (fixtures)
from nvila.model import NVILAForConditionalGeneration
from nvila.processor import NVILAProcessor
from nvila.train.data import IGNORE_INDEX, MixtureDataset, SampleEncoder, load_mixture
from nvila.train.packing import block_causal_mask, pack, pad, use_packed_attention


def test_block_causal_mask():
    m = block_causal_mask([2, 3])[0, 0]
    expect = torch.tensor([[1, 0, 0, 0, 0], [1, 1, 0, 0, 0], [0, 0, 1, 0, 0], [0, 0, 1, 1, 0], [0, 0, 1, 1, 1]])
    assert torch.equal(m, expect.bool())


@pytest.mark.slow  # ~11 s of forward + backward both ways
def test_packed_loss_equals_unpacked_token_mean(tiny_ckpts, image_mixture):
    ckpt = tiny_ckpts["nvila"]  # dynamic-S2: several tiles and a block size per image
    torch.manual_seed(0)
    processor = NVILAProcessor.from_pretrained(ckpt)
    model = NVILAForConditionalGeneration.from_pretrained(ckpt)
    ds = MixtureDataset(load_mixture(image_mixture))
    enc = SampleEncoder(processor, 4096)
    samples = [enc(*ds[i]) for i in (0, 1)]
    lengths = [s.input_ids.numel() for s in samples]
    assert len(set(lengths)) == 2  # different lengths, so padding is really exercised

    packed = pack(samples)
    assert packed["input_ids"].shape == (1, sum(lengths))
    assert packed["image_block_sizes"] == samples[0].image_block_sizes + samples[1].image_block_sizes
    starts = torch.tensor([0, lengths[0]])
    assert (packed["position_ids"][0, starts] == 0).all()
    assert (packed["labels"][0, starts] == IGNORE_INDEX).all()
    padded = pad(samples, processor.ids.pad)
    with torch.no_grad():
        labels = packed.pop("labels")
        logits = model(**packed).logits[0, :-1]  # (T-1, V)
        loss_packed = torch.nn.functional.cross_entropy(logits, labels[0, 1:], ignore_index=IGNORE_INDEX,
                                                        reduction="sum") / (labels[0, 1:] != IGNORE_INDEX).sum()
        loss_padded = model(**padded).loss  # model.forward: token mean over the padded batch
        use_packed_attention(model.llm)  # per-sample SDPA instead of the dense masked product
        logits_seg = model(**packed).logits[0, :-1]
        loss_padded_after = model(**padded).loss  # 2-D masks still go through transformers' SDPA
    assert abs(loss_packed.item() - loss_padded.item()) <= 1e-5
    assert (logits_seg - logits).abs().max() <= 1e-4
    assert abs(loss_padded_after.item() - loss_padded.item()) <= 1e-6
