"""Decode attention for one query row per sequence: the engine's grouped matmuls against torch's SDPA.

    python benchmarks/bench_decode_attention.py

Qwen2-1.5B's attention shape (12 query heads, 2 KV heads, head dim 128), float32, for batch sizes and
key lengths of decode; microseconds per call (median of 5 runs of 200 calls), at 1 and 2 threads.
``grouped`` is ``nvila.llm._grouped_decode`` (the engine's choice on CPU), ``sdpa`` is
``nvila.llm._sdpa_decode`` (``model.generate``'s, bitwise transformers'); rows of different
lengths get a key mask, as the engine gives them.
"""

from __future__ import annotations

import statistics
import time

import torch

from common import cpu_report
from nvila.llm import _grouped_decode, _sdpa_decode


def per_call_us(fn, calls: int = 200) -> float:
    runs = []
    for _ in range(5):
        t = time.perf_counter()
        for _ in range(calls):
            fn()
        runs.append((time.perf_counter() - t) / calls * 1e6)
    return statistics.median(runs)


def main() -> None:
    print(f"CPU: {cpu_report()}; torch {torch.__version__}", flush=True)
    g = torch.Generator().manual_seed(0)
    heads, kv_heads, dim = 12, 2, 128
    print("| threads | batch | keys | grouped µs | sdpa µs | sdpa / grouped |")
    print("|---:|---:|---:|---:|---:|---:|")
    for threads in (1, 2):
        torch.set_num_threads(threads)
        for b, t in ((1, 512), (1, 2048), (4, 1024), (8, 2048)):
            q = torch.randn(b, heads, 1, dim, generator=g)
            k, v = torch.randn(b, kv_heads, t, dim, generator=g), torch.randn(b, kv_heads, t, dim, generator=g)
            pos = torch.randint(t // 2, t, (b,), generator=g)
            pos[0] = t - 1
            valid = None if b == 1 else torch.arange(t)[None] <= pos[:, None]
            for fn in (_grouped_decode, _sdpa_decode):  # warm-up
                fn(q, k, v, valid, dim ** -0.5)
            a = per_call_us(lambda: _grouped_decode(q, k, v, valid, dim ** -0.5))
            s = per_call_us(lambda: _sdpa_decode(q, k, v, valid, dim ** -0.5))
            print(f"| {threads} | {b} | {t} | {a:.0f} | {s:.0f} | {s / a:.2f} |", flush=True)


if __name__ == "__main__":
    main()
