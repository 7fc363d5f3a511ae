"""DeltaLoss scoring throughput: ``--batch`` samples packed per forward vs one sample per forward.

Builds two tiny NVILA-video checkpoints (random weights, LLM width ``--hidden``, 4 layers; seeds 0 and
1, one tokenizer) and ``--samples`` image QA records whose answers vary in length like an SFT mix,
then scores them all with ``nvila.prune.score.score_records`` both ways at the same thread count,
interleaved over ``--reps`` rounds, and prints samples/s, the ratio and the largest score difference
between the two ways (it must stay <= 1e-5). Encoding (the processor) is part of both timings, as in
a real run. Usage: python benchmarks/bench_prune.py [--threads 2] [--samples 32] [--batch 8] [--hidden 256]
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch

from common import cpu_report, make_caption_mixture, widened_tiny_config
from nvila.checkpoint import CHAT_TEMPLATES, save_pretrained, token_ids
from nvila.model import NVILAForConditionalGeneration
from nvila.processor import NVILAProcessor
from nvila.prune.score import ScoresFile, pending, score_records
from nvila.tiny import build_tokenizer
from nvila.train.data import SampleEncoder, load_mixture
from nvila.train.packing import use_packed_attention


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--samples", type=int, default=32)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--hidden", type=int, default=256, help="LLM width (the tiny checkpoint uses 64)")
    args = ap.parse_args()
    print(f"CPU: {cpu_report()}", flush=True)
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        tok = build_tokenizer()
        config = widened_tiny_config(tok, args.hidden)
        models = {}
        for name, seed in (("large", 0), ("small", 1)):
            torch.manual_seed(seed)
            model = NVILAForConditionalGeneration(config, token_ids(tok, CHAT_TEMPLATES["qwen2"]))
            save_pretrained(model, tok, root / name)  # the published layout, as nvila prune reads it
            models[name] = NVILAForConditionalGeneration.from_pretrained(root / name).eval()
            use_packed_attention(models[name].llm)
        specs = load_mixture(make_caption_mixture(root / "data", args.samples, 0, (2, 8, 30, 120)))
        encoder = SampleEncoder(NVILAProcessor.from_pretrained(root / "large"), 8192)
        encoders = {"large": encoder, "small": encoder}
        todo = pending(specs, set(), {"d": list(range(args.samples))})
        rates: dict[int, list[float]] = {1: [], args.batch: []}
        scores: dict[int, list[float]] = {}
        for rep in range(args.reps + 1):  # interleaved against drift on a shared machine; round 0 = warm-up
            for b in rates:
                path = root / f"scores-{b}-{rep}.jsonl"
                sink = ScoresFile(path, {})
                t0 = time.perf_counter()
                score_records(todo, specs, models, encoders, sink, batch_size=b, reduction="mean", progress=False)
                dt = time.perf_counter() - t0
                sink.close()
                if rep:
                    rates[b].append(args.samples / dt)
                scores[b] = [json.loads(ln)["score"] for ln in path.read_text().splitlines()[1:]]
        diff = max(abs(a - c) for a, c in zip(scores[1], scores[args.batch]))
        one, many = statistics.median(rates[1]), statistics.median(rates[args.batch])
        print(f"threads {args.threads}, {args.samples} samples, LLM width {args.hidden}")
        print(f"  one sample per forward : {one:8.2f} samples/s")
        print(f"  {args.batch:>3} packed per forward: {many:8.2f} samples/s   ({many / one:.2f}x)")
        print(f"  largest score difference: {diff:.2e}")


if __name__ == "__main__":
    main()
