"""Quantized tiny checkpoints end to end: quantize, save, reload, run; bad input leaves nothing behind."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from nvila import NVILAForConditionalGeneration, NVILAProcessor
from nvila.checkpoint import CheckpointError, load_tokenizer, save_pretrained
from nvila.cli import main as nvila_main
from nvila.quant import cli as quant_cli
from nvila.quant.calib import CalibrationError
from nvila.quant.format import METADATA_KEY, component_metadata, read_quant_metadata
from nvila.quant.handler import Calibration, QuantPlan, quantize_checkpoint, quantize_model
from nvila.quant.linear import W4A16Linear, W8A8Linear
from nvila.tiny import build_tiny_checkpoint

INPUTS = Path(__file__).resolve().parents[1] / "assets" / "golden" / "inputs"
IMAGE = str(INPUTS / "image_1000x700.png")
VIDEO = str(INPUTS / "video_37f")
FAMILIES = ("nvila", "nvila-lite", "nvila-video")
# Relative L2 error of all prompt logits, quantized vs fp32, on the tiny random checkpoints. Measured
# 0.02-0.05 (W8A8 tower/projector + W4A16 or W8A8 LLM); a scrambled or unscaled weight gives ~1.0. The
# bound leaves 2x headroom for seeds and platforms while still catching any broken kernel or fold.
LOGIT_RELERR = 0.10
CALIB = ["--calib-samples", "4", "--calib-seq-len", "64", "--calib-tiles", "2", "--search-tokens", "128"]


def _quantize(src, out, *flags):
    p = argparse.ArgumentParser()
    quant_cli.add_arguments(p)
    return quant_cli.run(p.parse_args(["--model", str(src), "--out", str(out), *CALIB, *flags]))


def _prompt(family):
    medium = {"type": "video", "video": VIDEO} if family == "nvila-video" else {"type": "image", "image": IMAGE}
    return [[{"role": "user", "content": [medium, {"type": "text", "text": "Describe it."}]}]]


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """{family: (fp32 path, quantized path, plan flags)}; the W8A8-LLM variant also quantizes lm_head."""
    root = tmp_path_factory.mktemp("quant")
    flags = {"nvila": ("--vision", "w8a8", "--projector", "w8a8", "--llm", "w4a16"),
             "nvila-lite": ("--vision", "w8a8", "--projector", "w8a8", "--llm", "w8a8", "--lm-head", "w8a8"),
             "nvila-video": ("--vision", "w8a8", "--llm", "w4a16", "--calib-images", IMAGE)}
    out = {}
    for fam in FAMILIES:
        src = build_tiny_checkpoint(root / fam, fam)
        assert _quantize(src, root / f"{fam}-q", *flags[fam]) == 0
        out[fam] = (src, root / f"{fam}-q")
    return out


@pytest.mark.parametrize("family", FAMILIES)
def test_quantized_checkpoint_reloads_runs_and_stays_close(checkpoints, family):
    src, qpath = checkpoints[family]
    meta = read_quant_metadata(qpath)
    assert set(meta) >= {"llm", "vision_tower"}
    processor = NVILAProcessor.from_pretrained(src)
    ref, quant = NVILAForConditionalGeneration.from_pretrained(src), NVILAForConditionalGeneration.from_pretrained(qpath)
    swapped = {n for n, m in quant.named_modules() if isinstance(m, (W8A8Linear, W4A16Linear))}
    declared = {f"{c}.{m}" for c, mods in meta.items() for m in mods}
    assert swapped == declared and len(swapped) > 10
    assert isinstance(quant.llm.model.embed_tokens, torch.nn.Embedding)  # embeddings stay float
    inputs, _ = processor.prepare(_prompt(family), add_generation_prompt=True)
    with torch.no_grad():
        a, b = ref(**inputs).logits, quant(**inputs).logits
    relerr = float((b - a).norm() / a.norm())
    print(f"{family}: logits relative error {relerr:.4f}, argmax agreement "
          f"{float((a.argmax(-1) == b.argmax(-1)).float().mean()):.3f}")
    assert 0 < relerr < LOGIT_RELERR
    ids = quant.generate(**inputs, max_new_tokens=4)
    assert ids.shape[1] > inputs["input_ids"].shape[1]


def test_save_reload_generate_identical_ids(tmp_path):
    src = build_tiny_checkpoint(tmp_path / "fp", "nvila-lite")
    model = NVILAForConditionalGeneration.from_pretrained(src)
    tok = load_tokenizer(src / "llm")
    calib = Calibration(tokens=torch.randint(0, 300, (2, 32)), tiles=torch.randn(2, 3, 448, 448), search_tokens=64)
    quantize_model(model, QuantPlan(vision="w8a8", projector="w8a8", llm="w4a16"), calib)
    meta = {n: component_metadata(getattr(model, n)) for n in ("llm", "vision_tower", "mm_projector")}
    out = save_pretrained(model, tok, tmp_path / "q", component_metadata=meta)
    with safe_open(out / "llm" / "model.safetensors", framework="pt") as f:
        spec = json.loads(f.metadata()[METADATA_KEY])["modules"]["model.layers.0.mlp.down_proj"]
    assert spec == {"scheme": "w4a16", "group_size": 128, "bias": False, "input_scale": False}
    reloaded = NVILAForConditionalGeneration.from_pretrained(out)
    inputs, _ = NVILAProcessor.from_pretrained(src).prepare(_prompt("nvila-lite"), add_generation_prompt=True)
    assert torch.equal(model.generate(**inputs, max_new_tokens=6), reloaded.generate(**inputs, max_new_tokens=6))


@pytest.mark.parametrize("family", FAMILIES)
def test_nvila_infer_runs_a_quantized_checkpoint(checkpoints, family, capsys):
    _, qpath = checkpoints[family]
    media = VIDEO if family == "nvila-video" else IMAGE
    code = nvila_main(["infer", "--model", str(qpath), "--media", media, "--text", "What is it?",
                       "--max-new-tokens", "3", "--json"])
    assert code == 0
    assert json.loads(capsys.readouterr().out)["new_tokens"] >= 1


# --------------------------------------------------------------------------------------- bad input
def _leftovers(parent, name):
    return [p.name for p in parent.iterdir() if p.name == name or p.name.startswith(f".{name}.")]


def test_unknown_scheme_is_rejected():
    with pytest.raises(ValueError, match="unknown llm quantization scheme 'w3a16'; valid: none, w8a8, w4a16"):
        QuantPlan(llm="w3a16")
    with pytest.raises(ValueError, match="nothing to quantize"):
        QuantPlan()
    parser = argparse.ArgumentParser()
    quant_cli.add_arguments(parser)
    with pytest.raises(SystemExit):  # argparse lists the valid choices on stderr
        parser.parse_args(["--model", "x", "--out", "y", "--vision", "w4a16"])


def test_too_short_calibration_leaves_no_output(checkpoints, tmp_path):
    src, _ = checkpoints["nvila"]
    calib = tmp_path / "short.jsonl"
    calib.write_text(json.dumps({"text": "only a few words"}) + "\n")
    with pytest.raises(CalibrationError, match="too short: .* tokens, but 4 samples x 64 tokens"):
        _quantize(src, tmp_path / "out", "--llm", "w4a16", "--calib", str(calib))
    assert _leftovers(tmp_path, "out") == []


def test_requantizing_is_rejected_and_leaves_no_output(checkpoints, tmp_path):
    _, qpath = checkpoints["nvila"]
    with pytest.raises(CheckpointError, match="already quantized"):
        quantize_checkpoint(qpath, tmp_path / "again", QuantPlan(vision="w8a8"))
    assert _leftovers(tmp_path, "again") == []


def test_output_must_not_be_the_input(checkpoints):
    src, _ = checkpoints["nvila"]
    with pytest.raises(CheckpointError, match="must differ"):
        quantize_checkpoint(src, src, QuantPlan(vision="w8a8"))


@pytest.mark.parametrize("family", FAMILIES)
def test_engine_runs_a_quantized_checkpoint_like_generate(checkpoints, family):
    """The engine (and so `nvila serve`) drives the swapped quantized linears: greedy ids equal generate's."""
    from nvila.engine import Engine, EngineConfig, GenerationRequest

    _, qpath, = checkpoints[family][:2]
    model, processor = NVILAForConditionalGeneration.from_pretrained(qpath), NVILAProcessor.from_pretrained(qpath)
    assert any(isinstance(m, (W4A16Linear, W8A8Linear)) for m in model.llm.modules())
    conv = _prompt(family)[0]
    inputs = processor.apply_chat_template(conv, add_generation_prompt=True, tokenize=True, return_dict=True,
                                           return_tensors="pt")
    ref = model.generate(**inputs, max_new_tokens=6)[0, inputs["input_ids"].shape[1]:].tolist()
    engine = Engine(model, processor, EngineConfig(max_batch_size=2))
    try:
        handle = engine.submit(GenerationRequest(messages=conv, max_tokens=6))
        handle.text()
    finally:
        engine.shutdown()
    assert handle.token_ids == ref
