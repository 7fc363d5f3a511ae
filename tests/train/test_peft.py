"""Trainability per component, LoRA through peft in one model tree, NF4 base weights, merging."""

from __future__ import annotations

import torch
from torch import nn

from trainkit import image_mixture, tiny_ckpts  # noqa: F401 (fixtures)
from nvila.model import NVILAForConditionalGeneration
from nvila.train.config import ModelSection
from nvila.train.peft import NF4Linear, apply_trainability, component_parameters, merged_copy


def test_nf4_linear_is_close_and_4_bit():
    torch.manual_seed(0)
    lin = nn.Linear(96, 40)
    q = NF4Linear.from_linear(lin, block_size=64)
    assert q.codes.dtype == torch.uint8 and q.codes.numel() == 96 * 40 // 2
    w = q.dequantize()
    rel = (w - lin.weight).norm() / lin.weight.norm()
    assert rel < 0.12  # 4-bit NormalFloat on a uniform init
    x = torch.randn(3, 96)
    assert torch.allclose(q(x), x @ w.T + lin.bias, atol=1e-5)


def test_layernorm_mode_trains_only_norms(tiny_ckpts):
    model = NVILAForConditionalGeneration.from_pretrained(tiny_ckpts["nvila-lite"])
    apply_trainability(model, ModelSection(vision="layernorm", projector="full", llm="frozen"))
    names = [n for n, _ in component_parameters(model)["vision"]]
    assert names and all(("layer_norm" in n or "post_layernorm" in n) for n in names)
    assert not component_parameters(model)["llm"]


def test_lora_merge_gives_the_published_tree_and_same_logits(tiny_ckpts):
    ckpt = tiny_ckpts["nvila-video"]
    model = NVILAForConditionalGeneration.from_pretrained(ckpt)
    keys = set(model.state_dict())
    cfg = ModelSection(vision="layernorm", projector="full", llm="lora", quantize_llm="nf4")
    cfg.lora.r, cfg.lora.dropout = 4, 0.0
    torch.manual_seed(0)
    apply_trainability(model, cfg)
    llm = [n for n, _ in component_parameters(model)["llm"]]
    assert llm and all("lora_" in n for n in llm)
    assert any(isinstance(m, NF4Linear) for m in model.llm.modules())
    assert "lm_head" not in " ".join(llm)
    with torch.no_grad():  # make the adapters non-trivial
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.02)
    merged = merged_copy(model)
    assert set(merged.state_dict()) == keys  # published key layout, no adapter keys
    assert any(isinstance(m, NF4Linear) for m in model.llm.modules())  # the training model is untouched
    ids = torch.tensor([[300, 17, 42, 99, 250]])  # plain text tokens (the specials are ids 0-7)
    model.eval()
    with torch.no_grad():
        assert torch.allclose(model(ids).logits, merged(ids).logits, atol=1e-4)
