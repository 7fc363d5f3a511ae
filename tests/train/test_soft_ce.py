"""The smoothed time-token loss (``optim.loss: soft_ce``): its value, its limits, and packing."""

from __future__ import annotations

import math

import pytest
import torch

from nvila.train.config import TrainConfigError
from nvila.train.data import IGNORE_INDEX
from nvila.train.parts import LOSSES, LossContext, token_ce

TIME = (5, 6, 7, 8)  # four time tokens with contiguous ids in a vocabulary of 10


def _loss(sigma=1.0):
    return LOSSES["soft_ce"](LossContext(TIME, sigma))


def test_value_against_a_hand_computed_example():
    logits = torch.tensor([[[0.0] * 10, [0.1 * v for v in range(10)], [0.0] * 10]])  # (1, 3, 10)
    labels = torch.tensor([[IGNORE_INDEX, 6, 2]])  # target time token <t1> (id 6), then an ordinary token
    got = _loss(1.0)(logits, labels)  # (1, 2)
    row = [0.1 * v for v in range(10)]
    lse = math.log(sum(math.exp(x) for x in [0.0] * 10))
    w = [math.exp(-((k - 1) ** 2) / 2) for k in range(4)]
    q = [x / sum(w) for x in w]
    want_time = -sum(qk * (0.0 - lse) for qk in q)  # position 0's logits are all zero
    lse1 = math.log(sum(math.exp(x) for x in row))
    want_hard = lse1 - row[2]
    assert got[0, 0].item() == pytest.approx(want_time, abs=1e-6)
    assert got[0, 1].item() == pytest.approx(want_hard, abs=1e-6)


def test_a_tiny_sigma_is_the_hard_cross_entropy_and_other_targets_are_untouched():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 9, 10, generator=g)
    labels = torch.randint(0, 10, (3, 9), generator=g)
    labels[:, :2] = IGNORE_INDEX
    assert torch.allclose(_loss(1e-4)(logits, labels), token_ce(logits, labels), atol=1e-5)
    plain = labels.clone()
    plain[(plain >= 5) & (plain <= 8)] = 1  # no time targets: soft CE is the token CE at any sigma
    assert torch.allclose(_loss(3.0)(logits, plain), token_ce(logits, plain), atol=1e-5)


def test_wider_sigma_moves_mass_to_the_neighbours():
    logits = torch.zeros(1, 2, 10)
    logits[0, 0, 6] = 4.0  # confident in <t1>
    labels = torch.tensor([[IGNORE_INDEX, 6]])
    narrow, wide = _loss(0.5)(logits, labels).sum(), _loss(2.0)(logits, labels).sum()
    assert narrow < wide  # a confident exact answer pays more when the target is spread out


def test_packed_equals_padded():
    """Per-position losses: two sequences side by side in one packed row give the padded rows' sum."""
    g = torch.Generator().manual_seed(1)
    a_logits, b_logits = torch.randn(1, 6, 10, generator=g), torch.randn(1, 4, 10, generator=g)
    a_labels = torch.tensor([[IGNORE_INDEX, 3, 6, 7, 8, 1]])
    b_labels = torch.tensor([[IGNORE_INDEX, 5, 9, 6]])
    padded_logits = torch.cat([a_logits, torch.cat([b_logits, torch.zeros(1, 2, 10)], 1)])
    padded_labels = torch.cat([a_labels, torch.cat([b_labels, torch.full((1, 2), IGNORE_INDEX)], 1)])
    packed_logits = torch.cat([a_logits, b_logits], 1)
    packed_labels = torch.cat([a_labels, b_labels], 1)  # b's first label is IGNORE: no loss across the seam
    loss = _loss(1.0)
    assert loss(packed_logits, packed_labels).sum().item() == pytest.approx(
        loss(padded_logits, padded_labels).sum().item(), abs=1e-5)


def test_soft_ce_needs_time_tokens():
    with pytest.raises(TrainConfigError, match="num_time_tokens"):
        LOSSES["soft_ce"](LossContext((), 1.0))
    with pytest.raises(TrainConfigError, match="soft_ce_std"):
        LOSSES["soft_ce"](LossContext(TIME, 0.0))
