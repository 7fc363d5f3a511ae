"""FP8 training memory (issue 21): one LLM training step's measured bytes and peak memory, per precision,
at the true widths of a shape and a few depths, and the largest micro-batch that fits a byte budget.

    python benchmarks/bench_fp8_memory.py --shape small                         # seconds, any CPU
    flock /tmp/nvila-bigmem python benchmarks/bench_fp8_memory.py --shape qwen2-1.5b --layers 2,4 --seq 512
    python benchmarks/bench_fp8_memory.py --shape qwen2-1.5b --layers 28 --device cuda --budget-gib 80

``--shape qwen2-1.5b``: hidden 1536, MLP 8960, 12/2 heads, vocab 151,936, tied embeddings (28 layers
in the real model; ``--layers`` picks the depths measured). For each depth, each of ``--runs``
(precision:optimizer) and each micro-batch of ``--batches`` (samples of ``--seq`` tokens), one process
builds the LLM, runs forward + loss + backward + optimizer step and reports, measured:

* ``saved_activation_bytes``: what autograd keeps for backward (saved-tensor hooks, each storage once,
  parameters excluded; FP8 linears' 1-byte weight copies included);
* ``optimizer_bytes``: the optimizer's state tensors after the step; ``weight_bytes``, ``grad_bytes``;
* ``peak_bytes``: the step's peak memory: ``torch.cuda.max_memory_allocated`` on CUDA; on CPU the
  process's peak RSS (VmHWM, reset just before the step), so it includes the interpreter and weights.

The byte counts are linear in depth and saved activations in micro-batch, so when the real depth does
not fit (a 28-layer float32 AdamW step needs ~25 GB), the report also gives the figures *composed*
from two measured depths (per layer = the difference / the layer difference; fixed = the rest) and
the largest micro-batch whose weights + gradients + optimizer state + saved activations fit
``--budget-gib`` (``compose``): composed, not measured, and labelled so. Results: JSON lines on
stdout (``--out`` also writes them with the composed figures).
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

SHAPES = {
    "qwen2-1.5b": dict(vocab_size=151936, hidden_size=1536, intermediate_size=8960, num_hidden_layers=28,
                       num_attention_heads=12, num_key_value_heads=2, tie_word_embeddings=True),
    "small": dict(vocab_size=512, hidden_size=256, intermediate_size=1408, num_hidden_layers=2,
                  num_attention_heads=8, num_key_value_heads=2),
}
KEYS = ("saved_activation_bytes", "optimizer_bytes", "weight_bytes", "grad_bytes", "peak_bytes")


def _hwm() -> int:
    """Peak RSS (bytes) since the last reset."""
    return int(re.search(r"VmHWM:\s+(\d+)", Path("/proc/self/status").read_text()).group(1)) * 1024


def _reset_hwm() -> None:
    Path("/proc/self/clear_refs").write_text("5")


def one_step(shape: str, layers: int, precision: str, optim: str, batch: int, seq: int, device: str,
             min_features: int, forward_only: bool = False) -> dict:
    """One training step at ``layers`` decoder layers; bytes measured, not estimated. ``forward_only``:
    forward + loss alone (what is saved for backward is known by then), no gradients nor optimizer
    state, so that a depth whose whole step does not fit can still have its saved bytes measured."""
    import torch
    import torch.nn.functional as F

    from nvila.config import LLMConfig
    from nvila.llm import build_llm
    from nvila.train.fp8 import SavedBytes, apply_precision
    from nvila.train.fp8_adamw import AdamWFP8

    cfg = replace(LLMConfig(**SHAPES[shape]), num_hidden_layers=layers)
    torch.manual_seed(0)
    with torch.device(device):
        llm = build_llm(cfg)
    if precision == "bf16":  # the trainer's model.dtype=bfloat16: weights, gradients and AdamW moments in bf16
        llm.to(torch.bfloat16)
    swapped = apply_precision(llm, precision, min_features)
    llm.train()
    params = list(llm.parameters())
    opt = AdamWFP8(params) if optim == "adamw_fp8" else torch.optim.AdamW(params)
    ids = torch.randint(0, cfg.vocab_size, (batch, seq), device=device)
    cuda = device.startswith("cuda")
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    else:
        _reset_hwm()
    t0 = time.perf_counter()
    with SavedBytes(llm) as saved:
        logits = llm(input_ids=ids).logits  # (B, T, V)
        loss = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), ids[:, 1:].flatten())  # float32 loss
    if not forward_only:
        loss.backward()
        opt.step()
    if cuda:
        torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() if cuda else _hwm()
    state = sum(v.numel() * v.element_size() for st in opt.state.values() for v in st.values() if torch.is_tensor(v))
    weights = sum(p.numel() * p.element_size() for p in params)
    grads = sum(p.grad.numel() * p.grad.element_size() for p in params if p.grad is not None)
    return {"shape": shape, "layers": layers, "precision": precision, "optim": optim, "batch": batch, "seq": seq,
            "device": device, "fp8_min_features": min_features, **swapped, "saved_activation_bytes": saved.bytes,
            "optimizer_bytes": state, "weight_bytes": weights, "grad_bytes": grads, "peak_bytes": peak,
            "step_s": time.perf_counter() - t0, "loss": loss.item(), "forward_only": forward_only}


def compose(rows: list[dict], depth: int, budget: float) -> dict:
    """Per-run figures at ``depth`` layers, composed from measured rows at two depths and two
    micro-batches: each figure is fitted as a + b·layers at the smaller micro-batch, and saved
    activations as fixed + per-sample·batch. The largest micro-batch is the largest ``b`` with
    weights + gradients + optimizer state + saved activations(b) <= ``budget``: a count of the
    measured tensors, not a peak (the peak RSS also holds the step's temporaries; it is reported
    per measured step). Returns run -> figures."""
    out = {}
    steps = [r for r in rows if not r.get("forward_only")]
    for run in sorted({(r["precision"], r["optim"]) for r in steps}, key=lambda r: r[0] != "fp32"):
        mine = [r for r in steps if (r["precision"], r["optim"]) == run]
        depths, batches = sorted({r["layers"] for r in mine}), sorted({r["batch"] for r in mine})
        if len(depths) < 2 or len(batches) < 2:
            continue
        (l0, l1), (b0, b1) = depths[:2], batches[:2]
        at = {(r["layers"], r["batch"]): r for r in mine}
        if not all(k in at for k in ((l0, b0), (l1, b0), (l0, b1), (l1, b1))):
            continue

        def per_depth(key: str, b: int) -> float:
            lo, hi = at[(l0, b)][key], at[(l1, b)][key]
            return lo + (hi - lo) / (l1 - l0) * (depth - l0)

        fig = {k: per_depth(k, b0) for k in KEYS}
        per_sample = (per_depth("saved_activation_bytes", b1) - fig["saved_activation_bytes"]) / (b1 - b0)
        fixed = fig["weight_bytes"] + fig["grad_bytes"] + fig["optimizer_bytes"] + \
            fig["saved_activation_bytes"] - b0 * per_sample
        out[f"{run[0]}+{run[1]}"] = {"at_batch": b0, **fig, "saved_activation_bytes_per_sample": per_sample,
                                     "state_and_fixed_bytes": fixed,
                                     "largest_micro_batch": max(int((budget - fixed) // per_sample), 0)}
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", choices=SHAPES, default="small")
    ap.add_argument("--layers", default=None, help="depths to measure, comma-separated (default: the shape's)")
    ap.add_argument("--compose-depth", type=int, default=None, help="depth to compose to (default: the shape's)")
    ap.add_argument("--seq", type=int, default=512, help="tokens per sample")
    ap.add_argument("--batches", default="1,2", help="micro-batches to measure, comma-separated")
    ap.add_argument("--runs", default="fp32:adamw,fp8-coat:adamw_fp8",
                    help="precision:optimizer, comma-separated; precision: fp32, bf16 (bf16 weights, gradients and "
                         "AdamW moments, as model.dtype=bfloat16), fp8-linear or fp8-coat (float32 weights)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--budget-gib", type=float, default=40.0)
    ap.add_argument("--min-features", type=int, default=0,
                    help="FP8 for linears with min(in, out) >= this (the reference uses 3584, which skips all of 1.5B)")
    ap.add_argument("--out", type=Path, default=None, help="write the rows and the composed figures here (JSON)")
    ap.add_argument("--from", dest="sources", type=Path, nargs="+", default=None,
                    help="measure nothing: compose from the rows of earlier --out files")
    ap.add_argument("--forward-only", action="store_true",
                    help="measure forward + loss only: saved-activation bytes at depths whose whole step does not fit")
    ap.add_argument("--one", action="store_true", help=argparse.SUPPRESS)  # one step in this process
    args = ap.parse_args()
    depths = [int(x) for x in (args.layers or str(SHAPES[args.shape]["num_hidden_layers"])).split(",")]
    runs = [tuple(r.split(":")) for r in args.runs.split(",")]
    batches = [int(b) for b in args.batches.split(",")]
    if args.one:
        (precision, optim), = runs
        print(json.dumps(one_step(args.shape, depths[0], precision, optim, batches[0], args.seq, args.device,
                                  args.min_features, args.forward_only)), flush=True)
        return
    rows = [r for src in args.sources for r in json.loads(src.read_text())["rows"]] if args.sources else []
    for layers in depths if not args.sources else ():
        for precision, optim in runs:
            for batch in batches:  # a fresh process each, so the peak is this step's alone
                cmd = [sys.executable, __file__, "--one", "--shape", args.shape, "--layers", str(layers),
                       "--runs", f"{precision}:{optim}", "--batches", str(batch), "--seq", str(args.seq),
                       "--device", args.device, "--min-features", str(args.min_features)] + \
                    (["--forward-only"] if args.forward_only else [])
                line = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout.strip().splitlines()[-1]
                rows.append(json.loads(line))
                print(line, flush=True)
    depth = args.compose_depth or SHAPES[args.shape]["num_hidden_layers"]
    composed = compose(rows, depth, args.budget_gib * 2**30)
    if composed:
        print(json.dumps({"composed_from_measured": True, "depth": depth, "budget_gib": args.budget_gib,
                          "runs": composed}), flush=True)
    if args.out:
        args.out.write_text(json.dumps({"rows": rows, "composed": {"depth": depth, "budget_gib": args.budget_gib,
                                                                  "runs": composed}}, indent=1))


if __name__ == "__main__":
    main()
