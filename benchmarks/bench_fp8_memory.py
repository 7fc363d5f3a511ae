"""FP8 training memory (issue 21): one LLM training step's measured peak, per precision, and the largest
micro-batch (sequence of ``--seq`` tokens per sample) that fits a byte budget.

For each of fp32+adamw, fp8-linear+adamw and fp8-coat+adamw_fp8 it builds the Qwen2 LLM at
``--shape`` (``qwen2-1.5b``: hidden 1536, MLP 8960, 28 layers, 12/2 heads, vocab 151,936;
``small``: a 2-layer 256-wide stand-in for checking the script), runs forward + backward + optimizer
step and reports: saved-activation bytes (saved-tensor hooks), optimizer-state bytes, and the
step's peak memory (``torch.cuda.max_memory_allocated`` on CUDA; on CPU the process's peak RSS
growth, which is coarse). Then it doubles the micro-batch until a step no longer fits ``--budget-gib``
(counted as weights + grads + optimizer state + saved activations).

    python benchmarks/bench_fp8_memory.py --shape small                  # seconds, any CPU
    python benchmarks/bench_fp8_memory.py --shape qwen2-1.5b --device cuda --budget-gib 80

Do not run qwen2-1.5b on a small CPU machine: one fp32 step needs > 20 GiB.
"""

from __future__ import annotations

import argparse
import json
import resource
import time
from dataclasses import replace

import torch
import torch.nn.functional as F

from nvila.config import LLMConfig
from nvila.llm import build_llm
from nvila.train.fp8 import SavedBytes, apply_precision
from nvila.train.fp8_adamw import AdamWFP8

SHAPES = {
    "qwen2-1.5b": LLMConfig(vocab_size=151936, hidden_size=1536, intermediate_size=8960, num_hidden_layers=28,
                            num_attention_heads=12, num_key_value_heads=2),
    "small": LLMConfig(vocab_size=512, hidden_size=256, intermediate_size=1408, num_hidden_layers=2,
                       num_attention_heads=8, num_key_value_heads=2),
}
RUNS = (("fp32", "adamw"), ("fp8-linear", "adamw"), ("fp8-coat", "adamw_fp8"))


def _rss() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def step(cfg: LLMConfig, precision: str, optim: str, batch: int, seq: int, device: str, min_features: int) -> dict:
    """One training step; bytes measured, not estimated."""
    torch.manual_seed(0)
    with torch.device(device):
        llm = build_llm(replace(cfg))
    apply_precision(llm, precision, min_features)
    llm.train()
    params = list(llm.parameters())
    opt = AdamWFP8(params) if optim == "adamw_fp8" else torch.optim.AdamW(params)
    ids = torch.randint(0, cfg.vocab_size, (batch, seq), device=device)
    if device.startswith("cuda"):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    rss0, t0 = _rss(), time.perf_counter()
    with SavedBytes(llm) as saved:
        logits = llm(input_ids=ids).logits
    F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), ids[:, 1:].flatten()).backward()
    opt.step()
    peak = torch.cuda.max_memory_allocated() if device.startswith("cuda") else _rss() - rss0
    state = sum(v.numel() * v.element_size() for st in opt.state.values() for v in st.values() if torch.is_tensor(v))
    weights = sum(p.numel() * p.element_size() for p in params)
    return {"precision": precision, "optim": optim, "batch": batch, "seq": seq, "saved_activation_bytes": saved.bytes,
            "optimizer_bytes": state, "weight_bytes": weights, "grad_bytes": weights, "peak_bytes": peak,
            "step_s": time.perf_counter() - t0}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shape", choices=SHAPES, default="small")
    ap.add_argument("--seq", type=int, default=256, help="tokens per sample")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--budget-gib", type=float, default=0.25)
    ap.add_argument("--max-batch", type=int, default=64)
    ap.add_argument("--min-features", type=int, default=0,
                    help="FP8 for linears with min(in, out) >= this (the reference uses 3584, which skips all of 1.5B)")
    args = ap.parse_args()
    cfg, budget = SHAPES[args.shape], args.budget_gib * 2**30
    for precision, optim in RUNS:
        one = step(cfg, precision, optim, 1, args.seq, args.device, args.min_features)
        best, batch = 0, 1
        while batch <= args.max_batch:
            r = one if batch == 1 else step(cfg, precision, optim, batch, args.seq, args.device, args.min_features)
            used = r["weight_bytes"] + r["grad_bytes"] + r["optimizer_bytes"] + r["saved_activation_bytes"]
            if used > budget:
                break
            best, batch = batch, batch * 2
        print(json.dumps({**one, "shape": args.shape, "largest_micro_batch": best, "budget_gib": args.budget_gib}))


if __name__ == "__main__":
    main()
