"""Model-level behaviour on the tiny checkpoints: batching, caching, fusion checks, strict loading."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

from nvila_testing import CONFIGS, GOLDEN
from nvila import NVILAConfig, NVILAForConditionalGeneration, NVILAProcessor
from nvila.checkpoint import CheckpointError

IMAGE = str(GOLDEN / "inputs" / "image_1000x700.png")
VIDEO = str(GOLDEN / "inputs" / "video_37f")


@pytest.fixture(scope="module")
def nvila(tiny_checkpoints):
    path = tiny_checkpoints["nvila"]
    return NVILAProcessor.from_pretrained(path), NVILAForConditionalGeneration.from_pretrained(path)


@pytest.fixture(scope="module")
def lite(tiny_checkpoints):
    path = tiny_checkpoints["nvila-lite"]
    return NVILAProcessor.from_pretrained(path), NVILAForConditionalGeneration.from_pretrained(path)


def _user(*parts):
    return [{"role": "user", "content": list(parts)}]


def _text(t):
    return {"type": "text", "text": t}


def _image(x=IMAGE):
    return {"type": "image", "image": x}


@pytest.mark.slow  # ~11 s: full forwards of a 3 x 3094 padded batch; the engine and generate tests cover batch == alone fast
def test_batch_rows_equal_single_runs(nvila):
    """Left-padded batch: each row's logits and greedy ids equal those of the row run alone."""
    processor, model = nvila
    convs = [_user(_text("Hi")), _user(_image(Image.new("RGB", (300, 200), (200, 30, 30))), _text("What colour?")),
             _user(_text("A much longer question about mountains, rivers and winter."))]
    batch = processor.apply_chat_template(convs, add_generation_prompt=True, tokenize=True, return_dict=True,
                                          return_tensors="pt")
    assert batch["input_ids"].shape[0] == 3
    with torch.no_grad():
        batch_logits = model(**batch).logits[:, -1]
    batch_ids = model.generate(**batch, max_new_tokens=5)
    for i, conv in enumerate(convs):
        single = processor.apply_chat_template(conv, add_generation_prompt=True, tokenize=True, return_dict=True,
                                               return_tensors="pt")
        with torch.no_grad():
            logits = model(**single).logits[:, -1]
        assert (logits[0] - batch_logits[i]).abs().max().item() < 1e-4
        ids = model.generate(**single, max_new_tokens=5)
        n = single["input_ids"].shape[1]
        new_single = ids[0, n:].tolist()
        new_batch = batch_ids[i, batch["input_ids"].shape[1]:].tolist()[: len(new_single)]
        assert new_single == new_batch


def test_cached_decoding_equals_uncached_forward(nvila):
    processor, model = nvila
    inputs = processor.apply_chat_template(_user(_image(), _text("Describe.")), add_generation_prompt=True,
                                           tokenize=True, return_dict=True, return_tensors="pt")
    steps = []

    class Keep:
        def put(self, ids):
            steps.append(ids.clone())

        def end(self):
            pass

    out = model.generate(**inputs, max_new_tokens=6, streamer=Keep())
    assert len(steps) == out.shape[1] - inputs["input_ids"].shape[1]
    # every greedy step must be the argmax of the uncached forward over the whole sequence so far
    full = dict(inputs)
    full["input_ids"] = out
    full["attention_mask"] = torch.ones_like(out)
    with torch.no_grad():
        logits = model(**full).logits[0]
    n = inputs["input_ids"].shape[1]
    assert torch.equal(logits[n - 1:-1].argmax(-1), out[0, n:])

    # and the cached logits themselves match the uncached ones
    from transformers import DynamicCache

    cache = DynamicCache()
    with torch.no_grad():
        first = model(**inputs, cache=cache, use_cache=True)
        assert first.cache is cache
        step = model.llm(input_ids=out[:, n:n + 1], cache=cache, use_cache=True,
                         position_ids=torch.tensor([[n]]))
    assert (step.logits[0, -1] - logits[n]).abs().max().item() <= 1e-4


def test_generate_matches_transformers_decoding_bitwise(nvila):
    """The engine's decode steps (``llm.Runner``) behind ``model.generate`` give, for one row, the
    very logits of transformers' own forward with its cache, step by step."""
    from transformers import DynamicCache

    processor, model = nvila
    inputs = processor.apply_chat_template(_user(_image(), _text("Describe.")), add_generation_prompt=True,
                                           tokenize=True, return_dict=True, return_tensors="pt")
    seen = []
    n = inputs["input_ids"].shape[1]

    def keep(generated, logits):
        seen.append(logits.clone())
        return logits

    out = model.generate(**inputs, max_new_tokens=6, logits_processors=[[keep]])
    with torch.no_grad():
        cache = DynamicCache()
        ref = [model(**inputs, cache=cache, use_cache=True, logits_to_keep=1).logits[0, -1]]
        for pos in range(n, out.shape[1] - 1):
            ref.append(model.llm(input_ids=out[:, pos:pos + 1], position_ids=torch.tensor([[pos]]), cache=cache,
                                 attention_mask=torch.ones(1, pos + 1, dtype=torch.long), use_cache=True).logits[0, -1])
    assert len(seen) == len(ref) == out.shape[1] - n
    for a, b in zip(seen, ref):
        assert torch.equal(a, b.float())


def test_a_short_continuation_runs_its_linears_on_onednn_and_matches_the_module_path(nvila, monkeypatch):
    """A prefill after a reused prefix of at most CONTINUATION_ROWS tokens (a follow-up turn) runs
    float32 CPU linears through oneDNN; its logits and K/V match the modules' own to float rounding,
    and a whole prompt or a longer continuation keeps the modules (the bitwise test above)."""
    from nvila import llm as llm_module

    _, model = nvila
    runner = llm_module.Runner(model.llm, 1, 256)
    if not runner.onednn_continuations:
        pytest.skip(f"no oneDNN linear in this torch build (mkldnn available: {torch.backends.mkldnn.is_available()})")
    calls = []
    onednn = llm_module._onednn_linear
    monkeypatch.setattr(llm_module, "_onednn_linear", lambda m, x: (calls.append(x.shape[-2]), onednn(m, x))[1])
    embeds = model.llm.get_input_embeddings()(torch.arange(3, 3 + 150)[None] % model.llm.config.vocab_size)

    def run(split: int, onednn_on: bool):
        runner.onednn_continuations = onednn_on
        runner.prefill(0, embeds[:, :split])
        logits = runner.prefill(0, embeds[:, split:], start=split)
        return logits, runner.cache.k[:, 0, :, :150].clone()

    module_logits, module_k = run(120, False)
    assert calls == []
    logits, k = run(120, True)  # 30 new tokens: oneDNN
    assert calls and set(calls) == {30}
    torch.testing.assert_close(logits, module_logits, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(k, module_k, rtol=1e-4, atol=1e-5)
    calls.clear()
    run(150 - llm_module.CONTINUATION_ROWS - 1, True)  # one row too many: the modules
    runner.prefill(0, embeds)  # a whole prompt: the modules
    assert calls == []


def test_a_failing_onednn_linear_falls_back_to_the_modules_with_one_warning(nvila, monkeypatch, caplog):
    from nvila import llm as llm_module

    _, model = nvila
    runner = llm_module.Runner(model.llm, 1, 256)
    runner.onednn_continuations = True

    def broken(m, x):
        raise RuntimeError("could not create a primitive\nmore detail")

    monkeypatch.setattr(llm_module, "_onednn_linear", broken)
    embeds = model.llm.get_input_embeddings()(torch.arange(3, 3 + 40)[None] % model.llm.config.vocab_size)
    runner.prefill(0, embeds[:, :30])
    with caplog.at_level("WARNING", logger="nvila.llm"):
        got = runner.prefill(0, embeds[:, 30:], start=30)
        runner.prefill(0, embeds[:, 30:], start=30)
    assert runner.onednn_continuations is False
    assert [r.getMessage() for r in caplog.records] == [
        "oneDNN's linear failed (could not create a primitive); prefill continuations use the modules' linears"]
    runner.prefill(0, embeds[:, :30])
    torch.testing.assert_close(got, runner.prefill(0, embeds[:, 30:], start=30), rtol=0, atol=0)


def test_the_decode_graphs_step_over_a_fixed_masked_span_equals_the_eager_step(nvila):
    """CUDA graphs (``llm.DecodeGraphs``) replay ``Runner._decode`` over a power-of-two key span with
    the keys past each row's position masked; on the CPU that step is checked against the eager one,
    for rows at different positions, and so are the spans the graphs are keyed by."""
    from nvila import llm as llm_module

    _, model = nvila
    vocab = model.llm.config.vocab_size
    embeds = model.llm.get_input_embeddings()(torch.arange(5, 5 + 40)[None] % vocab)

    def step(graph_like: bool):
        runner = llm_module.Runner(model.llm, 2, 1024, attention="sdpa")
        runner.prefill(0, embeds[:, :40])
        runner.prefill(1, embeds[:, :25])
        tokens, positions = torch.tensor([7, 9]), [40, 25]
        if not graph_like:
            return runner.decode(tokens, positions), runner.cache.k[:, :2, :, :41].clone()
        pos, span = torch.tensor(positions), llm_module.DecodeGraphs(runner).span(41)
        logits = runner._decode(tokens, pos, span, torch.arange(span)[None] <= pos[:, None])
        return logits, runner.cache.k[:, :2, :, :41].clone()

    (eager, k_eager), (masked, k_masked) = step(False), step(True)
    torch.testing.assert_close(masked, eager, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(k_masked, k_eager, rtol=1e-5, atol=1e-5)  # layer 0 bitwise, later ones follow the sums
    graphs = llm_module.DecodeGraphs(llm_module.Runner(model.llm, 1, 1000))
    assert [graphs.span(n) for n in (1, 256, 257, 600, 999)] == [256, 256, 512, 1000, 1000]


def test_a_failing_decode_graph_falls_back_to_eager_with_one_warning(nvila, caplog):
    from nvila import llm as llm_module

    _, model = nvila
    runner = llm_module.Runner(model.llm, 1, 64)
    expected = llm_module.Runner(model.llm, 1, 64)

    class Broken:
        def run(self, *args):
            raise RuntimeError("operation not permitted when stream is capturing\ndetail")

    runner.graphs = Broken()
    embeds = model.llm.get_input_embeddings()(torch.arange(3, 3 + 10)[None] % model.llm.config.vocab_size)
    for r in (runner, expected):
        r.prefill(0, embeds)
    with caplog.at_level("WARNING", logger="nvila.llm"):
        got = runner.decode(torch.tensor([4]), [10])
        again = runner.decode(torch.tensor([5]), [11])
    assert runner.graphs is None
    assert [r.getMessage() for r in caplog.records] == [
        "CUDA graph decode failed (operation not permitted when stream is capturing); decoding eagerly"]
    torch.testing.assert_close(got, expected.decode(torch.tensor([4]), [10]), rtol=0, atol=0)
    torch.testing.assert_close(again, expected.decode(torch.tensor([5]), [11]), rtol=0, atol=0)


def test_prefill_leaves_cudnn_attention_out_on_cuda_only():
    """cuDNN's SDPA builds a plan per new shape (70 ms of TTFT per new prompt length on an H200):
    the prefill runs without it on CUDA, restores the flags after, and leaves the CPU as torch has it."""
    from nvila import llm as llm_module

    flags = torch.backends.cuda
    before = (flags.cudnn_sdp_enabled(), flags.flash_sdp_enabled(), flags.mem_efficient_sdp_enabled())
    with llm_module._sdpa_backends(torch.device("cuda")):
        assert (flags.cudnn_sdp_enabled(), flags.flash_sdp_enabled(), flags.mem_efficient_sdp_enabled()) == (
            False, True, True)
    with llm_module._sdpa_backends(torch.device("cpu")):
        assert (flags.cudnn_sdp_enabled(), flags.flash_sdp_enabled(), flags.mem_efficient_sdp_enabled()) == before
    assert (flags.cudnn_sdp_enabled(), flags.flash_sdp_enabled(), flags.mem_efficient_sdp_enabled()) == before


def test_generate_logits_processors_and_a_growing_cache(nvila):
    """Per-row processors steer each row and ``accept`` ends it; decoding past the first cache
    allocation (256 new positions) grows the cache without changing the ids."""
    processor, model = nvila
    convs = [_user(_text("Hi")), _user(_text("A longer question about rivers."))]
    batch = processor.apply_chat_template(convs, add_generation_prompt=True, tokenize=True, return_dict=True,
                                          return_tensors="pt")
    n = batch["input_ids"].shape[1]

    class Force:
        """Forces ``token`` every step and ends the row after ``count`` tokens."""

        def __init__(self, token, count):
            self.token, self.count, self.accepted = token, count, []

        def __call__(self, generated, logits):
            logits.fill_(float("-inf"))
            logits[self.token] = 0.0
            return logits

        def accept(self, token):
            self.accepted.append(token)
            return len(self.accepted) == self.count

    rows = [Force(40, 3), Force(41, 5)]
    out = model.generate(**batch, max_new_tokens=10, logits_processors=[[p] for p in rows])
    assert out.shape[1] == n + 5
    assert out[0, n:].tolist() == [40, 40, 40] + [model.ids.pad] * 2
    assert out[1, n:].tolist() == [41] * 5
    assert rows[0].accepted == [40] * 3 and rows[1].accepted == [41] * 5
    with pytest.raises(ValueError, match="one list per row"):
        model.generate(**batch, max_new_tokens=2, logits_processors=[[]])

    single = processor.apply_chat_template(convs[0], add_generation_prompt=True, tokenize=True, return_dict=True,
                                           return_tensors="pt")
    long = model.generate(**single, max_new_tokens=300, eos_token_id=[])  # no stop: all 300 tokens
    assert long.shape[1] == single["input_ids"].shape[1] + 300
    short = model.generate(**single, max_new_tokens=20, eos_token_id=[])
    assert torch.equal(long[:, :short.shape[1]], short)


def test_token_count_mismatch_raises_clear_error(nvila):
    processor, model = nvila
    inputs = processor.apply_chat_template(_user(_image(), _text("x")), add_generation_prompt=True, tokenize=True,
                                           return_dict=True, return_tensors="pt")
    ids = inputs["input_ids"].clone()
    ids[0, torch.nonzero(ids[0] == model.ids.image)[0, 0]] = 13  # drop one media token
    bad = dict(inputs, input_ids=ids)
    with pytest.raises(ValueError, match="image token count mismatch"):
        model(**bad)
    with pytest.raises(ValueError, match="no image pixels"):
        model(input_ids=inputs["input_ids"])


def test_multi_image_uses_single_tiles(nvila, lite):
    """Two images: no tiling, 256 (+1) tokens each on NVILA, 121 (+1) each on Lite, no "<image>\\n" rewrite."""
    for (processor, _), per in ((nvila, 257), (lite, 122)):
        conv = _user(_image(), _image(Image.new("L", (640, 480), 128)), _text("Compare."))
        inputs, infos = processor.prepare([conv])
        assert [i.num_tokens for i in infos[0]] == [per, per]
        assert inputs["pixel_values"].shape[0] == 2
        assert inputs["image_block_sizes"] == [None, None]
        text = processor.apply_chat_template(conv, add_generation_prompt=True)
        assert "<image><image>Compare." in text


def test_lite_image_at_end_drops_trailing_newline(lite):
    processor, model = lite
    first = processor.apply_chat_template(_user(_image(), _text("Q?")), add_generation_prompt=True)
    last = processor.apply_chat_template(_user(_text("Q?"), _image()), add_generation_prompt=True)
    assert first.count("<image>\n") == 7 and "<image>\nQ?" in first
    assert last.count("<image>") == 7 and "Q?" + "<image>\n" * 6 + "<image><|im_end|>" in last
    a, _ = processor.prepare([_user(_image(), _text("Q?"))])
    b, _ = processor.prepare([_user(_text("Q?"), _image())])
    assert b["input_ids"].shape[1] == a["input_ids"].shape[1] - 1


def test_multi_turn_and_system_prompt(nvila):
    processor, model = nvila
    conv = [{"role": "system", "content": "Be brief."},
            {"role": "user", "content": [_image(), _text("What is this?")]},
            {"role": "assistant", "content": "A picture."},
            {"role": "user", "content": "  And the colours?  "}]
    text = processor.apply_chat_template(conv, add_generation_prompt=True)
    assert text == ("<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\n<image>What is this?<|im_end|>\n"
                    "<|im_start|>assistant\nA picture.<|im_end|>\n<|im_start|>user\nAnd the colours?<|im_end|>\n"
                    "<|im_start|>assistant\n")
    inputs, infos = processor.prepare([conv])
    assert infos[0][0].block_size == (3, 4)  # one image in the whole conversation: dynamic-S2
    out = model.generate(**inputs, max_new_tokens=3)
    assert out.shape[1] > inputs["input_ids"].shape[1]


def test_video_on_image_models(nvila, lite):
    for (processor, model), per_frame in ((nvila, 257), (lite, 122)):
        inputs, infos = processor.prepare([_user({"type": "video", "video": VIDEO}, _text("What happens?"))])
        assert infos[0][0].num_tokens == 8 * per_frame
        assert infos[0][0].frame_indices == [0, 5, 10, 15, 21, 26, 31, 36]
        with torch.no_grad():
            assert torch.isfinite(model(**inputs).logits).all()


def test_tsp_rejects_frame_counts_that_do_not_divide(tiny_checkpoints):
    processor = NVILAProcessor.from_pretrained(tiny_checkpoints["nvila-video"], num_video_frames=12)
    with pytest.raises(ValueError, match="12 frames"):
        processor.prepare([_user({"type": "video", "video": VIDEO}, _text("?"))])


def test_bfloat16_runs(tiny_checkpoints):
    path = tiny_checkpoints["nvila-lite"]
    processor = NVILAProcessor.from_pretrained(path)
    model = NVILAForConditionalGeneration.from_pretrained(path, torch_dtype=torch.bfloat16)
    assert model.dtype == torch.bfloat16 and model.vision_tower.dtype == torch.bfloat16
    inputs = processor.apply_chat_template(_user(_image(), _text("x")), add_generation_prompt=True, tokenize=True,
                                           return_dict=True, return_tensors="pt")
    ids = model.generate(**inputs, max_new_tokens=2)
    assert ids.shape[1] >= inputs["input_ids"].shape[1] + 1


@pytest.mark.parametrize("name", ["NVILA-8B", "NVILA-15B", "NVILA-Lite-2B", "NVILA-Lite-8B", "NVILA-8B-Video"])
def test_published_configs_build_on_meta(name):
    cfg = NVILAConfig.from_pretrained(CONFIGS / f"{name}.json")
    model = NVILAForConditionalGeneration.on_meta(cfg)
    counts = model.num_parameters()
    assert all(p.is_meta for p in model.parameters())
    expected = {"NVILA-8B": 8.09e9, "NVILA-15B": 15.28e9, "NVILA-Lite-2B": 2.0e9, "NVILA-Lite-8B": 8.09e9,
                "NVILA-8B-Video": 8.06e9}[name]
    assert counts["total"] == pytest.approx(expected, rel=0.01)
    family = {"NVILA-8B": ("dynamic_s2", "mlp_downsample", "basic"), "NVILA-15B": ("dynamic_s2", "mlp_downsample", "basic"),
              "NVILA-Lite-2B": ("dynamic", "mlp_downsample_3x3_fix", "basic"),
              "NVILA-Lite-8B": ("dynamic", "mlp_downsample_3x3_fix", "basic"),
              "NVILA-8B-Video": ("resize", "mlp_downsample_2x2_fix", "tsp")}[name]
    assert (cfg.image_aspect_ratio, cfg.projector_type, cfg.video_encoder.kind) == family


# ---------------------------------------------------------------------------------- strict loading
def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def test_missing_and_unexpected_keys_are_errors(tiny_checkpoints, tmp_path):
    ckpt = _copy(tiny_checkpoints["nvila"], tmp_path / "c")
    f = ckpt / "mm_projector" / "model.safetensors"
    state = load_file(f)
    state["layers.9.weight"] = torch.zeros(3)
    save_file(state, f)
    with pytest.raises(CheckpointError, match="unexpected keys layers.9.weight"):
        NVILAForConditionalGeneration.from_pretrained(ckpt)
    del state["layers.9.weight"], state["layers.4.bias"]
    save_file(state, f)
    with pytest.raises(CheckpointError, match="missing keys layers.4.bias"):
        NVILAForConditionalGeneration.from_pretrained(ckpt)


def test_pickle_weights_are_refused(tiny_checkpoints, tmp_path):
    ckpt = _copy(tiny_checkpoints["nvila"], tmp_path / "c")
    (ckpt / "mm_projector" / "model.safetensors").unlink()
    torch.save({"x": torch.zeros(1)}, ckpt / "mm_projector" / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match="pickle files are not loaded"):
        NVILAForConditionalGeneration.from_pretrained(ckpt)


def test_unknown_layout_is_an_error(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(CheckpointError, match="missing: llm, vision_tower, mm_projector"):
        NVILAForConditionalGeneration.from_pretrained(tmp_path)
    with pytest.raises(CheckpointError, match="no such checkpoint"):
        NVILAProcessor.from_pretrained(tmp_path / "nope")


def test_vocab_resized_to_tokenizer_with_mean_rows(tiny_checkpoints, tmp_path):
    """A checkpoint storing 151648 rows (as NVILA-8B does) is resized to len(tokenizer) = 151651."""
    ckpt = _copy(tiny_checkpoints["nvila"], tmp_path / "c")
    f = ckpt / "llm" / "model.safetensors"
    state = load_file(f)
    for k in ("model.embed_tokens.weight", "lm_head.weight"):
        state[k] = state[k][:151648].clone()
    save_file(state, f)
    cfg = json.loads((ckpt / "llm" / "config.json").read_text())
    cfg["vocab_size"] = 151648
    (ckpt / "llm" / "config.json").write_text(json.dumps(cfg))
    model = NVILAForConditionalGeneration.from_pretrained(ckpt)
    emb = model.llm.get_input_embeddings().weight
    assert emb.shape[0] == 151651
    assert torch.allclose(emb[151648:], state["model.embed_tokens.weight"].mean(0, keepdim=True).expand(3, -1),
                          atol=1e-6)
    assert torch.equal(emb[:151648], state["model.embed_tokens.weight"])


def _image_conv(image):
    return _user({"type": "image", "image": image}, _text("What is this?"))


@pytest.mark.parametrize("which", ["nvila", "lite"])
def test_processor_reuses_the_tiles_of_an_image_it_has_seen(which, nvila, lite, tiny_checkpoints, monkeypatch):
    from nvila import processor as processor_module
    fresh = NVILAProcessor.from_pretrained(tiny_checkpoints["nvila" if which == "nvila" else "nvila-lite"])
    uncached = NVILAProcessor.from_pretrained(tiny_checkpoints["nvila" if which == "nvila" else "nvila-lite"],
                                              media_cache_mib=0)
    calls = []
    real = processor_module.tiling.to_pixels
    monkeypatch.setattr(processor_module.tiling, "to_pixels", lambda *a, **k: calls.append(1) or real(*a, **k))
    image = Image.open(IMAGE).convert("RGB")
    first, first_infos = fresh.prepare([_image_conv(image)])
    n = len(calls)
    again, again_infos = fresh.prepare([_image_conv(image.copy())])  # equal content, another object
    assert len(calls) == n  # not tiled again
    plain, plain_infos = uncached.prepare([_image_conv(image)])
    uncached.prepare([_image_conv(image)])
    assert len(calls) == 3 * n  # the processor without a cache tiles every time
    for out in (again, plain):
        assert torch.equal(out["pixel_values"], first["pixel_values"])
        assert torch.equal(out["input_ids"], first["input_ids"])
    assert [i.digest for i in again_infos[0]] == [i.digest for i in first_infos[0]] \
        == [i.digest for i in plain_infos[0]]
    assert len({i.digest for i in first_infos[0]}) == len(first_infos[0])  # one digest per medium (Lite: tile)
    other, other_infos = fresh.prepare([_image_conv(image.transpose(Image.Transpose.FLIP_LEFT_RIGHT))])
    assert not {i.digest for i in other_infos[0]} & {i.digest for i in first_infos[0]}
    more_tiles = fresh.config.max_tiles + 4  # other settings: another digest, even with equal tiles
    _, more_infos = fresh.prepare([_image_conv(image)], max_tiles=more_tiles)
    assert more_infos[0][0].digest != first_infos[0][0].digest


def test_processor_image_cache_stays_within_its_bound(tiny_checkpoints):
    proc = NVILAProcessor.from_pretrained(tiny_checkpoints["nvila"])
    image = Image.open(IMAGE).convert("RGB")
    proc.prepare([_image_conv(image)])
    one = proc._image_cache_bytes
    proc._image_cache_limit = int(2.5 * one)  # room for two images
    digests = []
    for angle in range(1, 6):
        _, infos = proc.prepare([_image_conv(image.rotate(angle))])
        digests.append(infos[0][0].digest)
        assert proc._image_cache_bytes <= proc._image_cache_limit
        assert proc._image_cache_bytes == sum(it.pixels.numel() * 4 for items in proc._image_cache.values()
                                              for it in items)
    assert list(proc._image_cache) == digests[-2:]  # least recently used evicted first
    small = NVILAProcessor.from_pretrained(tiny_checkpoints["nvila"], media_cache_mib=0)
    small.prepare([_image_conv(image)])
    assert not small._image_cache


def test_concat_is_a_view_only_for_back_to_back_tiles():
    from nvila.processor import _concat
    base = torch.randn(5, 3, 4, 4)
    parts = [base[i:i + 1] for i in range(5)]
    joined = _concat(parts)
    assert torch.equal(joined, base) and joined.data_ptr() == base.data_ptr()
    assert torch.equal(_concat(parts[1:]), base[1:])
    shuffled = [parts[2], parts[0]]
    assert torch.equal(_concat(shuffled), torch.cat(shuffled))
    assert _concat(shuffled).data_ptr() != base.data_ptr()
    separate = [torch.randn(1, 3, 4, 4), torch.randn(2, 3, 4, 4)]
    assert torch.equal(_concat(separate), torch.cat(separate))
