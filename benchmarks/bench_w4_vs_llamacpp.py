"""Engine decode, W4A16 LLM + W8A8 head, vs llama.cpp Q4_0 on the same Qwen2-1.5B shape, interleaved.

    THREADS=1,2 REPS=3 PYTHONPATH=src python benchmarks/bench_w4_vs_llamacpp.py

Needs ``llama-cpp-python`` and ``gguf`` (the ``bench`` extra). The LLM is written as an F32 qwen2 GGUF by
``bench_quant.write_gguf`` (random weights, ~6 GB in /tmp while it exists) and quantized to Q4_0 by
llama.cpp, which also quantizes the tied output matrix (to q6_K); our side is ``bench_w4_decode.build``
(every decoder linear W4A16 g128, lm_head W8A8). Per thread count and repetition: 64 llama.cpp decode
steps after a 32-token prompt, then each of our kernels (``int4pack``, ``avx2-fp32``) through ``Engine``.
"""
import gc
import os
import statistics
import tempfile
import time
from pathlib import Path

import torch

from bench_quant import build_fp32, lite_2b_config, write_gguf
from bench_w4_decode import build, decode, use
from common import cpu_report

THREADS = [int(t) for t in os.environ.get("THREADS", "1,2").split(",")]
REPS = int(os.environ.get("REPS", "3"))
NEW = 64


def llama_rate(llm) -> float:
    llm.reset()
    llm.eval(list(range(10, 42)))
    t = time.perf_counter()
    for i in range(NEW):
        llm.eval([100 + i])
    return NEW / (time.perf_counter() - t)


def main() -> None:
    print(f"CPU: {cpu_report()}", flush=True)
    try:
        import llama_cpp
    except ImportError as e:
        print(f"not run: llama-cpp-python is not installed ({e}); pip install 'nvila[bench]'")
        return
    tmp = Path(tempfile.mkdtemp(dir="/tmp"))
    t = time.time()
    fp = build_fp32(lite_2b_config())
    write_gguf(fp, tmp / "f32.gguf")
    del fp
    gc.collect()
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = 2  # Q4_0
    params.nthread = 2
    assert llama_cpp.llama_model_quantize(str(tmp / "f32.gguf").encode(), str(tmp / "q4_0.gguf").encode(), params) == 0
    (tmp / "f32.gguf").unlink()
    print(f"# Q4_0 GGUF {(tmp / 'q4_0.gguf').stat().st_size / 1e9:.2f} GB, built in {time.time() - t:.0f} s", flush=True)
    for threads in THREADS:
        llm = llama_cpp.Llama(str(tmp / "q4_0.gguf"), n_threads=threads, n_threads_batch=threads, n_ctx=512, verbose=False)
        model, engine = build(threads)
        torch.set_num_threads(threads)
        kernels = ["int4pack", "avx2-fp32"]
        rates = {k: [] for k in ["llama.cpp Q4_0", *kernels]}
        try:
            llama_rate(llm)
            for k in kernels:
                use(model, k)
                decode(engine, 4)
            for _ in range(REPS):
                rates["llama.cpp Q4_0"].append(llama_rate(llm))
                for k in kernels:
                    use(model, k)
                    decode(engine, 4)
                    rates[k].append(decode(engine, NEW))
        finally:
            engine.shutdown()
        base = statistics.median(rates["llama.cpp Q4_0"])
        print(f"\n## threads {threads} ({os.popen('uptime').read().strip()})")
        for k, v in rates.items():
            print(f"| {k} | {statistics.median(v):.2f} tok/s | {' '.join(f'{r:.2f}' for r in v)} | "
                  f"{statistics.median(v) / base:.2f}x llama.cpp |", flush=True)
        del model, engine, llm
        gc.collect()
    (tmp / "q4_0.gguf").unlink()
    tmp.rmdir()


if __name__ == "__main__":
    main()
