"""Issue 23 benchmark b: follow-up-turn TTFT with the engine's prefix cache against without.

    python benchmarks/bench_prefix.py            # 2 pairs of 3-turn chats (~5 min on 2 cores)
    python benchmarks/bench_prefix.py --quick    # 1 pair

A 3-turn chat about one 896x896 image on an NVILA-Lite-2B-shaped model (random weights, float32):
the same turns go to two engines over one model, one with the prefix cache and one without. Both keep
the vision-feature cache, so the uncached follow-ups skip the tower too and the difference is the
LLM prefill. Each pair uses a new image, so no run starts from another's cache. Reported: medians of
TTFT per turn (submit to first token: preprocessing, prefix lookup and prefill) and of the prefill
alone, the ratio cached / uncached for turns 2 and 3 (target <= 0.1), and the cached engine's
reused tokens. The answers of both engines are checked to be the same ids.

Random weights answer with random ids, most of which the small benchmark tokenizer cannot spell, so
their text would not tokenize back to the same ids when the client sends it back as the assistant
turn; a trained model's answers do. Each answer is therefore scripted (a logits processor forces the
ids of a fixed sentence, which round-trip), so that the follow-up prompt holds the answer's ids as a
chat client would send them. The decode work is the same as a free answer's.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys

import torch
from PIL import ImageDraw

from bench_engine import build_nvila_lite_2b, test_image
from common import cpu_report
from nvila.engine import Engine, EngineConfig, GenerationRequest, LogitsProcessor

QUESTIONS = ["Describe the image in detail.", "What colours are the rectangles?", "How many are there?"]
ANSWER = "There are twelve rectangles in a diagonal line, shading from dark blue to green on a pale background."


class Script(LogitsProcessor):
    """Forces the ids of a fixed answer, one per step."""

    def __init__(self, ids: list[int]):
        self.ids = ids

    def __call__(self, generated, logits):
        token = self.ids[len(generated)]
        logits.fill_(float("-inf"))
        logits[token] = 0.0
        return logits


def chat(engine: Engine, image, answer: list[int]) -> tuple[list[float], list[float], list[int], list[list[int]]]:
    """(TTFT per turn, prefill seconds per turn, reused prompt tokens per turn, answer ids per turn)
    of one 3-turn chat."""
    messages, ttft, prefill, reused, ids = [], [], [], [], []
    for q in QUESTIONS:
        content = [{"type": "image", "image": image}, {"type": "text", "text": q}] if not messages else q
        messages.append({"role": "user", "content": content})
        h = engine.submit(GenerationRequest(messages=messages, max_tokens=len(answer), ignore_eos=True,
                                            logits_processors=[Script(answer)]))
        text = h.text()
        ttft.append(h.metrics.ttft_s)
        prefill.append(h.metrics.prefill_s)
        reused.append(h.metrics.cached_tokens)
        ids.append(h.token_ids)
        messages.append({"role": "assistant", "content": text})
    return ttft, prefill, reused, ids


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="1 pair")
    ap.add_argument("--pairs", type=int, default=2)
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    args = ap.parse_args()
    if args.quick:
        args.pairs = 1
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"CPU: {cpu_report()}; torch {torch.__version__}, {torch.get_num_threads()} thread(s)", flush=True)
    model, processor, plain = build_nvila_lite_2b(args.threads)
    plain.shutdown()
    cached = Engine(model, processor, EngineConfig(max_batch_size=1, max_seq_len=4096, threads=args.threads))
    plain = Engine(model, processor, EngineConfig(max_batch_size=1, max_seq_len=4096, threads=args.threads,
                                                  prefix_cache_mib=0))
    runs = {"cached": [], "plain": []}
    answer = processor.tokenizer.encode(ANSWER, add_special_tokens=False)
    try:
        for i in range(args.pairs):
            image = test_image(896)
            ImageDraw.Draw(image).rectangle([0, 0, 40, 40], fill=(i * 40 % 256, 10, 10))  # a new image per pair
            a, b = chat(cached, image, answer), chat(plain, image, answer)
            if a[3] != b[3]:
                raise SystemExit("the cached engine's answers differ from the uncached one's")
            runs["cached"].append(a)
            runs["plain"].append(b)
            print(json.dumps({"pair": i, "cached_ttft_s": a[0], "plain_ttft_s": b[0], "cached_prefill_s": a[1],
                              "plain_prefill_s": b[1], "reused_tokens": a[2]}), flush=True)
    finally:
        cached.shutdown()
        plain.shutdown()
    med = {k: [statistics.median(r[0][t] for r in v) for t in range(3)] for k, v in runs.items()}
    pre = {k: [statistics.median(r[1][t] for r in v) for t in range(3)] for k, v in runs.items()}
    prompt = [len(processor.prepare([[{"role": "user", "content": [{"type": "image", "image": test_image(896)},
                                                                   {"type": "text", "text": QUESTIONS[0]}]}]])[0]
                  ["input_ids"][0])]
    result = {"cpu": cpu_report(), "threads": torch.get_num_threads(), "pairs": args.pairs,
              "first_prompt_tokens": prompt[0], "answer_tokens": len(answer), "reused_tokens": runs["cached"][0][2],
              "cached_ttft_s": med["cached"], "plain_ttft_s": med["plain"],
              "cached_prefill_s": pre["cached"], "plain_prefill_s": pre["plain"],
              "turn2_ratio": med["cached"][1] / med["plain"][1], "turn3_ratio": med["cached"][2] / med["plain"][2],
              "target": "<= 0.1"}
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
