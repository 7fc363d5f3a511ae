"""Issue 22 benchmark: ``nvila eval`` throughput, engine at --batch-size 8 vs 1, side by side in one run.

    python benchmarks/bench_eval.py                      # 64 samples of every SynthVILA family, 3 pairs
    python benchmarks/bench_eval.py --samples 4 --pairs 1 --families coarse_colour   # smoke run

Model: the bundled SynthVILA checkpoint (``nvila.bundled``), float32, on the CPU. Data: each
family's eval split at the ``small`` preset, generated once into a temporary directory. Each pair
runs ``nvila.eval.evaluate`` at batch size 1 and at batch size 8 on the same samples (alternating
which goes first) and times the answering only (model loading excluded, ``result["seconds"]``).
Prints samples/s per side (median over pairs), the ratio 8 / 1, and whether the two sides gave the
same predictions.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
from pathlib import Path

import torch

from common import cpu_report
from nvila.bundled import default_model_path
from nvila.data.synthetic import FAMILIES, generate_eval_splits
from nvila.eval import evaluate

SIDES = (1, 8)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--samples", type=int, default=64, help="samples per family")
    ap.add_argument("--pairs", type=int, default=3, help="paired repetitions (batch 1, batch 8)")
    ap.add_argument("--families", default="all", help="comma-separated SynthVILA families, or 'all'")
    ap.add_argument("--max-new-tokens", type=int, default=16)
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"CPU: {cpu_report()}; torch threads {torch.get_num_threads()}", flush=True)
    families = None if args.families == "all" else args.families.split(",")
    model = default_model_path()
    with tempfile.TemporaryDirectory(prefix="bench-eval-") as tmp:
        task = generate_eval_splits(families, args.samples, Path(tmp), preset="small")
        rates: dict[int, list[float]] = {b: [] for b in SIDES}
        predictions: dict[int, list[str]] = {}
        n = 0
        for pair in range(args.pairs):
            for b in SIDES if pair % 2 == 0 else SIDES[::-1]:
                result = evaluate(model, task, max_new_tokens=args.max_new_tokens, batch_size=b, progress=False)
                n = result["n"]
                rates[b].append(n / result["seconds"])
                predictions[b] = [s["prediction"] for s in result["samples"]]
                print(f"pair {pair + 1}: batch {b}: {n} samples in {result['seconds']:.2f} s "
                      f"({rates[b][-1]:.2f} samples/s), accuracy {result['accuracy']:.3f}", flush=True)
    one, eight = (statistics.median(rates[b]) for b in SIDES)
    same = predictions[1] == predictions[8]
    print(f"\n{n} samples ({', '.join(families or FAMILIES)}), median of {args.pairs} pair(s):")
    print(f"  --batch-size 1: {one:.2f} samples/s")
    print(f"  --batch-size 8: {eight:.2f} samples/s")
    print(f"  ratio 8 / 1: {eight / one:.2f}x; identical predictions: {same}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
