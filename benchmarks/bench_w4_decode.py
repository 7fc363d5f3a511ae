"""End-to-end engine decode with a W4A16 Qwen2-1.5B-shaped LLM: the CPU W4A16 kernels side by side.

    PYTHONPATH=src python benchmarks/bench_w4_decode.py [--threads 1 2] [--reps 3] [--tokens 64]
                                                        [--kernels int4pack avx2-fp32 avx2-dyn8] [--batch 4]

Model: NVILA-Lite-2B shapes (as in bench_engine.py: Qwen2-1.5B LLM, vocab 151936, SigLIP tower) with every
LLM decoder linear W4A16 (group 128) and the lm_head W8A8, swapped in by the production
``quant.format.swap_modules`` on the meta device and filled with random codes (no fp32 copy is ever
built). Text-only requests through ``Engine`` (batch 1, greedy, ``ignore_eos``): the engine's own
``decode_tokens_per_s``. The kernel is switched between requests with ``NVILA_W4A16_CPU_KERNEL`` and
``reset_kernel()``; every repetition runs each kernel once (A/B/C, A/B/C, ...) after one untimed warm-up
request, and the table shows medians. ``--batch B`` submits B identical requests together to an engine of
B slots, so each decode step runs the linears on B rows: the rate is then the aggregate, the B requests'
decoded tokens over the wall time from submission to the last token less the B prefills (which the engine
runs one at a time between decode steps), and the bound is per step, not per token. Bound: read
bandwidth (``torch.sum`` over 1 GiB, same threads) / weight bytes read per token. For an AVX2-only CPU's torch kernels, run it with
``ATEN_CPU_CAPABILITY=avx2 MKL_ENABLE_INSTRUCTIONS=AVX2 ONEDNN_MAX_CPU_ISA=AVX2`` (fbgemm, which runs the
W8A8 head, keeps its own ISA choice).
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import time

import torch

from common import cpu_report

from nvila import NVILAConfig, NVILAForConditionalGeneration, NVILAProcessor
from nvila.checkpoint import token_ids
from nvila.config import LLM_PRESETS, VisionConfig
from nvila.engine import Engine, EngineConfig, GenerationRequest
from nvila.quant.format import swap_modules
from nvila.quant.linear import W4A16Linear, W8A8Linear
from nvila.tiny import build_tokenizer

VOCAB = 151936
LINEARS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj",
           "mlp.up_proj", "mlp.down_proj")


def build(threads: int, scheme: str = "w4a16", batch: int = 1):
    """The Lite-2B-shaped model with every LLM decoder linear in ``scheme`` (g128 for w4a16) and a W8A8
    head, random codes, in an ``Engine`` of ``batch`` slots; returns (model, engine)."""
    tok = build_tokenizer()
    llm = LLM_PRESETS[1536]
    cfg = NVILAConfig(llm=type(llm)(**{**llm.__dict__, "vocab_size": VOCAB, "tie_word_embeddings": False}),
                      vision=VisionConfig(), projector_type="mlp_downsample_3x3_fix", image_aspect_ratio="dynamic",
                      s2_scales=None)
    ids = token_ids(tok, tok.chat_template)
    ids = type(ids)(**{**ids.__dict__, "vocab_size": VOCAB})
    model = NVILAForConditionalGeneration.on_meta(cfg, ids)
    spec = {}
    for i, layer in enumerate(model.llm.model.layers):
        for name in LINEARS:
            bias = layer.get_submodule(name).bias is not None
            spec[f"model.layers.{i}.{name}"] = {"scheme": scheme, "bias": bias, "input_scale": False,
                                                **({"group_size": 128} if scheme == "w4a16" else {})}
    spec["lm_head"] = {"scheme": "w8a8", "bias": False, "input_scale": False}
    swap_modules(model.llm, spec, "llm")
    model.materialize("cpu", torch.float32)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim == 1 and "norm" in name:
                p.fill_(1.0)
            else:
                p.normal_(0.0, 0.02, generator=g)
        for m in model.llm.modules():
            if isinstance(m, W4A16Linear):
                m.qweight.copy_(torch.randint(0, 256, m.qweight.shape, dtype=torch.uint8, generator=g))
                m.zeros.fill_(8)
                m.scales.fill_(0.02 / 4.6)  # uniform codes around 8: weight std ~0.02
            elif isinstance(m, W8A8Linear):
                m.qweight.copy_(torch.randint(-127, 128, m.qweight.shape, dtype=torch.int8, generator=g))
                m.scales.fill_(0.02 / 73)
            if isinstance(m, (W4A16Linear, W8A8Linear)) and m.bias is not None:
                m.bias.zero_()
    engine = Engine(model.eval(), NVILAProcessor(tok, cfg),
                    EngineConfig(max_batch_size=batch, max_seq_len=1024, threads=threads, vision_cache_size=0,
                                 prefix_cache_mib=0))
    return model, engine


def weight_bytes(model) -> int:
    """Bytes one decode step reads: LLM linears as stored (codes, scales, zeros, biases) and norms."""
    total = 0
    for m in model.llm.modules():
        if isinstance(m, (W4A16Linear, W8A8Linear)):
            total += sum(t.numel() * t.element_size() for t in m.buffers())
    return total + sum(p.numel() * 4 for n, p in model.llm.named_parameters() if "norm" in n)


def read_bandwidth() -> float:
    a = torch.ones(2**28)
    times = []
    for _ in range(5):
        t = time.perf_counter()
        a.sum()
        times.append(time.perf_counter() - t)
    return a.numel() * 4 / statistics.median(times) / 1e9


def decode(engine: Engine, tokens: int, batch: int = 1) -> float:
    """Decode tokens/s of ``batch`` identical requests submitted together (aggregate for batch > 1)."""
    msgs = [{"role": "user", "content": "Tell me a long story about mountains and rivers."}]
    start = time.perf_counter()
    hs = [engine.submit(GenerationRequest(messages=msgs, max_tokens=tokens, ignore_eos=True)) for _ in range(batch)]
    for h in hs:
        h.text()
    if batch == 1:
        return hs[0].metrics.decode_tokens_per_s
    decoding = time.perf_counter() - start - sum(h.metrics.prefill_s for h in hs)
    return sum(h.metrics.completion_tokens - 1 for h in hs) / decoding


def use(model, kernel: str) -> None:
    os.environ["NVILA_W4A16_CPU_KERNEL"] = kernel
    for m in model.llm.modules():
        if isinstance(m, W4A16Linear):
            m.reset_kernel()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--kernels", nargs="+", default=["int4pack", "avx2-fp32", "avx2-dyn16", "avx2-dyn8"])
    ap.add_argument("--batch", type=int, default=1, help="requests decoded together (aggregate tok/s)")
    args = ap.parse_args()
    print(f"CPU: {cpu_report()}", flush=True)
    print(f"# bench_w4_decode {time.strftime('%Y-%m-%d %H:%M:%S')}  torch {torch.__version__}  "
          f"capability {torch.backends.cpu.get_cpu_capability()}")
    print(f"# load: {subprocess.run(['uptime'], capture_output=True, text=True).stdout.strip()}")
    for threads in args.threads:
        model, engine = build(threads, batch=args.batch)
        torch.set_num_threads(threads)
        bw = read_bandwidth()
        nbytes = weight_bytes(model)
        rates = {k: [] for k in args.kernels}
        try:
            for k in args.kernels:  # build every kernel once, untimed
                use(model, k)
                decode(engine, 4)
            for _ in range(args.reps):
                for k in args.kernels:
                    use(model, k)
                    decode(engine, 4)  # rebuilds the packed weights
                    rates[k].append(decode(engine, args.tokens, args.batch))
        finally:
            engine.shutdown()
        bound = bw * 1e9 / nbytes
        print(f"\n## threads {threads}: {nbytes / 1e9:.2f} GB/token, read bandwidth {bw:.1f} GB/s, "
              f"bound {bound:.1f} steps/s; {args.tokens} tokens, {args.reps} reps, batch {args.batch}")
        print(f"| kernel | decode tok/s (median) | all | × {args.kernels[0]} | of bound |")
        print("|---|---|---|---|---|")
        base = statistics.median(rates[args.kernels[0]])
        for k, v in rates.items():
            med = statistics.median(v)
            print(f"| {k} | {med:.2f} | {' '.join(f'{r:.2f}' for r in v)} | {med / base:.2f} | "
                  f"{med / args.batch / bound:.0%} |")
        del model, engine


if __name__ == "__main__":
    main()
