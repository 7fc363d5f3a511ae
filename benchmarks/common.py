"""Measurements shared by the benchmark scripts."""

from __future__ import annotations

import os
import platform
import statistics
import time

import torch


def copy_bandwidth_gbs(reps: int = 7) -> float:
    """STREAM-style copy bandwidth (bytes read + bytes written) on 256 MiB float32 arrays, median GB/s."""
    src = torch.ones(64 * 2**20)
    dst = torch.empty_like(src)
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        dst.copy_(src)
        times.append(time.perf_counter() - t)
    return 2 * src.numel() * 4 / statistics.median(times) / 1e9


ISA_FLAGS = ("avx2", "fma", "f16c", "avx512f", "avx512_bf16", "avx_vnni", "avx512_vnni", "amx_bf16")


def cpu_report() -> str:
    """The CPU model, CPU count and the ISA flags that pick kernels (``flag+`` present, ``flag-`` absent)."""
    model, flags = platform.processor() or "?", set()
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                elif line.startswith("flags"):
                    flags = set(line.split(":", 1)[1].split())
    except OSError:
        pass
    isa = " ".join(f"{f}{'+' if f in flags else '-'}" for f in ISA_FLAGS)
    return f"{model}, {os.cpu_count()} CPUs; {isa}"
