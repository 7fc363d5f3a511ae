"""Training step time: packed micro-batches (one row, block-diagonal mask) vs padded ones.

Builds the tiny NVILA-video model (random weights, 1 tile per image) with an LLM of width
``--hidden`` (4 layers) and a micro-batch of samples whose lengths vary like an SFT mix (one image
each, answers of 2..200 words), then times forward + backward (ViT frozen, projector + LLM trained,
float32) both ways, interleaved, and prints the median ratio. The packed row runs the trainer's
per-sample attention (``use_packed_attention``); padding runs transformers' SDPA with a 2-D mask. Usage: python benchmarks/bench_train_packing.py [--threads 2] [--hidden 512]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch

from common import cpu_report, make_caption_mixture, widened_tiny_config

from nvila.checkpoint import CHAT_TEMPLATES, token_ids
from nvila.model import NVILAForConditionalGeneration
from nvila.processor import NVILAProcessor
from nvila.tiny import build_tokenizer
from nvila.train.data import MixtureDataset, SampleEncoder, load_mixture
from nvila.train.packing import collate, use_packed_attention
from nvila.train.parts import token_ce as _token_ce


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--reps", type=int, default=4)
    ap.add_argument("--hidden", type=int, default=512, help="LLM width (the tiny checkpoint uses 64)")
    args = ap.parse_args()
    print(f"CPU: {cpu_report()}", flush=True)
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        tok = build_tokenizer()
        config = widened_tiny_config(tok, args.hidden)
        torch.manual_seed(0)
        processor = NVILAProcessor(tok, config)
        model = NVILAForConditionalGeneration(config, token_ids(tok, CHAT_TEMPLATES["qwen2"])).train()
        model.vision_tower.requires_grad_(False)
        ds = MixtureDataset(load_mixture(make_caption_mixture(root / "data", args.batch, 0, (2, 8, 30, 120, 200))))
        enc = SampleEncoder(processor, 8192)
        samples = [enc(*ds[i]) for i in range(len(ds))]
        lengths = [s.input_ids.numel() for s in samples]
        times = {}
        use_packed_attention(model.llm)  # what the trainer does with data.pack: per-sample SDPA
        batches = {p: collate(samples, packed=p, pad_id=processor.ids.pad) for p in (False, True)}
        labels = {p: b.pop("labels") for p, b in batches.items()}
        for _ in range(args.reps + 1):  # interleaved against drift on a shared machine; first round = warm-up
            for packed, batch in batches.items():
                t0 = time.perf_counter()
                _token_ce(model(**batch).logits, labels[packed]).sum().backward()
                times.setdefault(packed, []).append(time.perf_counter() - t0)
                model.zero_grad(set_to_none=True)
        times = {p: t[1:] for p, t in times.items()}
    pad_s, pack_s = statistics.median(times[False]), statistics.median(times[True])
    print(f"samples {len(lengths)}, lengths {min(lengths)}..{max(lengths)} (sum {sum(lengths)}), "
          f"padded tokens {len(lengths) * max(lengths)}, LLM width {args.hidden}, threads {args.threads}")
    print(f"padded: {pad_s * 1000:.0f} ms/step   packed: {pack_s * 1000:.0f} ms/step   "
          f"speed-up x{pad_s / pack_s:.2f} ({(1 - pack_s / pad_s) * 100:.0f}% less time)")


if __name__ == "__main__":
    main()
