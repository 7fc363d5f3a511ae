"""Measurements shared by the benchmark scripts."""

from __future__ import annotations

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
