"""NVILA's Table 4 (FP8 training) in miniature, on SynthVILA (issue 21).

    python benchmarks/ablation_fp8.py --run runs/ablation_fp8                  # every variant, seeds 0 and 1
    python benchmarks/ablation_fp8.py --run runs/ablation_fp8 --seeds 1        # one seed (run two in parallel)
    python benchmarks/ablation_fp8.py --run runs/ablation_fp8 --report         # table + plot of what is done
    python benchmarks/ablation_fp8.py --run runs/ablation_fp8_fresh --fresh-projector  # a stage that learns
    python benchmarks/ablation_fp8.py --run /tmp/fp8 --steps 2 --eval 2 --data-size 8   # smoke

One fine-tuning stage, the same for every variant: from the same checkpoint (``--base``, default the
recipe's stage 8, the v16 SynthVILA), the projector and the LLM train (ViT frozen; the recipe's
stage-2 YAML at the SFT learning rate 3e-4) for ``--steps`` steps of ``--batch`` packed samples on the
same data in the same order (``run.seed``). The mixture weights the image count 3:1 against the four
other image families: the count is the family the start checkpoint is weakest on (held-out 0.36),
the others measure that nothing is lost. ``--fresh-projector`` starts instead from the base's ViT and
LLM with a fresh seeded projector (every family at chance) and runs the recipe's stage-2 protocol
(projector + LLM at the YAML's LR 1e-3, from a mean-centred projector): a stage with a lot to learn.
Variants:

* ``fp32``: float32 everything, torch AdamW;
* ``fp8-linear``: the LLM's decoder linears in FP8 (E4M3 forward, E5M2 gradients);
* ``fp8-coat``: plus COAT's FP8 activation flow (RMSNorm and SiLU-mul inputs saved as E4M3 1x16);
* ``fp8-coat + adamw_fp8``: plus both Adam moments in E4M3 with range expansion.

``model.fp8_min_features`` (``--min-features``, default 0) is the FP8 threshold: at 0 every decoder
linear of the 256-wide LLM is FP8 (q/o 256x256, k/v 256x128, gate/up/down 256x704); the reference's
3584 would quantize none of them. Each (variant, seed) writes ``<run>/<variant>/s<seed>/result.json``
(held-out accuracy per family, the loss curve, step time, peak memory, optimizer-state and saved
activation bytes from the trainer's metrics.jsonl), each in its own process so that the peak RSS is
the variant's own. ``--report`` writes ``<run>/ablation_fp8.md`` and
``<run>/ablation_fp8.png`` from every result present.
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
STAGE_YAML = HERE.parent / "recipes" / "synthvila" / "stage2_llm.yaml"
TRAIN = {"coarse_count": 3, "compare_count": 1, "compare_colour": 1, "coarse_colour": 1, "coarse_shape": 1}
FAMILIES = tuple(TRAIN)
VARIANTS = {  # name -> (model.precision, optim.name)
    "fp32": ("fp32", "adamw"),
    "fp8-linear": ("fp8-linear", "adamw"),
    "fp8-coat": ("fp8-coat", "adamw"),
    "fp8-coat + adamw_fp8": ("fp8-coat", "adamw_fp8"),
}
LR = "3e-4"


def slug(name: str) -> str:
    return name.replace(" + ", "+").replace(" ", "_")


def run_variant(name: str, seed: int, args, data: Path, split: Path) -> dict:
    """Train and evaluate one (variant, seed); the result dict (also written as result.json)."""
    from nvila.eval import evaluate
    from nvila.train.synthvila import Stage, run_stage

    precision, optim = VARIANTS[name]
    out = args.run / slug(name) / f"s{seed}"
    stage = Stage(name, STAGE_YAML, TRAIN, args.steps, args.batch, centre=args.fresh_projector)
    lrs = [] if args.fresh_projector else [f"optim.lr.projector={LR}", f"optim.lr.llm={LR}"]
    t = time.perf_counter()
    final = run_stage(stage, start_checkpoint(args), out, data, threads=args.threads, seed=seed, progress=False,
                      overrides=[f"model.precision={precision}", f"model.fp8_min_features={args.min_features}",
                                 f"optim.name={optim}", *lrs, "model.gradient_checkpointing=false"])
    train_s = time.perf_counter() - t
    res = evaluate(final, split, progress=False)
    metrics = [json.loads(ln) for ln in (out / "metrics.jsonl").read_text().splitlines()]
    times = [m["step_time_s"] for m in metrics[1:]] or [metrics[0]["step_time_s"]]
    result = {"variant": name, "precision": precision, "optim": optim, "seed": seed, "steps": args.steps,
              "batch": args.batch, "min_features": args.min_features, "train_s": train_s,
              "accuracy": {f: v["accuracy"] for f, v in res["families"].items()},
              "n": {f: v["n"] for f, v in res["families"].items()},
              "loss": [m["loss"] for m in metrics], "step_time_s": statistics.median(times),
              "tokens_per_step": statistics.mean(m["tokens"] for m in metrics),
              "peak_memory_mib": max(m["memory_mib"] for m in metrics),
              "saved_bytes": max(m["saved_bytes"] for m in metrics),
              "optimizer_bytes": metrics[-1]["state_bytes"]["optimizer"],
              "param_bytes": metrics[-1]["state_bytes"]["params"]}
    (out / "result.json").write_text(json.dumps(result, indent=1))
    return result


def start_checkpoint(args) -> Path:
    """``--base``, or with ``--fresh-projector`` its ViT and LLM with a fresh projector (written once)."""
    if not args.fresh_projector:
        return args.base
    from nvila.train.synthvila import init_checkpoint

    out = args.run / "start-fresh-projector"
    if not (out / "config.json").is_file():
        init_checkpoint(out, seed=0, base=args.base, dynamic_s2=True, projector_type="mlp_downsample")
    return out


def load_results(run: Path) -> dict[str, list[dict]]:
    """variant -> its seeds' results, in VARIANTS order."""
    found = {}
    for name in VARIANTS:
        rows = [json.loads(p.read_text()) for p in sorted((run / slug(name)).glob("s*/result.json"))]
        if rows:
            found[name] = rows
    return found


def _mean(xs) -> float:
    return sum(xs) / len(xs)


def _seeds(xs: list[float], digits: int) -> str:
    """'mean (seed values)'."""
    return f"{_mean(xs):.{digits}f} ({'/'.join(f'{x:.{digits}f}' for x in xs)})"


def to_markdown(results: dict[str, list[dict]], start: dict | None) -> str:
    fams = FAMILIES
    head = "| variant | seeds | " + " | ".join(fams) + " | all five | loss, last 25 steps | loss, all steps | " \
           "step time | peak RSS | optimizer state | saved activations |"
    lines = ["Held-out exact match per family and training loss (mean of seeds; each seed in brackets), the "
             "median step time, the process's peak RSS, and the measured bytes (trainer metrics).",
             "", head, "|" + "---|" * (len(fams) + 9)]
    if start:
        lines.append("| start (no fine-tuning) | – | " + " | ".join(f"{start[f]:.2f}" for f in fams)
                     + f" | {_mean([start[f] for f in fams]):.3f} | – | – | – | – | – | – |")
    for name, rows in results.items():
        accs = " | ".join(_seeds([r["accuracy"][f] for r in rows], 2) for f in fams)
        alls = [_mean([r["accuracy"][f] for f in fams]) for r in rows]
        tail = [_mean(r["loss"][-25:]) for r in rows]
        whole = [_mean(r["loss"]) for r in rows]
        lines.append(f"| {name} | {len(rows)} | {accs} | {_seeds(alls, 3)}"
                     f" | {_seeds(tail, 3)} | {_seeds(whole, 3)} | {_mean([r['step_time_s'] for r in rows]):.2f} s"
                     f" | {max(r['peak_memory_mib'] for r in rows):.0f} MiB"
                     f" | {rows[0]['optimizer_bytes'] / 1e6:.2f} MB"
                     f" | {_mean([r['saved_bytes'] for r in rows]) / 1e6:.1f} MB |")
    ref = results.get("fp32")
    if ref and len(ref) > 1:
        noise = {f: abs(ref[0]["accuracy"][f] - ref[1]["accuracy"][f]) for f in fams}
        whole = abs(_mean([ref[0]["accuracy"][f] for f in fams]) - _mean([ref[1]["accuracy"][f] for f in fams]))
        lines += ["", "Seed noise (fp32, |seed 0 - seed 1|; seeds change the data order): "
                  + ", ".join(f"{f} {v:.2f}" for f, v in noise.items()) + f"; all five {whole:.3f}."]
        for name, rows in results.items():
            if name == "fp32":
                continue
            gaps = {f: _mean([r["accuracy"][f] for r in rows]) - _mean([r["accuracy"][f] for r in ref]) for f in fams}
            by_seed = {q["seed"]: q for q in ref}
            paired = {r["seed"]: _mean(r["loss"]) - _mean(by_seed[r["seed"]]["loss"])  # same seed: same batches
                      for r in rows if r["seed"] in by_seed}
            lines.append(f"* {name} - fp32 (mean of seeds): " + ", ".join(f"{f} {g:+.2f}" for f, g in gaps.items())
                         + "; loss over all steps, same seed: "
                         + ", ".join(f"seed {k} {d:+.4f}" for k, d in sorted(paired.items())))
    return "\n".join(lines) + "\n"


def plot(results: dict[str, list[dict]], start: dict | None, path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(14, 4.6), gridspec_kw={"width_ratios": [3, 2]})
    colours = dict(zip(VARIANTS, ("black", "tab:blue", "tab:orange", "tab:red")))
    window = 10
    for name, rows in results.items():
        for r in rows:
            loss = r["loss"]
            smooth = [_mean(loss[max(0, i - window + 1): i + 1]) for i in range(len(loss))]
            a.plot(range(1, len(loss) + 1), smooth, color=colours[name], lw=1.2,
                   ls="-" if r["seed"] == rows[0]["seed"] else "--", label=f"{name}, seed {r['seed']}")
    a.set_xlabel("step")
    a.set_ylabel(f"training loss (moving mean over {window} steps)")
    a.set_title("Table 4 in miniature: the same fine-tuning stage per precision")
    a.legend(fontsize=7, ncol=2)
    names = (["start"] if start else []) + list(results)
    width = 0.8 / len(names)
    for k, name in enumerate(names):
        vals = [start[f] for f in FAMILIES] if name == "start" else \
            [_mean([r["accuracy"][f] for r in results[name]]) for f in FAMILIES]
        b.bar([i + (k - (len(names) - 1) / 2) * width for i in range(len(FAMILIES))], vals, width,
              color="lightgrey" if name == "start" else colours[name], label=name)
    b.set_xticks(range(len(FAMILIES)), FAMILIES, fontsize=7)
    b.set_ylim(0, 1.05)
    b.set_ylabel("held-out exact match (mean of seeds)")
    b.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--base", type=Path, default=Path("runs/synthvila/stage8_joint_sft/final"),
                        help="start checkpoint of every variant (default: the recipe's stage 8, "
                             "`make synthvila`; RESULTS used the v16 bundle of commit 2d2b2e1, the same weights)")
    parser.add_argument("--run", type=Path, default=Path("runs/ablation_fp8"), help="output directory")
    parser.add_argument("--variants", default=",".join(VARIANTS), help=f"comma-separated, of: {', '.join(VARIANTS)}")
    parser.add_argument("--seeds", default="0,1")
    parser.add_argument("--steps", type=int, default=250)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--eval", type=int, default=100, help="held-out samples per family")
    parser.add_argument("--data-size", type=int, default=1000, help="train samples per family")
    parser.add_argument("--fresh-projector", action="store_true",
                        help="start from --base's ViT and LLM with a fresh projector (see above)")
    parser.add_argument("--min-features", type=int, default=0, help="model.fp8_min_features")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--report", action="store_true", help="only write the table and plot")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    variants = [v.strip() for v in args.variants.split(",")]
    if unknown := [v for v in variants if v not in VARIANTS]:
        sys.stderr.write(f"ablation_fp8: error: unknown variant {unknown}; valid: {', '.join(VARIANTS)}\n")
        return 2
    if not (args.base / "config.json").is_file():
        sys.stderr.write(f"ablation_fp8: error: no checkpoint at {args.base} (pass --base)\n")
        return 2

    import torch

    from nvila.data.synthetic import generate_eval_splits
    from nvila.eval import evaluate
    from nvila.train.synthvila import make_data

    torch.set_num_threads(args.threads)
    args.run.mkdir(parents=True, exist_ok=True)
    start_path = args.run / "start.json"
    if not args.report:
        data = make_data(args.run / "data", {f: args.data_size for f in FAMILIES})
        split = args.run / "eval" / "eval.jsonl"  # one held-out split, written once (parallel seeds share it)
        if not split.is_file():
            split = generate_eval_splits(list(FAMILIES), args.eval, args.run / "eval")
        if not start_path.is_file():
            res = evaluate(start_checkpoint(args), split, progress=False)
            start_path.write_text(json.dumps({f: v["accuracy"] for f, v in res["families"].items()}))
        todo = [(name, seed) for seed in (int(s) for s in args.seeds.split(",")) for name in variants
                if not (args.run / slug(name) / f"s{seed}" / "result.json").is_file()]
        if len(todo) == 1:
            run_variant(*todo[0], args, data, split)
        for name, seed in todo if len(todo) > 1 else ():  # one process each: the peak RSS is per variant
            subprocess.run([sys.executable, __file__, *(argv if argv is not None else sys.argv[1:]),
                            "--variants", name, "--seeds", str(seed)], check=True)
    results = load_results(args.run)
    start = json.loads(start_path.read_text()) if start_path.is_file() else None
    if results:
        table = to_markdown(results, start)
        (args.run / "ablation_fp8.md").write_text(table)
        plot(results, start, args.run / "ablation_fp8.png")
        sys.stdout.write(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
