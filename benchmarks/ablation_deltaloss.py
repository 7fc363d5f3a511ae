"""The NVILA paper's Table 3 (DeltaLoss data pruning) in miniature, on SynthVILA (issue 20).

    python benchmarks/ablation_deltaloss.py --run runs/deltaloss --large CKPT    # ~35 min at 1 thread
    python benchmarks/ablation_deltaloss.py --mode smoke --run /tmp/dl                    # seconds: the plumbing

What runs, in order (each phase skips what its outputs already hold, so a stopped run continues):

1. **Data.** Three disjoint SynthVILA sets over the pool families ``POOL`` (the "small" size preset):
   the small model's training set (clean, seed 7001), the SFT pool (seed 8001) and the held-out
   split of every family (its own eval seed). In the pool, ``NOISE`` of the records of the
   ``NOISY`` families get a wrong answer (uniform over the family's other answers); each such
   record carries ``meta.mislabelled`` and ``meta.true_answer``, which no model or method reads.
2. **Models.** Large = SynthVILA (``--large``: default the bundled model, 4-layer LLM). Small = the same model
   with its LLM cut to its first ``--small-layers`` layers (embeddings, final norm and LM head kept),
   then trained by the recipe's joint stage (``recipes/synthvila/stage8_joint_sft.yaml``: everything
   trains, mean-centred projector first) on the small training set.
3. **Pruning.** ``nvila prune`` on the pool: DeltaLoss at keep 0.5 / 0.3 / 0.1 (one scoring pass, the
   scores file copied to the other keeps), random 0.5 and cluster 0.5 (their seed = the fine-tune
   seed).
4. **Fine-tunes.** The same start checkpoint for every run (``--start init``, default: the cut
   large model before the small model's training, its projector mean-centred on the pool: it has
   the large model's vision and first LLM layers but answers poorly, like a model before its SFT;
   ``--start small`` starts from the trained small model instead), the recipe's joint-stage YAML
   with the ViT frozen, and the same steps, batch and learning rates, for every dataset (the full
   pool and the five pruned ones) and every seed (data order; the random/cluster pruning seed).
   Fewer records at the same steps means more epochs, as in the paper's comparison at equal compute.
5. **Eval.** Exact match on each family's held-out split for the start, the small and the large
   model and every fine-tune. Results: ``<run>/results.json``, ``<run>/ablation_deltaloss.md`` and
   ``<run>/ablation_deltaloss.png``.
"""

from __future__ import annotations

import argparse
import json
import logging
import platform
import shlex
import shutil
import statistics
import sys
import time
from dataclasses import replace
from datetime import datetime, timezone
from pathlib import Path

HERE = Path(__file__).resolve().parent
RECIPES = HERE.parent / "recipes" / "synthvila"
sys.path.insert(0, str(HERE))

# The pool: two families both models answer (too easy), four harder ones (RESULTS.md has each model's scores).
POOL = ("coarse_colour", "video_colour", "coarse_shape", "compare_colour", "compare_count", "video_order")
NOISY = ("coarse_shape", "compare_colour")  # families whose pool records are partly mislabelled
NOISE = 0.3
DATASETS = {  # fine-tune dataset -> (nvila prune method, keep); None = the full pool
    "full pool": None, "DeltaLoss 50%": ("deltaloss", 0.5), "random 50%": ("random", 0.5),
    "cluster 50%": ("cluster", 0.5), "DeltaLoss 30%": ("deltaloss", 0.3), "DeltaLoss 10%": ("deltaloss", 0.1),
}
MODES = {
    "full": dict(small_train=300, pool=200, eval=100, small_steps=600, finetune_steps=150, batch=16),
    "smoke": dict(small_train=4, pool=10, eval=2, small_steps=2, finetune_steps=2, batch=4),
}
FINETUNE_YAML = RECIPES / "stage8_joint_sft.yaml"
# the shared ViT stays as it is (and the steps are cheaper)
FINETUNE_OVERRIDES = ["model.vision=frozen", "optim.lr.vision=0.0"]
log = logging.getLogger("ablation_deltaloss")


# ------------------------------------------------------------------------------------------ data
def mislabel(path: Path, family: str, fraction: float, seed: int) -> list[int]:
    """Give ``fraction`` of the records of ``path`` (one family) a wrong answer, in place; returns
    their indices. The record keeps the truth in ``meta.true_answer`` and ``meta.mislabelled``."""
    import numpy as np

    from nvila.data.synthetic import ANSWER_VOCAB

    records = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]
    rng = np.random.default_rng([seed, 99])
    chosen = sorted(rng.choice(len(records), size=round(fraction * len(records)), replace=False).tolist())
    for i in chosen:
        turn = records[i]["conversations"][1]
        truth = turn["value"]
        if family == "video_order":  # an answer is three distinct colours: shuffle them into a wrong order
            colours = truth.split()
            while " ".join(colours) == truth:
                colours = rng.permutation(colours).tolist()
            turn["value"] = " ".join(colours)
        else:
            others = [a for a in ANSWER_VOCAB[family] if a != truth]
            turn["value"] = others[int(rng.integers(len(others)))]
        records[i]["meta"].update(mislabelled=True, true_answer=truth)
    path.write_text("".join(json.dumps(r, sort_keys=True) + "\n" for r in records), encoding="utf-8")
    return chosen


def make_sets(run: Path, mode: dict) -> dict:
    """The small model's training set, the (partly mislabelled) pool and the held-out split."""
    from nvila.data.synthetic import generate_eval_splits
    from nvila.train.synthvila import make_data, write_mixture

    small = make_data(run / "data" / "small_train", {f: mode["small_train"] for f in POOL}, seed=7001)
    pool_dir = run / "data" / "pool"
    marker = pool_dir / "mislabelled.json"
    if not marker.is_file():
        shutil.rmtree(pool_dir, ignore_errors=True)
        make_data(pool_dir, {f: mode["pool"] for f in POOL}, seed=8001)
        bad = {f: mislabel(pool_dir / f"{f}.jsonl", f, NOISE, seed=8001) for f in NOISY}
        marker.write_text(json.dumps(bad))
    pool = write_mixture(run / "data" / "pool.yaml", pool_dir, {f: 1 for f in POOL})
    eval_dir = run / "data" / "eval"
    if not (eval_dir / "eval.jsonl").is_file():
        generate_eval_splits(list(POOL), mode["eval"], eval_dir)
    return {"small_train": small, "pool_dir": pool_dir, "pool": pool, "eval": eval_dir / "eval.jsonl",
            "mislabelled": {f: set(v) for f, v in json.loads(marker.read_text()).items()}}


# ---------------------------------------------------------------------------------------- models
def truncated(large: Path, out: Path, layers: int) -> Path:
    """``large`` with its LLM cut to its first ``layers`` decoder layers (everything else copied)."""
    from nvila.checkpoint import load_tokenizer, save_pretrained
    from nvila.config import NVILAConfig
    from nvila.model import NVILAForConditionalGeneration

    if (out / "config.json").is_file():
        return out
    big = NVILAForConditionalGeneration.from_pretrained(large)
    cfg = NVILAConfig.from_pretrained(large)
    cfg = replace(cfg, llm=replace(cfg.llm, num_hidden_layers=layers))
    small = NVILAForConditionalGeneration(cfg, big.ids)
    state = {k: v for k, v in big.state_dict().items()
             if not k.startswith("llm.model.layers.") or int(k.split(".")[3]) < layers}
    small.load_state_dict(state, strict=True)
    return save_pretrained(small, load_tokenizer(large / "llm"), out,
                           metadata={"nvila_weights": f"{large.name} with its LLM cut to {layers} layers"})


def params(path: Path) -> dict:
    from nvila.model import NVILAForConditionalGeneration

    m = NVILAForConditionalGeneration.from_pretrained(path)
    return {"total": sum(p.numel() for p in m.parameters()),
            **{n: sum(p.numel() for p in c.parameters()) for n, c in m.named_children()},
            "llm_layers": m.config.llm.num_hidden_layers}


def stage_seconds(final: Path) -> float:
    return sum(json.loads(line)["step_time_s"] for line in (final / "metrics.jsonl").read_text().splitlines())


# --------------------------------------------------------------------------------------- pruning
def prune_all(run: Path, large: Path, small: Path, pool: Path, seeds: list[int], threads: int) -> dict:
    """``nvila prune`` for every pruned dataset and seed; returns {(dataset, seed): pruned mixture}."""
    from nvila.cli import main as nvila

    out: dict = {}
    scored: dict[str, Path] = {}  # method -> its first scores file, copied to its other runs (same fingerprint)
    for name, spec in DATASETS.items():
        if spec is None:
            continue
        method, keep = spec
        for seed in seeds if method != "deltaloss" else seeds[:1]:
            d = run / "prune" / f"{method}_{keep:g}" / (f"seed{seed}" if method != "deltaloss" else "")
            if not (d / "mixture.yaml").is_file():
                if method in scored and not (d / "scores.jsonl").is_file():
                    d.mkdir(parents=True, exist_ok=True)
                    shutil.copy(scored[method], d / "scores.jsonl")
                t = time.perf_counter()
                rc = nvila(["prune", "--large", str(large), "--small", str(small), "--mixture", str(pool),
                            "--keep", str(keep), "--out", str(d), "--method", method, "--seed", str(seed),
                            "--threads", str(threads), "--batch-size", "8", "--no-progress"])
                if rc:
                    raise SystemExit(f"nvila prune {method} {keep} failed ({rc})")
                (d / "wall_s.txt").write_text(f"{time.perf_counter() - t:.1f}\n")
            if method != "random":
                scored.setdefault(method, d / "scores.jsonl")
            for s in seeds if method == "deltaloss" else [seed]:  # DeltaLoss's selection has no seed
                out[(name, s)] = d / "mixture.yaml"
    return out


def kept_mislabelled(mixture: Path, mislabelled: dict[str, set[int]], pool_size: int) -> dict:
    """How many records ``mixture`` keeps, and how many mislabelled ones per noisy family."""
    import yaml

    out = {"kept": 0, "mislabelled_kept": {f: 0 for f in mislabelled}, "shape_answers": {}}
    for e in yaml.safe_load(mixture.read_text())["datasets"]:
        drop = set(json.loads((mixture.parent / e["drop"]).read_text())) if e.get("drop") else set()
        keep = set(range(pool_size)) - drop
        out["kept"] += len(keep)
        if e["name"] in mislabelled:
            out["mislabelled_kept"][e["name"]] = len(keep & mislabelled[e["name"]])
        if e["name"] == "coarse_shape":  # the kept records' answers (as labelled): does a method skew the prior?
            lines = (mixture.parent / e["path"]).read_text(encoding="utf-8").splitlines()
            answers = [json.loads(lines[i])["conversations"][1]["value"] for i in sorted(keep)]
            out["shape_answers"] = {a: answers.count(a) for a in sorted(set(answers))}
    return out


# ----------------------------------------------------------------------------------------- report
def to_markdown(results: dict) -> str:
    fams = list(POOL)
    noisy = " + ".join(f.split("_")[1] for f in NOISY)
    head = (f"| model / fine-tune data | records | mislabelled kept ({noisy}) | " + " | ".join(fams)
            + " | mean (per seed) |")
    lines = [head, "|---|---:|---:|" + "---:|" * (len(fams) + 1)]
    for name, r in results["reference"].items():
        lines.append(f"| {name} (no fine-tune) | | | " + " | ".join(f"{r['per_family'][f]:.2f}" for f in fams)
                     + f" | {r['mean']:.3f} |")
    for name, r in results["finetunes"].items():
        per = " | ".join(f"{statistics.mean(r['per_family'][f]):.2f}" for f in fams)
        spread = f" ({', '.join(f'{m:.3f}' for m in r['mean_by_seed'])})"
        mis = " / ".join(sorted({" + ".join(str(m[f]) for f in NOISY) + f" = {sum(m.values())}"
                                 for m in r["mislabelled_kept"]}))
        lines.append(f"| {name} | {r['records']} | {mis} of {results['mislabelled_total']} | {per} | "
                     f"{statistics.mean(r['mean_by_seed']):.3f}{spread} |")
    kept = [f"{name} {r['shape_answers_kept'][0]}" for name, r in results["finetunes"].items()]
    lines += ["", "coarse_shape records kept, by labelled answer (seed 0): " + "; ".join(kept)]
    return "\n".join(lines) + "\n"


def plot(results: dict, path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b, c) = plt.subplots(1, 3, figsize=(16, 4.4), gridspec_kw={"width_ratios": [3, 2, 1.6]})
    names = list(results["finetunes"])
    fams = list(POOL)
    w = 0.8 / len(names)
    for k, name in enumerate(names):
        r = results["finetunes"][name]
        a.bar([i + (k - len(names) / 2 + 0.5) * w for i in range(len(fams))],
              [statistics.mean(r["per_family"][f]) for f in fams], w, label=name)
    for ref, style in (("start", "k--"), ("large", "k:")):
        if ref in results["reference"]:
            r = results["reference"][ref]
            for i, f in enumerate(fams):
                a.plot([i - 0.4, i + 0.4], [r["per_family"][f]] * 2, style, lw=1,
                       label=ref if i == 0 else None)
    a.set_xticks(range(len(fams)), [f.replace("_", "\n") + ("\n(30% noisy)" if f in NOISY else "") for f in fams],
                 fontsize=8)
    a.set_ylim(0, 1.2)
    a.set_ylabel("held-out exact match (mean over seeds)")
    a.set_title("per family")
    a.legend(fontsize=6, ncol=4, loc="upper center")
    series = {"DeltaLoss": [("full pool", 1.0), ("DeltaLoss 50%", 0.5), ("DeltaLoss 30%", 0.3),
                            ("DeltaLoss 10%", 0.1)],
              "random": [("full pool", 1.0), ("random 50%", 0.5)],
              "cluster": [("full pool", 1.0), ("cluster 50%", 0.5)]}
    for label, pts in series.items():
        pts = [(keep, results["finetunes"][n]["mean_by_seed"]) for n, keep in pts if n in results["finetunes"]]
        b.errorbar([p[0] for p in pts], [statistics.mean(p[1]) for p in pts],
                   yerr=[(max(p[1]) - min(p[1])) / 2 for p in pts], marker="o", capsize=3, label=label)
    if "start" in results["reference"]:
        b.axhline(results["reference"]["start"]["mean"], color="k", ls="--", lw=1, label="start")
    b.set_xlabel("fraction of the pool kept")
    b.set_ylabel("mean held-out exact match (bars: seed range)")
    b.set_title("Table 3 analogue: mean over the pool families")
    b.legend(fontsize=7)
    bottom = [0.0] * len(names)
    for f in NOISY:
        vals = [statistics.mean(m[f] for m in results["finetunes"][n]["mislabelled_kept"]) for n in names]
        c.bar(range(len(names)), vals, bottom=bottom, label=f)
        bottom = [x + v for x, v in zip(bottom, vals)]
    c.set_xticks(range(len(names)), [n.replace(" ", "\n", 1) for n in names], fontsize=7)
    c.set_ylabel(f"mislabelled records kept (of {results['mislabelled_total']})")
    c.set_title("misleading samples kept")
    c.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


# ------------------------------------------------------------------------------------------- main
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", type=Path, required=True, help="output directory")
    parser.add_argument("--large", type=Path, default=HERE.parent / "src" / "nvila" / "bundled" / "synthvila",
                        help="the large model (default: the bundled SynthVILA; RESULTS.md used a frozen copy of v16)")
    parser.add_argument("--small-layers", type=int, default=2, help="LLM layers the small model keeps")
    parser.add_argument("--start", choices=("init", "small"), default="init",
                        help="fine-tune start, its projector re-centred on the pool: init = the cut large model "
                             "before the small model's training (default), small = the trained small model")
    parser.add_argument("--mode", choices=sorted(MODES), default="full")
    parser.add_argument("--seeds", default="0,1", help="fine-tune seeds, comma-separated")
    parser.add_argument("--finetune-steps", type=int, default=None, help="override the mode's fine-tune steps")
    parser.add_argument("--small-steps", type=int, default=None, help="override the mode's small-model steps")
    parser.add_argument("--phases", default="models,prune,finetune,eval,report",
                        help="stop after the listed phases (data always runs)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")

    import torch

    from nvila.eval import evaluate
    from nvila.train.synthvila import Stage, centre_projector, run_stage
    from common import cpu_report

    torch.set_num_threads(args.threads)
    mode = dict(MODES[args.mode])
    mode["finetune_steps"] = args.finetune_steps or mode["finetune_steps"]
    mode["small_steps"] = args.small_steps or mode["small_steps"]
    phases = {p.strip() for p in args.phases.split(",")}
    seeds = [int(s) for s in args.seeds.split(",")]
    run = args.run
    run.mkdir(parents=True, exist_ok=True)
    walls = json.loads((run / "walls.json").read_text()) if (run / "walls.json").is_file() else {}

    def timed(key, fn, *a, **kw):
        t = time.perf_counter()
        out = fn(*a, **kw)
        walls[key] = walls.get(key, 0.0) + time.perf_counter() - t
        (run / "walls.json").write_text(json.dumps(walls, indent=1))
        return out

    sets = timed("data", make_sets, run, mode)
    progress = not args.no_progress
    if "models" not in phases:
        return 0

    # the small model: the large one cut to fewer LLM layers, trained by the recipe's joint stage
    init = truncated(args.large, run / "small" / "init", args.small_layers)
    small_stage = Stage("small_joint", RECIPES / "stage8_joint_sft.yaml", {f: 1 for f in POOL},
                        mode["small_steps"], mode["batch"], centre=True)
    small = timed("small_model", run_stage, small_stage, init, run / "small", sets["small_train"],
                  threads=args.threads, seed=0, progress=progress)
    start = run / "start"
    if not (start / "config.json").is_file():
        centre_projector(init if args.start == "init" else small, start, sets["pool_dir"])
    if "prune" not in phases:
        return 0

    mixtures = timed("prune", prune_all, run, args.large, small, sets["pool"], seeds, args.threads)
    mixtures.update({("full pool", s): sets["pool"] for s in seeds})
    if "finetune" not in phases:
        return 0

    finals = {}
    for name in DATASETS:
        for seed in seeds:
            key = f"{name}|{seed}"
            slug = name.replace(" ", "_").replace("%", "pct")
            stage = Stage(slug, FINETUNE_YAML, {f: 1 for f in POOL}, mode["finetune_steps"], mode["batch"])
            finals[key] = timed(f"finetune {key}", run_stage, stage, start, run / "finetune" / f"{slug}_s{seed}",
                                sets["pool_dir"], threads=args.threads, seed=seed, progress=progress,
                                overrides=[*FINETUNE_OVERRIDES, f"data.mixture={mixtures[(name, seed)].resolve()}"])
    if "eval" not in phases:
        return 0

    def evaluated(path: Path, tag: str) -> dict:
        out = path / "eval_ablation.json"
        if not out.is_file():
            res = timed(f"eval {tag}", evaluate, path, sets["eval"], progress=progress)
            res.pop("samples", None)
            out.write_text(json.dumps(res, indent=1))
        return json.loads(out.read_text())

    reference = {}
    for tag, path in (("start", start), ("small", small), ("large", args.large)):
        if tag == "large":  # the large model's directory may be read-only: its eval goes under the run
            res_dir = run / "large_eval"
            res_dir.mkdir(exist_ok=True)
            out = res_dir / "eval_ablation.json"
            if not out.is_file():
                res = timed("eval large", evaluate, path, sets["eval"], progress=progress)
                res.pop("samples", None)
                out.write_text(json.dumps(res, indent=1))
            res = json.loads(out.read_text())
        else:
            res = evaluated(path, tag)
        per = {f: res["families"][f]["accuracy"] for f in POOL}
        reference[tag] = {"per_family": per, "mean": statistics.mean(per.values())}
    finetunes = {}
    pool_size = mode["pool"]
    for name in DATASETS:
        rows = []
        for seed in seeds:
            res = evaluated(finals[f"{name}|{seed}"], f"{name}|{seed}")
            rows.append((seed, {f: res["families"][f]["accuracy"] for f in POOL},
                         kept_mislabelled(mixtures[(name, seed)], sets["mislabelled"], pool_size),
                         stage_seconds(finals[f"{name}|{seed}"])))
        finetunes[name] = {"seeds": seeds, "per_family": {f: [r[1][f] for r in rows] for f in POOL},
                           "mean_by_seed": [statistics.mean(r[1].values()) for r in rows],
                           "records": rows[0][2]["kept"], "mislabelled_kept": [r[2]["mislabelled_kept"] for r in rows],
                           "shape_answers_kept": [r[2]["shape_answers"] for r in rows],
                           "train_s": [r[3] for r in rows]}
    if "report" not in phases:
        return 0
    results = {
        "command": " ".join(shlex.quote(a) for a in [sys.executable, *sys.argv]),
        "date_utc": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M"), "cpu": cpu_report(),
        "python": platform.python_version(), "torch": torch.__version__, "threads": torch.get_num_threads(),
        "mode": args.mode, "sizes": mode, "pool": list(POOL), "noisy": list(NOISY), "noise": NOISE,
        "mislabelled_total": sum(map(len, sets["mislabelled"].values())),
        "params": {"large": params(args.large), "small": params(small)},
        "small_model_train_s": stage_seconds(small), "start": args.start, "small_layers": args.small_layers,
        "finetune_yaml": FINETUNE_YAML.name, "finetune_overrides": FINETUNE_OVERRIDES,
        "reference": reference, "finetunes": finetunes, "walls_s": {k: round(v, 1) for k, v in walls.items()},
    }
    (run / "results.json").write_text(json.dumps(results, indent=1))
    md = to_markdown(results)
    (run / "ablation_deltaloss.md").write_text(md)
    plot(results, run / "ablation_deltaloss.png")
    sys.stdout.write(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
