"""Structured output cost: engine decode tokens/s with a JSON-schema constraint vs without.

    python benchmarks/bench_structured.py                       # a tiny random model and the bundled model
    python benchmarks/bench_structured.py --model PATH [--model PATH ...] --pairs 7 --tokens 96

For each model, paired runs alternate one unconstrained request (greedy, ``ignore_eos``, a fixed
number of tokens) and one request constrained by ``SCHEMA`` (greedy; it ends when the JSON closes or
at the same token budget), batch 1. It prints the median decode tokens/s of each, their ratio
(constrained / unconstrained; target >= 0.8) and the mask cost alone: microseconds per token to fill
the grammar's bitmask, mask a logits row and advance the matcher (sampling excluded), driven offline
by random logits.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

from common import cpu_report

from nvila.engine import Engine, EngineConfig, GenerationRequest
from nvila.engine.constraints import JsonConstraints

SCHEMA = {  # long enough to keep a random model busy: free strings, a bounded integer, an enum, an array
    "type": "object",
    "properties": {
        "name": {"type": "string"},
        "age": {"type": "integer", "minimum": 0, "maximum": 150},
        "colour": {"enum": ["red", "green", "blue"]},
        "notes": {"type": "array", "items": {"type": "string"}},
    },
    "required": ["name", "age", "colour", "notes"],
    "additionalProperties": False,
}
FORMAT = {"type": "json_schema", "json_schema": {"name": "person", "schema": SCHEMA}}
MESSAGES = [{"role": "user", "content": "Describe a person as JSON."}]


def decode_rate(engine: Engine, tokens: int, response_format: dict | None) -> tuple[float, int]:
    """(decode tokens/s, tokens) of one greedy request."""
    h = engine.submit(GenerationRequest(messages=MESSAGES, max_tokens=tokens, ignore_eos=response_format is None,
                                        response_format=response_format))
    h.text()
    return h.metrics.decode_tokens_per_s, h.metrics.completion_tokens


def mask_cost_us(engine: Engine, steps: int = 400) -> float:
    """Microseconds per token of the constraint alone (bitmask fill + masked row + accept; not the argmax)."""
    vocab = engine.model.config.llm.vocab_size
    constraints = JsonConstraints(engine.processor.tokenizer, vocab, sorted(engine.model.ids.stop))
    g = torch.Generator().manual_seed(0)
    rows = torch.randn(64, vocab, generator=g)
    done, elapsed, constraint = 0, 0.0, None
    while done < steps:
        if constraint is None:
            constraint = constraints.processor(FORMAT)
        row = rows[done % len(rows)].clone()
        t = time.perf_counter()
        constraint([], row)
        elapsed += time.perf_counter() - t
        token = int(row.argmax())  # sampling, which an unconstrained step does too: not timed
        t = time.perf_counter()
        finished = constraint.accept(token)
        elapsed += time.perf_counter() - t
        done += 1
        if finished or token in engine.model.ids.stop:
            constraint = None
    return elapsed / steps * 1e6


def bench(path: str, pairs: int, tokens: int, threads: int) -> dict:
    config = EngineConfig(max_batch_size=1, max_seq_len=2048, threads=threads, prefix_cache_mib=0)
    engine = Engine.from_pretrained(path, config=config)
    try:
        decode_rate(engine, 8, None)  # warm-up: first-call allocations, the grammar compile
        decode_rate(engine, 8, FORMAT)
        free, constrained, lengths = [], [], []
        for _ in range(pairs):
            free.append(decode_rate(engine, tokens, None)[0])
            rate, n = decode_rate(engine, tokens, FORMAT)
            constrained.append(rate)
            lengths.append(n)
        return {"model": Path(path).name, "vocab": engine.model.config.llm.vocab_size,
                "free": statistics.median(free), "json": statistics.median(constrained),
                "json_tokens": statistics.median(lengths), "mask_us": mask_cost_us(engine)}
    finally:
        engine.shutdown()


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", action="append", help="checkpoint (repeatable; default: a tiny random model and the "
                                                    "bundled model)")
    p.add_argument("--pairs", type=int, default=5, help="paired runs per model (default: %(default)s)")
    p.add_argument("--tokens", type=int, default=64, help="token budget per request (default: %(default)s)")
    p.add_argument("--threads", type=int, default=1, help="torch threads (default: %(default)s)")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    models = args.model
    with tempfile.TemporaryDirectory() as tmp:
        if not models:
            from nvila.bundled import default_model_path
            from nvila.tiny import build_tiny_checkpoint

            tiny = build_tiny_checkpoint(Path(tmp) / "tiny-nvila-lite", "nvila-lite")
            models = [str(tiny), str(default_model_path())]
        print(f"CPU: {cpu_report()}; torch {torch.__version__}, {args.threads} thread(s); batch 1, greedy, "
              f"{args.tokens}-token budget, {args.pairs} pairs (medians)")
        print(f"{'model':<22}{'vocab':>8}{'free tok/s':>12}{'json tok/s':>12}{'ratio':>8}{'json tokens':>13}"
              f"{'mask us/token':>15}")
        for path in models:
            r = bench(path, args.pairs, args.tokens, args.threads)
            print(f"{r['model']:<22}{r['vocab']:>8}{r['free']:>12.1f}{r['json']:>12.1f}{r['json'] / r['free']:>8.2f}"
                  f"{r['json_tokens']:>13.0f}{r['mask_us']:>15.1f}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
