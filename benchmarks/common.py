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


ISA_FLAGS = ("avx2", "fma", "f16c", "avx512f", "avx512_bf16", "avx_vnni", "avx512_vnni", "amx_bf16", "amx_int8")


def cpu_model_and_flags() -> tuple[str, set[str]]:
    """The CPU's model name and its ``/proc/cpuinfo`` flags (an empty set where there is no such file)."""
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
    return model, flags


def cpu_report() -> str:
    """The CPU model, CPU count and the ISA flags that pick kernels (``flag+`` present, ``flag-`` absent)."""
    model, flags = cpu_model_and_flags()
    isa = " ".join(f"{f}{'+' if f in flags else '-'}" for f in ISA_FLAGS)
    return f"{model}, {os.cpu_count()} CPUs; {isa}"


def make_caption_mixture(root, n: int, seed: int, lengths: tuple[int, ...]) -> "Path":
    """``n`` one-image records under ``root`` whose answers are ``lengths`` words long (drawn per record,
    like an SFT mix), and a mixture YAML naming them; returns the YAML's path."""
    import json
    import random
    from pathlib import Path

    from PIL import Image

    root = Path(root)
    rng = random.Random(seed)
    (root / "images").mkdir(parents=True)
    words = "the red circle sits left of a blue square while a green triangle points up".split()
    records = []
    for i in range(n):
        Image.new("RGB", (64, 48), tuple(rng.randrange(256) for _ in range(3))).save(root / "images" / f"{i}.png")
        answer = " ".join(rng.choice(words) for _ in range(rng.choice(lengths)))
        records.append({"id": i, "image": f"{i}.png", "conversations": [
            {"from": "human", "value": "<image>\nDescribe."}, {"from": "gpt", "value": answer}]})
    (root / "d.json").write_text(json.dumps(records))
    (root / "mix.yaml").write_text("datasets:\n  - {name: d, path: d.json, media_root: images}\n")
    return root / "mix.yaml"


def widened_tiny_config(tokenizer, hidden: int):
    """The tiny NVILA-video config with a 4-layer LLM of width ``hidden``."""
    from dataclasses import replace

    from nvila.tiny import tiny_config

    config = tiny_config("nvila-video", len(tokenizer))
    config.llm = replace(config.llm, hidden_size=hidden, intermediate_size=3 * hidden, num_hidden_layers=4,
                         num_attention_heads=max(4, hidden // 64), num_key_value_heads=2)
    return config
