"""The NVILA paper's Table 10 (temporal localization) in miniature, on SynthVILA (issue 19).

    python benchmarks/ablation_time_tokens.py --data runs/loc/data   # ~20 min, 1 thread (after the recipe's --start run)
    python benchmarks/ablation_time_tokens.py --mode smoke --data /tmp/loc/data --run /tmp/abl-tt

Every variant starts from the same checkpoint (``--base``, the frozen v16 bundle: recipe stage 8) and
trains with the recipe's stage-9 YAML (``recipes/synthvila/stage9_localize.yaml``: learning rates,
everything trainable) on the localization family ``video_localize`` alone, 150 steps of 8 clips
(fewer than the recipe's stage 9, which also replays the video families, so that
six runs fit on two cores), the same data and steps for every variant, differing only in how a
timestamp is written and learned:

* ``time tokens + soft CE``: 17 time tokens added (mean-initialised rows), the smoothed loss
  (sigma 1 token), as the recipe;
* ``time tokens + hard CE``: the same tokens, the ordinary token CE;
* ``decimal text``: no time tokens; the answer's ``<2> <5>`` stays text (byte-level tokens ``<``,
  digits, ``>``), the ordinary token CE.

Each variant trains with ``--seeds`` data-order seeds (``run.seed``; the start is the same), and is
scored on ``--eval`` held-out clips of the family (its eval seed): mean IoU and Precision@0.5 by the
reference's rule (``nvila eval``), next to the always-whole-clip and random-interval baselines
(``nvila.data.synthetic_localize.interval_baselines``). ``--fps 1,2,4`` draws each clip's frame rate
from the list, so one clip of 16 frames lasts 16, 8 or 4 s and its duration is not in its frames (as
videos of different lengths sampled to a fixed frame count); the script then writes its own train
split (the recipe's size and seed) under ``<run>/data`` and ignores ``--data``. Results: ``<run>/results.json``, ``<run>/table10.md`` and ``<run>/table10.png``.
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import sys
from pathlib import Path

from common import cpu_report

HERE = Path(__file__).resolve().parent
RECIPES = HERE.parent / "recipes" / "synthvila"
FAMILY = "video_localize"

# variant -> trainer overrides of the recipe's stage-9 YAML (time tokens and the soft CE)
VARIANTS = {
    "time tokens + soft CE": [],
    "time tokens + hard CE": ["optim.loss=token_ce"],
    "decimal text": ["model.num_time_tokens=null", "model.soft_ce_std=null", "optim.loss=token_ce"],
}
MODES = {"full": dict(eval=200, steps=150, batch=8), "smoke": dict(eval=4, steps=2, batch=2)}


def to_markdown(results: dict) -> str:
    lines = ["| variant | seeds | mIoU (mean) | P@0.5 (mean) | mIoU per seed | P@0.5 per seed | train s per run |",
             "|---|---:|---:|---:|---|---|---:|"]
    for name, runs in results["variants"].items():
        m, p = [r["miou"] for r in runs.values()], [r["p_at_0.5"] for r in runs.values()]
        secs = statistics.mean(r["train_s"] for r in runs.values())
        lines.append(f"| {name} | {len(runs)} | {statistics.mean(m):.3f} | {statistics.mean(p):.3f} | "
                     f"{', '.join(f'{x:.3f}' for x in m)} | {', '.join(f'{x:.3f}' for x in p)} | {secs:.0f} |")
    for name, b in results["baselines"].items():
        lines.append(f"| baseline: {name.replace('_', ' ')} | - | {b['miou']:.3f} | {b['p_at_0.5']:.3f} | | | |")
    return "\n".join(lines) + "\n"


def plot(results: dict, path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
    names = list(results["variants"])
    for ax, key, label in zip(axes, ("miou", "p_at_0.5"), ("mean IoU", "Precision@0.5")):
        for k, name in enumerate(names):
            vals = [r[key] for r in results["variants"][name].values()]
            ax.bar(k, statistics.mean(vals), color="C0", alpha=0.6)
            ax.scatter([k] * len(vals), vals, color="k", s=14, zorder=3)
        for (bname, b), style in zip(results["baselines"].items(), ("--", ":")):
            ax.axhline(b[key], color="C3", linestyle=style, label=bname.replace("_", " "))
        ax.set_xticks(range(len(names)), [n.replace(" + ", "\n+ ") for n in names])
        ax.set_ylabel(label)
        ax.set_ylim(0, 1)
        ax.legend(loc="upper right", fontsize=8)
    fig.suptitle(f"SynthVILA Table 10 in miniature: {FAMILY}, {results['eval_n']} held-out clips, "
                 f"{results['steps']} steps (dots: seeds)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--base", type=Path, default=Path("runs/synthvila/stage8_joint_sft/final"),
                        help="the shared start: a SynthVILA stage-8 checkpoint without time tokens (default: the "
                             "recipe's, `make synthvila`; RESULTS used the v16 bundle of commit 2d2b2e1)")
    parser.add_argument("--data", type=Path, default=None,
                        help="train data: the data/ directory of a `recipes/synthvila/train.py --start` run")
    parser.add_argument("--run", type=Path, default=Path("runs/ablation_time_tokens"), help="output directory")
    parser.add_argument("--mode", choices=sorted(MODES), default="full")
    parser.add_argument("--seeds", type=int, default=2, help="training seeds per variant")
    parser.add_argument("--fps", default=None,
                        help="frame rates drawn per clip, comma-separated (default: the family's 2 fps)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")

    import torch

    from nvila.data.synthetic import FAMILIES, generate, generate_eval_split
    from nvila.data.synthetic_localize import interval_baselines
    from nvila.eval import evaluate
    from nvila.train.synthvila import Stage, run_stage

    mode = MODES[args.mode]
    mixture = {FAMILY: 1}
    run = args.run
    run.mkdir(parents=True, exist_ok=True)
    options = {} if args.fps is None else {"fps": [float(x) for x in args.fps.split(",")]}
    if options:  # the recipe's train split of the family (1500 clips, seed 1 + its index) at these rates
        args.data = run / "data"
        if not (args.data / f"{FAMILY}.jsonl").is_file():
            generate(FAMILY, 1500 if args.mode == "full" else 8, args.data, 1 + list(FAMILIES).index(FAMILY), **options)
    missing = [f for f in mixture if args.data is None or not (args.data / f"{f}.jsonl").is_file()]
    if missing or not (args.base / "config.json").is_file():
        sys.stderr.write(f"ablation_time_tokens: error: need the start checkpoint {args.base} and the stage-9 data "
                         f"({', '.join(mixture)}) under {args.data}\n")
        return 2
    torch.set_num_threads(args.threads)
    steps = mode["steps"]
    stage = Stage("localize", RECIPES / "stage9_localize.yaml", mixture, steps, mode["batch"])
    split = generate_eval_split(FAMILY, mode["eval"], run / "eval", **options)
    truth = [json.loads(line) for line in split.read_text().splitlines()]
    results_path = run / "results.json"
    results = json.loads(results_path.read_text()) if results_path.is_file() else {"variants": {}}
    results.update(cpu=cpu_report(), threads=args.threads, base=str(args.base), steps=steps, batch=stage.batch, mixture=mixture, eval_n=len(truth),
                   fps=args.fps or "2",
                   baselines=interval_baselines([r["segment"] for r in truth], [r["duration"] for r in truth]))
    for name, overrides in VARIANTS.items():
        for seed in range(args.seeds):
            done = results["variants"].setdefault(name, {})
            if str(seed) in done:
                continue
            final = run_stage(stage, args.base, run / f"{list(VARIANTS).index(name)}-seed{seed}", args.data,
                              threads=args.threads, seed=seed, progress=not args.no_progress, overrides=overrides)
            metrics = [json.loads(x) for x in (final / "metrics.jsonl").read_text().splitlines()]
            res = evaluate(final, split, progress=not args.no_progress)
            done[str(seed)] = {**{k: res["families"][FAMILY][k] for k in ("miou", "p_at_0.5")},
                               "train_s": round(sum(m["step_time_s"] for m in metrics), 1),
                               "final_loss": metrics[-1]["loss"], "checkpoint": str(final),
                               "examples": [s["prediction"] for s in res["samples"][:3]]}
            results_path.write_text(json.dumps(results, indent=2))
    table = f"CPU: {results['cpu']}; {args.threads} thread(s)\n\n" + to_markdown(results)
    (run / "table10.md").write_text(table)
    plot(results, run / "table10.png")
    sys.stdout.write(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
