"""Issue 23 benchmark a: engine decode against llama.cpp at the same bit width, Qwen2-1.5B shape, interleaved.

    THREADS=1,2 REPS=3 PYTHONPATH=src:benchmarks python benchmarks/bench_vs_llamacpp.py

Pairs (targets): ours W4A16 + W8A8 head against llama.cpp Q4_0 (>= 1.0x), ours W8A8 + W8A8 head
against llama.cpp Q8_0 (>= 1.3x). Needs ``llama-cpp-python`` and ``gguf`` (the ``bench`` extra); the
ISA llama.cpp was built for is printed (its ``llama_print_system_info``).

The LLM is written as an F32 qwen2 GGUF by ``bench_quant.write_gguf`` (random weights, ~6 GB in /tmp
while it exists) and quantized to Q4_0 and Q8_0 by llama.cpp, which also quantizes the tied output
matrix (q6_K for Q4_0, q8_0 for Q8_0). Our side is ``bench_w4_decode.build`` (every decoder linear in
the scheme with random codes, lm_head W8A8; kernels as ``NVILA_W4A16_CPU_KERNEL`` / ``NVILA_W8A8_CPU_KERNEL``
resolve, default ``auto``). Per thread count and repetition, in turn: llama.cpp Q4_0, ours W4A16,
llama.cpp Q8_0, ours W8A8; each decodes 64 tokens after a short prompt (llama.cpp: 32 tokens).

Bandwidth bound: read bandwidth (``torch.sum`` over 1 GiB at the same thread count) / bytes one decode
step reads: ours, the quantized linears' stored tensors and the norms (``bench_w4_decode.weight_bytes``);
llama.cpp, the GGUF's tensors other than the token embedding, with the tied output matrix counted once
(it is read every step).
"""
import gc
import os
import statistics
import tempfile
import time
from pathlib import Path

import torch

from bench_quant import build_fp32, lite_2b_config, write_gguf
from bench_w4_decode import build, decode, read_bandwidth, weight_bytes
from common import cpu_report
from nvila.quant.linear import w4a16_cpu_kernel_name, w8a8_cpu_kernel_names

THREADS = [int(t) for t in os.environ.get("THREADS", "1,2").split(",")]
REPS = int(os.environ.get("REPS", "3"))
NEW = 64
PAIRS = {"Q4_0": ("w4a16", 2, 1.0), "Q8_0": ("w8a8", 7, 1.3)}  # llama.cpp type: (ours, ftype, target)


def llama_rate(llm) -> float:
    llm.reset()
    llm.eval(list(range(10, 42)))
    t = time.perf_counter()
    for i in range(NEW):
        llm.eval([100 + i])
    return NEW / (time.perf_counter() - t)


def gguf_step_bytes(path: Path) -> int:
    """Bytes of every tensor one decode step reads: all but ``token_embd`` (a lookup), which as the
    tied output matrix is read in full: so all of them, once."""
    import gguf

    return sum(int(t.n_bytes) for t in gguf.GGUFReader(str(path)).tensors)


def main() -> None:
    print(f"CPU: {cpu_report()}", flush=True)
    try:
        import llama_cpp
    except ImportError as e:
        print(f"not run: llama-cpp-python is not installed ({e}); pip install 'nvila[bench]'")
        return
    print(f"llama.cpp build: {llama_cpp.llama_print_system_info().decode().strip()}", flush=True)
    print(f"ours: w4a16 kernel {w4a16_cpu_kernel_name(128)}, w8a8 kernels (1 row, 2-3 rows, 4+ rows) "
          f"{w8a8_cpu_kernel_names()}; torch {torch.__version__}", flush=True)
    tmp = Path(tempfile.mkdtemp(dir="/tmp"))
    t = time.time()
    fp = build_fp32(lite_2b_config())
    write_gguf(fp, tmp / "f32.gguf")
    del fp
    gc.collect()
    files = {}
    for qtype, (_, ftype, _) in PAIRS.items():
        params = llama_cpp.llama_model_quantize_default_params()
        params.ftype = ftype
        params.nthread = 2
        files[qtype] = tmp / f"{qtype.lower()}.gguf"
        assert llama_cpp.llama_model_quantize(str(tmp / "f32.gguf").encode(), str(files[qtype]).encode(), params) == 0
    (tmp / "f32.gguf").unlink()
    print(f"# GGUFs {', '.join(f'{q} {p.stat().st_size / 1e9:.2f} GB' for q, p in files.items())}, built in "
          f"{time.time() - t:.0f} s", flush=True)
    try:
        for threads in THREADS:
            torch.set_num_threads(threads)
            bw = read_bandwidth()
            sides, rates, step_bytes = {}, {}, {}
            for qtype, (scheme, _, _) in PAIRS.items():
                sides[qtype] = llama_cpp.Llama(str(files[qtype]), n_threads=threads, n_threads_batch=threads,
                                               n_ctx=512, verbose=False)
                sides[scheme] = build(threads, scheme)
                step_bytes[qtype], step_bytes[scheme] = gguf_step_bytes(files[qtype]), weight_bytes(sides[scheme][0])
            try:
                for name, side in sides.items():  # warm-up: packs our kernels, pages llama.cpp's weights in
                    llama_rate(side) if name in PAIRS else decode(side[1], 4)
                for _ in range(REPS):
                    for name, side in sides.items():
                        rates.setdefault(name, []).append(llama_rate(side) if name in PAIRS else decode(side[1], NEW))
            finally:
                for name, side in sides.items():
                    if name not in PAIRS:
                        side[1].shutdown()
            print(f"\n## threads {threads}: read bandwidth {bw:.1f} GB/s ({os.popen('uptime').read().strip()})")
            print("| side | tok/s (median) | all | GB/token | of bound | ours / llama.cpp | target |")
            print("|---|---|---|---|---|---|---|")
            for qtype, (scheme, _, target) in PAIRS.items():
                base = statistics.median(rates[qtype])
                for name in (qtype, scheme):
                    med = statistics.median(rates[name])
                    bound = bw * 1e9 / step_bytes[name]
                    label = f"llama.cpp {qtype}" if name == qtype else f"ours {scheme} + w8a8 head"
                    tail = "— | —" if name == qtype else f"**{med / base:.2f}×** | ≥ {target}×"
                    print(f"| {label} | {med:.2f} | {' '.join(f'{r:.2f}' for r in rates[name])} | "
                          f"{step_bytes[name] / 1e9:.2f} | {med / bound:.0%} | {tail} |", flush=True)
            del sides
            gc.collect()
    finally:
        for p in files.values():
            p.unlink(missing_ok=True)
        tmp.rmdir()


if __name__ == "__main__":
    main()
