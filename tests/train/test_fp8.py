"""FP8 training (issue 21): formats, the FP8 linear against torch._scaled_mm, COAT's activation flow,
the FP8 AdamW with range expansion, measured memory, config errors, and trainer runs."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from nvila.train.cli import main
from nvila.train.config import TrainConfigError, load_config
from nvila.train.fp8 import (E4M3, E5M2, FP8MLP, FP8Linear, FP8RMSNorm, SavedBytes, apply_precision, fake_quantize,
                             fp8_linear, quantize)
from nvila.train.fp8_adamw import AdamWFP8, expand_dequantize, expand_quantize, plain_dequantize, plain_quantize

from trainkit import make_image_data, tiny_ckpts  # noqa: F401 (fixtures)

rel = lambda a, b: ((a.float() - b.float()).norm() / b.float().norm()).item()  # noqa: E731


# ------------------------------------------------------------------------------------------ formats
def test_quantize_dequantize_known_values():
    x = torch.tensor([448.0, -448.0, 1.0, 0.0, 0.5, 240.0, 250.0])
    assert torch.equal(fake_quantize(x, E4M3), torch.tensor([448.0, -448.0, 1.0, 0.0, 0.5, 240.0, 256.0]))
    q = quantize(torch.tensor([57344.0, 3.0, -1.25]), E5M2)
    assert q.data.dtype == E5M2 and q.scale.item() == 1.0
    assert torch.equal(q.dequantize(), torch.tensor([57344.0, 3.0, -1.25]))
    assert q.data.element_size() == 1
    torch.manual_seed(0)
    x = torch.randn(4096)
    e4, e5 = rel(fake_quantize(x, E4M3), x), rel(fake_quantize(x, E5M2), x)
    assert 0.005 < e4 < 0.04 and 0.02 < e5 < 0.08 and e4 < e5  # 3 vs 2 mantissa bits


def test_group16_beats_per_tensor_on_outlier_rows():
    torch.manual_seed(0)
    x = torch.randn(64, 256)
    x[::8] *= 1e4  # outlier rows
    per_tensor, per_group = rel(fake_quantize(x, E4M3), x), rel(fake_quantize(x, E4M3, 16), x)
    small = x.abs() < 5  # the ordinary rows: per-tensor scaling pushes them into E4M3's subnormals
    err = lambda y: ((y - x)[small].norm() / x[small].norm()).item()  # noqa: E731
    assert per_group <= per_tensor
    assert err(fake_quantize(x, E4M3, 16)) < 0.5 * err(fake_quantize(x, E4M3))
    q = quantize(x, E4M3, 16)
    assert q.nbytes == x.numel() + x.numel() // 16 * 4  # 1 byte + a float32 scale per 16


def test_range_expansion_beats_plain_e4m3_on_lognormal_second_moments():
    torch.manual_seed(0)
    for sigma in (0.5, 1.0, 2.0):
        v = torch.exp(torch.randn(256 * 128) * sigma) * 1e-6  # Adam exp_avg_sq-like
        expanded = expand_dequantize(*expand_quantize(v), v.shape)
        plain = plain_dequantize(*plain_quantize(v), v.shape)
        e_exp, e_plain = ((expanded - v).abs() / v).mean().item(), ((plain - v).abs() / v).mean().item()
        assert e_exp < e_plain, (sigma, e_exp, e_plain)
        if sigma <= 1.0:  # narrow groups get k >= 2: at least twice as precise
            assert e_exp < 0.6 * e_plain, (sigma, e_exp, e_plain)
    zeros = torch.zeros(300)
    assert torch.equal(expand_dequantize(*expand_quantize(zeros), zeros.shape), zeros)


# ------------------------------------------------------------------------------------------- linear
def test_fp8_linear_matches_scaled_mm_forward_and_backward():
    torch.manual_seed(0)
    x = torch.randn(2, 24, 64, requires_grad=True)
    w = (torch.randn(48, 64) * 0.05).requires_grad_()
    y = fp8_linear(x, w)
    g = torch.randn_like(y)
    y.backward(g)
    qx, qw = quantize(x.reshape(-1, 64), E4M3), quantize(w, E4M3)
    ref = torch._scaled_mm(qx.data, qw.data.t(), scale_a=qx.scale, scale_b=qw.scale, out_dtype=torch.float32)
    assert torch.allclose(y.reshape(-1, 48), ref, rtol=1e-5, atol=1e-5)  # same FP8 inputs, fp32 accumulation
    qg = quantize(g.reshape(-1, 48), E5M2)
    dx = torch._scaled_mm(qg.data, qw.data.t().contiguous().t(), scale_a=qg.scale, scale_b=qw.scale,
                          out_dtype=torch.float32)
    dw = torch._scaled_mm(qg.data.t().contiguous(), qx.data.t().contiguous().t(), scale_a=qg.scale,
                          scale_b=qx.scale, out_dtype=torch.float32)
    assert torch.allclose(x.grad.reshape(-1, 64), dx, rtol=1e-5, atol=1e-5)
    assert torch.allclose(w.grad, dw, rtol=1e-5, atol=1e-5)
    x2, w2 = x.detach().requires_grad_(), w.detach().requires_grad_()
    F.linear(x2, w2).backward(g)  # and within FP8 rounding of the float32 layer
    assert rel(y, F.linear(x2, w2)) < 0.06 and rel(x.grad, x2.grad) < 0.1 and rel(w.grad, w2.grad) < 0.1


def test_fp8_linear_saves_the_fp8_input_and_no_weight_copy():
    x = torch.randn(4, 96, requires_grad=True)
    w = torch.nn.Parameter(torch.randn(80, 96) * 0.05)
    with SavedBytes([w]) as saved:
        y = fp8_linear(x, w)
    assert saved.bytes == 4 * 96 + 4  # 1 byte per input element + its float32 scale; the weight is re-quantized
    y.sum().backward()  # backward's FP8 weight is the forward's: the gradient matches quantizing it by hand
    qx, qw = quantize(x.detach(), E4M3), quantize(w.detach(), E4M3)
    qg = quantize(torch.ones(4, 80), E5M2)
    assert torch.equal(x.grad, qg.dequantize(torch.float32) @ qw.dequantize(torch.float32))
    assert torch.equal(w.grad, qg.dequantize(torch.float32).t() @ qx.dequantize(torch.float32))


def test_fp8_modules_keep_names_and_use_high_precision_in_eval():
    from transformers.models.qwen2.modeling_qwen2 import Qwen2DecoderLayer

    from nvila.llm import hf_config
    from nvila.tiny import _LLM

    torch.manual_seed(0)
    cfg = hf_config(_LLM, vocab_size=50)
    layer = Qwen2DecoderLayer(cfg, 0)
    holder = torch.nn.Module()
    holder.layers = torch.nn.ModuleList([layer])
    names = [n for n, _ in holder.named_parameters()]
    x = torch.randn(1, 8, cfg.hidden_size)
    rope = (torch.ones(1, 8, cfg.hidden_size // cfg.num_attention_heads),) * 2
    with torch.no_grad():
        before = layer(x, position_embeddings=rope)
    assert apply_precision(holder, "fp8-coat", min_features=0) == {"fp8_linears": 7, "fp8_activations": 3}
    assert [n for n, _ in holder.named_parameters()] == names
    assert isinstance(layer.self_attn.q_proj, FP8Linear) and isinstance(layer.mlp, FP8MLP)
    assert isinstance(layer.input_layernorm, FP8RMSNorm)
    with torch.no_grad():
        assert torch.equal(layer(x, position_embeddings=rope), before)  # eval/no-grad: plain path
    assert apply_precision(torch.nn.Module(), "fp32", 0) == {"fp8_linears": 0, "fp8_activations": 0}
    big = torch.nn.Module()
    big.layers = torch.nn.ModuleList([Qwen2DecoderLayer(cfg, 0)])
    assert apply_precision(big, "fp8-linear", min_features=3584)["fp8_linears"] == 0  # the reference's threshold


# ------------------------------------------------------------------------------------------- AdamW
def test_adamw_fp8_tracks_fp32_adamw_on_regression():
    torch.manual_seed(0)
    x, w_true = torch.randn(256, 32), torch.randn(32, 8)
    y = x @ w_true + 0.01 * torch.randn(256, 8)

    def run(make):
        torch.manual_seed(1)
        lin = torch.nn.Linear(32, 8)
        opt = make([{"params": [lin.weight], "lr": 1e-2, "weight_decay": 0.01},
                    {"params": [lin.bias], "lr": 5e-3, "weight_decay": 0.0}])
        losses = []
        for _ in range(200):
            loss = F.mse_loss(lin(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses.append(loss.item())
        return losses, lin.weight.detach()

    ref, w_ref = run(lambda g: torch.optim.AdamW(g))
    fp8, w_fp8 = run(lambda g: AdamWFP8(g))
    assert max(abs(a - b) / a for a, b in zip(ref, fp8)) < 0.12  # every step within 12 % of fp32 AdamW
    assert rel(w_fp8, w_ref) < 0.05 and fp8[-1] < 0.05 * fp8[0]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_adamw_fp8_chunked_step_is_bit_identical(monkeypatch, dtype):
    """The step runs in chunks of whole groups (bounded temporaries); chunks of 2 groups, with a ragged
    last group, give exactly the parameters and states of one pass."""
    import nvila.train.fp8_adamw as fa

    def run(chunk):
        monkeypatch.setattr(fa, "CHUNK", chunk)
        torch.manual_seed(0)
        params = [torch.nn.Parameter(torch.randn(*shape).to(dtype)) for shape in ((37, 139), (1000,), (3,))]
        opt = AdamWFP8(params, lr=1e-2, weight_decay=0.1)
        for _ in range(4):
            for q in params:
                q.grad = (torch.randn(q.shape) * 10 ** torch.randn(())).to(dtype)
            opt.step()
        return params, opt

    (p1, o1), (p2, o2) = run(1 << 30), run(2 * fa.GROUP)
    for a, b in zip(p1, p2):
        assert torch.equal(a, b)
        assert all(torch.equal(o1.state[a][k].float(), o2.state[b][k].float()) for k in o1.state[a])


def test_adamw_fp8_state_is_fp8_and_survives_state_dict(tmp_path):
    torch.manual_seed(0)
    p = torch.nn.Parameter(torch.randn(1000))
    opt = AdamWFP8([p], lr=1e-2)
    for _ in range(3):
        p.grad = torch.randn(1000)
        opt.step()
    st = opt.state[p]
    assert st["exp_avg"].dtype == E4M3 and st["exp_avg_sq"].dtype == E4M3 and st["exp_avg"].numel() == 1024
    torch.save(opt.state_dict(), tmp_path / "o.pt")
    q = torch.nn.Parameter(p.detach().clone())
    opt2 = AdamWFP8([q], lr=1e-2)
    opt2.load_state_dict(torch.load(tmp_path / "o.pt", weights_only=True))
    for k, v in st.items():
        assert opt2.state[q][k].dtype == v.dtype and torch.equal(opt2.state[q][k].float(), v.float()), k
    g = torch.randn(1000)
    p.grad, q.grad = g, g.clone()
    opt.step()
    opt2.step()
    assert torch.equal(p, q)


# ------------------------------------------------------------------------------------------- memory
def _small_llm(precision: str, layers: int = 2):
    """A Qwen2 with Qwen2-1.5B's proportions scaled down: hidden 256, MLP 1408 (5.5x), 8/2 heads."""
    from dataclasses import replace

    from nvila.llm import build_llm
    from nvila.tiny import _LLM

    torch.manual_seed(0)
    llm = build_llm(replace(_LLM, vocab_size=512, hidden_size=256, intermediate_size=1408, num_hidden_layers=layers,
                            num_attention_heads=8, num_key_value_heads=2))
    apply_precision(llm, precision, min_features=0)
    return llm.train()


def _measure(precision: str, optim: str) -> tuple[int, int, float]:
    """(saved-activation bytes of one forward, optimizer-state bytes after one step, loss) at T=1024.

    A sequence long enough for the activations to dominate the fixed head and loss, as in training."""
    llm = _small_llm(precision)
    ids = torch.randint(0, 512, (1, 1024), generator=torch.Generator().manual_seed(0))
    with SavedBytes(llm) as saved:
        logits = llm(input_ids=ids).logits
    loss = F.cross_entropy(logits[0, :-1], ids[0, 1:])
    loss.backward()
    params = list(llm.parameters())
    opt = AdamWFP8(params) if optim == "adamw_fp8" else torch.optim.AdamW(params)
    opt.step()
    state = sum(v.numel() * v.element_size() for st in opt.state.values() for v in st.values() if torch.is_tensor(v))
    return saved.bytes, state, loss.item()


def test_measured_memory_fp8_coat_with_adamw_fp8():
    act32, opt32, loss32 = _measure("fp32", "adamw")
    act_lin, _, _ = _measure("fp8-linear", "adamw")
    act8, opt8, loss8 = _measure("fp8-coat", "adamw_fp8")
    assert opt8 <= 0.3 * opt32, (opt8, opt32)
    assert act8 <= 0.5 * act32, (act8, act32)
    assert act8 < act_lin < act32
    print(f"T=1024 saved activations: fp32 {act32:,} B, fp8-linear {act_lin:,} B, fp8-coat {act8:,} B "
          f"({act8 / act32:.2f}x); optimizer state: adamw {opt32:,} B, adamw_fp8 {opt8:,} B ({opt8 / opt32:.2f}x)")
    assert abs(loss8 - loss32) < 0.05 * loss32


@pytest.mark.parametrize("precision", ["fp32", "fp8-linear", "fp8-coat"])
def test_dry_run_activation_count_matches_measured_bytes_per_layer(precision):
    """``nvila train --dry-run``'s itemised per-token count of a decoder layer's saved bytes against the
    measured difference between a 2- and a 1-layer model (same tokens), within 5 %."""
    from nvila.train.memory import _layer_bytes_per_token

    ids = torch.randint(0, 512, (1, 256), generator=torch.Generator().manual_seed(0))
    measured = []
    for layers in (1, 2):
        llm = _small_llm(precision, layers)
        with SavedBytes(llm) as saved:
            llm(input_ids=ids)
        measured.append(saved.bytes)
    per_layer = measured[1] - measured[0]
    counted = 256 * _layer_bytes_per_token(llm.config, precision, 4, 0)
    assert abs(counted - per_layer) <= 0.05 * per_layer, (counted, per_layer)


# ------------------------------------------------------------------------------------------- config
@pytest.mark.parametrize("overrides, message", [
    (["model.precision=fp9"], "model.precision: 'fp9' is not valid"),
    (["model.precision=bf16", "model.dtype=float32"], "model.precision=bf16 computes in bfloat16 but model.dtype=float32"),
    (["model.precision=fp8-coat", "model.dtype=float16"], "model.dtype=float16 is not supported"),
    (["model.precision=fp8-linear", "model.device=mps"], "model.device=mps has none"),
    (["model.precision=fp8-linear", "model.llm=lora", "model.quantize_llm=nf4"], "model.quantize_llm=nf4"),
    (["model.precision=fp8-linear", "dist.strategy=fsdp2"], "dist.strategy=fsdp2"),
    (["optim.name=adamw_fp9"], "optim.name: 'adamw_fp9' is not valid"),
])
def test_bad_fp8_config_is_one_clear_error(overrides, message):
    with pytest.raises(TrainConfigError, match=message.replace("(", r"\(")):
        load_config("finetune_lora", overrides)
    load_config("finetune_lora", ["model.precision=fp8-coat", "optim.name=adamw_fp8"])  # LoRA-only params: fine


# ------------------------------------------------------------------------------------------ trainer
STEPS = 6


def _args(ckpt, mixture, out, precision, optim, *extra):
    return ["--config", "nvila_stage3_pretrain", f"model.path={ckpt}", f"data.mixture={mixture}",
            f"run.output_dir={out}", "model.dtype=float32", f"model.precision={precision}",
            "model.fp8_min_features=0", f"optim.name={optim}", "model.gradient_checkpointing=false",
            "model.llm=full", "optim.lr.llm=2e-3", "optim.lr.projector=2e-3", "optim.global_batch_size=2",
            "optim.micro_batch_size=1", f"optim.max_steps={STEPS}", "optim.warmup_ratio=0.2", "run.save_every=2",
            "run.keep_last=2", "run.progress=false", "--threads", "1", *extra]


def _metrics(out: Path) -> list[dict]:
    return [json.loads(ln) for ln in (out / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def fp8_data(tmp_path_factory):
    return make_image_data(tmp_path_factory.mktemp("fp8data"), 4)


@pytest.mark.slow
def test_fp8_coat_resume_continues_exactly(tiny_ckpts, fp8_data, tmp_path):
    ckpt = tiny_ckpts["nvila"]
    ref, out = tmp_path / "ref", tmp_path / "run"
    assert main(_args(ckpt, fp8_data, ref, "fp8-coat", "adamw_fp8")) == 0
    assert main(_args(ckpt, fp8_data, out, "fp8-coat", "adamw_fp8", "run.stop_after=3")) == 0
    assert main(_args(ckpt, fp8_data, out, "fp8-coat", "adamw_fp8", "--resume")) == 0
    a, b = [m["loss"] for m in _metrics(ref)], [m["loss"] for m in _metrics(out)]
    assert len(b) == STEPS and max(abs(x - y) for x, y in zip(a, b)) <= 1e-6, (a, b)
    states = _metrics(ref)[-1]["state_bytes"]
    assert states["optimizer"] < 0.3 * 2 * states["params"]  # FP8 moments, against two float32 moments


@pytest.mark.slow
@pytest.mark.parametrize("precision, optim", [("fp32", "adamw"), ("fp8-linear", "adamw"),
                                              ("fp8-coat", "adamw_fp8")])
def test_smoke_each_precision_trains_and_infers(tiny_ckpts, fp8_data, tmp_path, precision, optim, capsys):
    from nvila.cli import main as nvila_main

    out = tmp_path / "run"
    args = _args(tiny_ckpts["nvila"], fp8_data, out, precision, optim, "optim.max_steps=10", "run.save_every=10")
    assert main(args) == 0
    losses = [m["loss"] for m in _metrics(out)]
    assert len(losses) == 10 and losses[-1] < losses[0], losses
    assert all(m["saved_bytes"] > 0 for m in _metrics(out))  # measured per step (saved-tensor hooks)
    image = next((fp8_data.parent / "images").glob("*.png"))
    assert nvila_main(["infer", "--model", str(out / "checkpoint-0000010"), "--media", str(image),
                       "--text", "Describe the image.", "--max-new-tokens", "4", "--threads", "1"]) == 0
