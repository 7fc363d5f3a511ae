"""Issue 3 benchmarks: our engine, side by side in one process, against the baselines it names.

    python benchmarks/bench_engine.py            # full run (needs ~18 GiB free RAM, ~20 min)
    python benchmarks/bench_engine.py --quick    # fewer pairs and tokens
    python benchmarks/bench_engine.py --parts cd # only some comparisons

Models are NVILA-Lite-2B-shaped (SigLIP-so400m tower, Qwen2-1.5B LLM, vocab 151936) and
Qwen2-VL-2B-shaped, with random weights, float32 (bf16 in e). Each comparison alternates the two sides
(paired runs) and reports medians and the ratio ours / baseline:

a. engine vs transformers ``generate()`` on the same NVILA model: TTFT and decode tokens/s (batch 1);
b. NVILA-Lite-2B engine vs transformers' Qwen2-VL-2B on the same 896x896 image and prompt: TTFT and
   decode tokens/s (Qwen2-VL's time excludes its image preprocessing; ours includes the processor);
c. aggregate decode tokens/s of the engine at 8 concurrent streams vs 1;
d. engine decode tokens/s as a fraction of the bandwidth bound: measured copy bandwidth / LLM weight
   bytes read per token;
e. b in bf16 (both models), on CPUs with native bf16 matmuls (``amx_bf16`` or ``avx512_bf16``);
   elsewhere bf16 is emulated, and the part prints that it does not run and why.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

import numpy as np
import torch
from PIL import Image, ImageDraw

from common import copy_bandwidth_gbs, cpu_model_and_flags, cpu_report
from nvila import NVILAConfig, NVILAForConditionalGeneration, NVILAProcessor
from nvila.checkpoint import token_ids
from nvila.config import LLM_PRESETS, VisionConfig
from nvila.engine import Engine, EngineConfig, GenerationRequest
from nvila.tiny import build_tokenizer

VOCAB = 151936
PROMPT = "Describe the image in detail."


def random_init_(model: torch.nn.Module, seed: int = 0) -> None:
    """Deterministic random weights: norms 1, biases 0, other weights N(0, 0.02)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim == 1 and ("norm" in name or name.endswith("weight")):
                p.fill_(1.0)
            elif name.endswith("bias"):
                p.zero_()
            else:
                p.copy_(torch.randn(p.shape, generator=g) * 0.02)


def build_nvila_lite_2b(threads: int | None):
    tok = build_tokenizer()
    llm = LLM_PRESETS[1536]
    cfg = NVILAConfig(llm=type(llm)(**{**llm.__dict__, "vocab_size": VOCAB}), vision=VisionConfig(),
                      projector_type="mlp_downsample_3x3_fix", image_aspect_ratio="dynamic", s2_scales=None)
    ids = token_ids(tok, tok.chat_template)
    ids = type(ids)(**{**ids.__dict__, "vocab_size": VOCAB})
    model = NVILAForConditionalGeneration.on_meta(cfg, ids).materialize("cpu", torch.float32)
    random_init_(model)
    processor = NVILAProcessor(tok, cfg)
    # No vision-feature or prefix cache: paired runs resend the same prompt, and a hit would skip the
    # tower or the prefill.
    engine = Engine(model.eval(), processor, EngineConfig(max_batch_size=8, max_seq_len=2048, threads=threads,
                                                          vision_cache_size=0, prefix_cache_mib=0))
    return model, processor, engine


def test_image(size: int) -> Image.Image:
    img = Image.new("RGB", (size, size), (235, 235, 230))
    d = ImageDraw.Draw(img)
    for i in range(12):
        d.rectangle([40 + 60 * i, 80 + 30 * i, 120 + 60 * i, 160 + 30 * i], fill=(20 * i, 200 - 10 * i, 90))
    return img


class StepClock:
    """transformers streamer protocol: records the time of every generated token."""

    def __init__(self):
        self.times: list[float] = []

    def put(self, value):
        if value.numel() and value.ndim == 1:  # the prompt arrives first as (1, L); tokens as (B,)
            self.times.append(time.perf_counter())

    def end(self):
        pass


def _decode_rate(times: list[float]) -> float:
    return (len(times) - 1) / (times[-1] - times[0]) if len(times) > 1 else 0.0


def run_engine(engine: Engine, messages, new_tokens: int) -> tuple[float, float]:
    """(TTFT seconds, decode tokens/s) of one request through the engine, submit (preprocessing) included."""
    h = engine.submit(GenerationRequest(messages=messages, max_tokens=new_tokens, ignore_eos=True))
    h.text()
    return h.metrics.ttft_s, h.metrics.decode_tokens_per_s


def run_hf_generate(model, processor, messages, new_tokens: int) -> tuple[float, float]:
    """(TTFT, decode tokens/s) of transformers ``generate()`` on the same model and inputs."""
    t0 = time.perf_counter()
    inputs, _ = processor.prepare([messages])
    clock = StepClock()
    with torch.inference_mode():
        embeds = model.embed(inputs["input_ids"], inputs.get("pixel_values"), inputs.get("image_block_sizes"))
        model.llm.generate(inputs_embeds=embeds, attention_mask=inputs["attention_mask"], max_new_tokens=new_tokens,
                           min_new_tokens=new_tokens, do_sample=False, streamer=clock,
                           pad_token_id=model.ids.pad, eos_token_id=list(model.ids.stop))
    return clock.times[0] - t0, _decode_rate(clock.times)


# ------------------------------------------------------------------------------------- Qwen2-VL
def build_qwen2vl_2b():
    from transformers import Qwen2VLConfig, Qwen2VLForConditionalGeneration

    cfg = Qwen2VLConfig(
        text_config=dict(hidden_size=1536, intermediate_size=8960, num_hidden_layers=28, num_attention_heads=12,
                         num_key_value_heads=2, vocab_size=VOCAB, max_position_embeddings=32768,
                         rms_norm_eps=1e-6, tie_word_embeddings=True,
                         rope_parameters={"rope_type": "default", "rope_theta": 1e6, "mrope_section": [16, 24, 24]}),
        vision_config=dict(depth=32, embed_dim=1280, hidden_size=1536, num_heads=16, mlp_ratio=4, patch_size=14,
                           spatial_merge_size=2, temporal_patch_size=2, in_channels=3),
        image_token_id=151655, video_token_id=151656, vision_start_token_id=151652, vision_end_token_id=151653,
        tie_word_embeddings=True,
    )
    model = Qwen2VLForConditionalGeneration(cfg)  # built on the CPU so its rotary buffers are real
    random_init_(model)
    return model.eval()


def qwen2vl_inputs(image: Image.Image, prompt_ids: list[int]):
    """Pixel patches and ids as Qwen2-VL's processor lays them out (CLIP normalisation, 14 px patches,
    2 temporal copies, 2x2 merge order); one <|image_pad|> per merged 28x28 cell."""
    mean = np.array([0.48145466, 0.4578275, 0.40821073], dtype=np.float32)
    std = np.array([0.26862954, 0.26130258, 0.27577711], dtype=np.float32)
    x = (np.asarray(image, dtype=np.float32) / 255.0 - mean) / std  # (H, W, 3)
    x = np.repeat(x.transpose(2, 0, 1)[None], 2, axis=0)  # (T=2, 3, H, W)
    gh, gw = x.shape[2] // 14, x.shape[3] // 14
    x = x.reshape(1, 2, 3, gh // 2, 2, 14, gw // 2, 2, 14).transpose(0, 3, 6, 4, 7, 2, 1, 5, 8)
    pixels = torch.from_numpy(np.ascontiguousarray(x).reshape(gh * gw, 3 * 2 * 14 * 14))
    n_tokens = gh * gw // 4
    ids = [151652] + [151655] * n_tokens + [151653] + prompt_ids
    return pixels, torch.tensor([[1, gh, gw]]), torch.tensor([ids])


def run_qwen2vl(model, image, prompt_ids, new_tokens: int, dtype: torch.dtype = torch.float32) -> tuple[float, float]:
    t0 = time.perf_counter()
    pixels, grid, ids = qwen2vl_inputs(image, prompt_ids)
    clock = StepClock()
    with torch.inference_mode():
        model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), pixel_values=pixels.to(dtype),
                       image_grid_thw=grid, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                       streamer=clock, pad_token_id=0)
    return clock.times[0] - t0, _decode_rate(clock.times)


# ----------------------------------------------------------------------------------- batching
def run_streams(engine: Engine, n: int, new_tokens: int) -> float:
    """Aggregate decode tokens/s over the window in which all ``n`` text streams are decoding."""
    msgs = [[{"role": "user", "content": f"Question {i}: tell me a long story about mountains."}] for i in range(n)]
    handles = [engine.submit(GenerationRequest(messages=m, max_tokens=new_tokens, ignore_eos=True)) for m in msgs]
    for h in handles:
        h.text()
    start = max(h.token_times[0] for h in handles)  # every stream has been admitted and is decoding
    end = min(h.token_times[-1] for h in handles)
    tokens = sum(sum(1 for t in h.token_times if start < t <= end) for h in handles)
    return tokens / (end - start) if end > start else float("nan")


def llm_bytes_per_token(model) -> int:
    """Weights the LLM reads per decoded token: every parameter once (tied lm_head counted once)."""
    seen = {id(p): p.numel() * p.element_size() for p in model.llm.parameters()}
    return sum(seen.values())


def paired(fn_a, fn_b, pairs: int):
    a, b = [], []
    for _ in range(pairs):
        a.append(fn_a())
        b.append(fn_b())
    med = lambda xs, i: statistics.median(x[i] for x in xs)  # noqa: E731
    return (med(a, 0), med(a, 1)), (med(b, 0), med(b, 1))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="1 pair, fewer tokens")
    ap.add_argument("--pairs", type=int, default=3)
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    ap.add_argument("--parts", default="abcde", help="which comparisons to run, e.g. 'cd' (default: abcde)")
    args = ap.parse_args()
    print(f"CPU: {cpu_report()}", flush=True)
    if args.quick:
        args.pairs, args.new_tokens = 1, 12
    if args.threads:
        torch.set_num_threads(args.threads)
    results: dict[str, dict] = {"threads": torch.get_num_threads(), "pairs": args.pairs, "new_tokens": args.new_tokens}

    model, processor, engine = build_nvila_lite_2b(args.threads)

    def report(key: str, value: dict) -> None:
        results[key] = value
        print(json.dumps({key: value}), flush=True)

    if "a" in args.parts:
        small = [{"role": "user", "content": [{"type": "image", "image": test_image(448)},
                                              {"type": "text", "text": PROMPT}]}]
        (e_ttft, e_tps), (h_ttft, h_tps) = paired(lambda: run_engine(engine, small, args.new_tokens),
                                                  lambda: run_hf_generate(model, processor, small, args.new_tokens),
                                                  args.pairs)
        report("a_vs_hf_generate", {"engine_ttft_s": e_ttft, "hf_ttft_s": h_ttft, "ttft_speedup": h_ttft / e_ttft,
                                    "engine_decode_tok_s": e_tps, "hf_decode_tok_s": h_tps,
                                    "decode_ratio": e_tps / h_tps})

    def vs_qwen2vl(engine: Engine, dtype: torch.dtype) -> dict:
        qwen = build_qwen2vl_2b().to(dtype)
        big = test_image(896)
        msgs = [{"role": "user", "content": [{"type": "image", "image": big}, {"type": "text", "text": PROMPT}]}]
        inputs, _ = processor.prepare([msgs])
        prompt_ids = [t for t in inputs["input_ids"][0].tolist() if t != model.ids.image]
        (n_ttft, n_tps), (q_ttft, q_tps) = paired(lambda: run_engine(engine, msgs, args.new_tokens),
                                                  lambda: run_qwen2vl(qwen, big, prompt_ids, args.new_tokens, dtype),
                                                  args.pairs)
        return {"dtype": str(dtype).removeprefix("torch."), "nvila_ttft_s": n_ttft, "qwen2vl_ttft_s": q_ttft,
                "ttft_speedup": q_ttft / n_ttft, "nvila_decode_tok_s": n_tps, "qwen2vl_decode_tok_s": q_tps,
                "decode_ratio": n_tps / q_tps, "nvila_prompt_tokens": inputs["input_ids"].shape[1],
                "qwen2vl_prompt_tokens": len(prompt_ids) + 1026}

    if "b" in args.parts:
        report("b_vs_qwen2vl", vs_qwen2vl(engine, torch.float32))

    if "c" in args.parts:
        one = statistics.median(run_streams(engine, 1, args.new_tokens * 2) for _ in range(args.pairs))
        eight = statistics.median(run_streams(engine, 8, args.new_tokens * 2) for _ in range(args.pairs))
        report("c_batching", {"streams_1_tok_s": one, "streams_8_tok_s": eight, "ratio": eight / one})

    if "d" in args.parts:
        text = [{"role": "user", "content": PROMPT}]
        tps = statistics.median(run_engine(engine, text, args.new_tokens * 2)[1] for _ in range(args.pairs))
        bw = copy_bandwidth_gbs()
        weight_bytes = llm_bytes_per_token(model)
        bound = bw * 1e9 / weight_bytes
        report("d_bandwidth", {"copy_gb_s": bw, "llm_weight_gb_per_token": weight_bytes / 1e9, "bound_tok_s": bound,
                               "engine_decode_tok_s": tps, "fraction_of_bound": tps / bound})
    engine.shutdown()

    if "e" in args.parts:
        native = sorted({"amx_bf16", "avx512_bf16"} & cpu_model_and_flags()[1])
        if not native:
            report("e_vs_qwen2vl_bf16", {"ran": False, "why": "no native bf16 matmul on this CPU (neither amx_bf16 "
                                         "nor avx512_bf16): bf16 would be emulated, slower than float32"})
        else:
            model.to(torch.bfloat16)
            engine = Engine(model, processor, EngineConfig(max_batch_size=8, max_seq_len=2048, threads=args.threads,
                                                           vision_cache_size=0, prefix_cache_mib=0))
            try:
                report("e_vs_qwen2vl_bf16", {"ran": True, "native_bf16": native, **vs_qwen2vl(engine, torch.bfloat16)})
            finally:
                engine.shutdown()
    print(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
