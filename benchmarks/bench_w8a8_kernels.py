"""CPU W8A8 kernels side by side by row count: nvila's AVX2 and AVX-512 VNNI GEMVs, fbgemm, oneDNN (AMX int8).

    PYTHONPATH=src python benchmarks/bench_w8a8_kernels.py [--threads 1 2] [--rows 1 2 4 8 16 32 256 1024]

One Qwen2-1.5B MLP shape (1536 -> 8960) through ``W8A8Linear`` with ``NVILA_W8A8_CPU_KERNEL`` forced to
each engine, and the float32 ``F.linear`` of the same weights for scale. Cold weights: 24 layers' worth
(330 MB of int8, more than the caches) are cycled, as a decode step reads them. Best of 3 passes, ms per
layer. Both engines quantize the activations alike; the largest difference between their outputs is
printed. ``avx2`` and ``avx512-vnni`` (``cpu_kernels.cpp``; the latter only where the CPU has AVX-512
VNNI) round the activations per row instead, so their outputs differ from fbgemm's by the activation
rounding. ``auto`` (``w8a8_cpu_kernel_names``) is measured too: it should track the fastest per row count.
"""
from __future__ import annotations

import argparse
import os
import time

import torch
import torch.nn.functional as F

from common import cpu_report
from nvila.quant.cpu_kernels import cpu_supports_avx512_vnni
from nvila.quant.linear import W8A8Linear, w8a8_cpu_kernel_names

LAYERS, K, N = 24, 1536, 8960


def per_layer_ms(layers, x, reps: int = 3) -> float:
    best = float("inf")
    for _ in range(reps):
        t = time.perf_counter()
        for m in layers:
            m(x)
        best = min(best, (time.perf_counter() - t) / len(layers))
    return best * 1e3


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--rows", type=int, nargs="+", default=[1, 2, 4, 8, 16, 32, 256, 1024])
    args = ap.parse_args()
    print(f"CPU: {cpu_report()}; torch {torch.__version__}; auto picks {w8a8_cpu_kernel_names()} "
          f"(1 row, 2-3 rows, 4+ rows)", flush=True)
    g = torch.Generator().manual_seed(0)
    floats = [torch.nn.Linear(K, N) for _ in range(LAYERS)]
    for lin in floats:
        torch.nn.init.normal_(lin.weight, std=0.02, generator=g)
    engines = ["avx2", *(["avx512-vnni"] if cpu_supports_avx512_vnni() else []), "fbgemm", "onednn", "auto"]
    sides = {e: [W8A8Linear.from_float(lin) for lin in floats] for e in engines}
    for engine, layers in sides.items():  # each side's kernel object is built under its own setting
        os.environ["NVILA_W8A8_CPU_KERNEL"] = engine
        for m in layers:
            for rows in (1, 64):
                m(torch.randn(rows, K))
    os.environ.pop("NVILA_W8A8_CPU_KERNEL")
    for threads in args.threads:
        torch.set_num_threads(threads)
        print(f"\n## {threads} thread(s), ms per 1536 -> 8960 layer, cold weights")
        print(f"| rows | {' | '.join(engines)} | fp32 F.linear | fbgemm / avx2 | fbgemm / onednn "
              "| max fbgemm-onednn |out diff| |")
        print("|---:" * (len(engines) + 5) + "|")
        for rows in args.rows:
            x = torch.randn(rows, K, generator=g)
            t = {e: per_layer_ms(layers, x) for e, layers in sides.items()}
            fp = per_layer_ms([lambda h, lin=lin: F.linear(h, lin.weight, lin.bias) for lin in floats[:8]], x)
            diff = (sides["fbgemm"][0](x) - sides["onednn"][0](x)).abs().max().item()
            print(f"| {rows} | {' | '.join(f'{t[e]:.3f}' for e in engines)} | {fp:.3f} | "
                  f"{t['fbgemm'] / t['avx2']:.2f} | {t['fbgemm'] / t['onednn']:.2f} | {diff:.1e} |", flush=True)


if __name__ == "__main__":
    main()
