"""The NVILA paper's scale-then-compress ablations in miniature, on SynthVILA (issue 6).

    python benchmarks/ablations.py                       # after recipes/synthvila/train.py (~70 min, 1 thread)
    python benchmarks/ablations.py --mode smoke --base /tmp/smoke/stage2g_fine/final --run /tmp/abl
    python benchmarks/ablations.py --tables 1b --recipe-run runs/synthvila  # the fine-detail trend (~30 min)

Every variant starts from the same shared checkpoint of the SynthVILA recipe (``--base``, default its
stage 2: ViT after dense pre-training, LLM after text pre-training and after learning to read visual
tokens with the Dynamic-S2 2x2 projector on every family). Its ViT and LLM weights are copied into a
model of the variant's config with a fresh, seeded projector (the projector's input width depends on
the variant), so every variant must re-align its projector. Every variant then trains with the same
steps, batch, learning rates and data order:

* Table 1 analogue (image families; ``fine_code`` = fine detail, ``coarse_*`` = coarse):
  stage P (projector, LR 1e-3) -> stage X -> stage S (projector + LLM at LR 5e-4, ViT frozen, from a
  mean-centred projector as in the recipe), where
  stage X is projector-only for every variant except "3x3 after VEP", whose stage X also trains the
  ViT (NVILA's visual-encoder pre-training). Variants: low-res single tile 2x2; Dynamic-S2 2x2;
  Dynamic-S2 3x3 (projector-only); Dynamic-S2 3x3 after VEP.
* Table 1b, fine detail inside the recipe: Table 1 trains no stage that teaches the code, and the
  code stays at chance without the recipe's code curriculum (stages 7a-7d: the code's glyphs
  repeated to fill a large box, then smaller boxes, then the code itself). So each variant starts
  from the recipe's stage-6 checkpoint (``--recipe-run``: ViT and LLM after every stage before the
  curriculum) with a fresh projector (its input width depends on the number of scales), trains it
  alone for stage P, then runs the recipe's stages 7a-7d as they are (mixtures, steps, YAMLs:
  everything trains). Variants: low-res single tile; Dynamic-S2 (the recipe's own config).
* Table 2 analogue (video families): stage P -> stage S, for 4 frames; 16 frames; 16 frames with
  4x temporal pooling (TSP, the same 36 tokens as 4 frames).

Known bias: the shared LLM learned to read tokens of the Dynamic-S2 2x2 / 16-frame-pooled layout in
the recipe's stage 2, which favours those variants' token statistics a little.

Accuracy is exact match on each family's held-out split (its eval seed). Results: ``<run>/results.json``,
the Markdown tables printed and written to ``<run>/ablations.md``, and the plot ``<run>/ablations.png``.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import textwrap
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
RECIPES = HERE.parent / "recipes" / "synthvila"

IMAGE_TRAIN = {"fine_code": 2, "coarse_colour": 1, "coarse_count": 1, "coarse_shape": 1}
VIDEO_TRAIN = {"video_colour": 1, "video_order": 1, "video_count": 1}
FINE, COARSE = ("fine_code",), ("coarse_colour", "coarse_count", "coarse_shape")
VIDEO = tuple(VIDEO_TRAIN)

# name -> (config options, stage X trains the ViT)
TABLE1 = {
    "low-res 2x2": (dict(dynamic_s2=False, projector_type="mlp_downsample"), False),
    "Dynamic-S2 2x2": (dict(dynamic_s2=True, projector_type="mlp_downsample"), False),
    "Dynamic-S2 3x3 (projector only)": (dict(dynamic_s2=True, projector_type="mlp_downsample_3x3_fix"), False),
    "Dynamic-S2 3x3 after VEP": (dict(dynamic_s2=True, projector_type="mlp_downsample_3x3_fix"), True),
}
TABLE2 = {
    "4 frames": dict(num_video_frames=4, temporal_pool=1),
    "16 frames": dict(num_video_frames=16, temporal_pool=1),
    "16 frames, 4x temporal pooling": dict(num_video_frames=16, temporal_pool=4),
}
TABLE1B = {"low-res": dict(dynamic_s2=False), "Dynamic-S2": dict(dynamic_s2=True)}
CODE_STAGES = ("stage7a_fill", "stage7b_fill", "stage7c_fill", "stage7d_code")  # the recipe's, in order
MODES = {
    "full": dict(p=100, x=100, s=250, p1b=200, video_p=100, video_s=250, batch=16, eval=100),
    "smoke": dict(p=2, x=2, s=2, p1b=2, video_p=2, video_s=2, batch=4, eval=2),
}


def _variant_start(base: Path, out: Path, seed: int, options: dict) -> Path:
    """The variant's start checkpoint (base ViT + LLM, fresh projector), reused if already written."""
    from nvila.train.synthvila import init_checkpoint

    return out if (out / "config.json").is_file() else init_checkpoint(out, seed=seed, base=base, **options)


def tokens_per_image(path: Path) -> int:
    from nvila.config import NVILAConfig
    from nvila.processor import num_image_tokens

    cfg = NVILAConfig.from_pretrained(path)
    return sum(num_image_tokens(cfg, 72, 72))


def tokens_per_video(path: Path) -> int:
    from nvila.config import NVILAConfig
    from nvila.processor import num_video_tokens

    cfg = NVILAConfig.from_pretrained(path)
    return num_video_tokens(cfg, cfg.num_video_frames)


S_LR = ["optim.lr.projector=5e-4", "optim.lr.llm=5e-4"]


def recipe_code_stages(mode: str) -> list[tuple]:
    """The recipe's code-curriculum stages as ``train_variant`` plan entries (name, YAML, mixture,
    steps, no overrides, centred), read from ``recipes/synthvila/train.py`` so that Table 1b runs
    them exactly as the recipe does."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("synthvila_recipe", RECIPES / "train.py")
    recipe = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(recipe)
    from nvila.data.synthetic import FAMILIES

    steps = recipe.MODES[mode]["steps"]
    sizes = {name: 1 for name in FAMILIES}  # the code stages' repeats do not depend on sizes
    mix = recipe.mixtures(sizes)
    return [(name, f"{recipe.RECIPE.get(name, name)}.yaml", mix[name], steps[name], (), name in recipe.CENTRED)
            for name in CODE_STAGES]


def train_variant(start: Path, run: Path, data: Path, plan: list[tuple], *, batch: int,
                  threads: int, seed: int, progress: bool) -> tuple[Path, float]:
    """Run (name, recipe, mixture, steps, overrides, centred) stages in order; returns the final
    checkpoint and the seconds spent. As in the recipe, a stage that trains the LLM is marked
    centred: it starts from a mean-centred projector (``centre_projector``)."""
    from nvila.train.synthvila import Stage, run_stage

    t = time.perf_counter()
    ckpt = start
    for name, recipe, mixture, steps, overrides, centred in plan:
        stage = Stage(name, RECIPES / recipe, mixture, steps, batch, centre=centred)
        ckpt = run_stage(stage, ckpt, run / name, data,
                         threads=threads, seed=seed, progress=progress, overrides=overrides)
    return ckpt, time.perf_counter() - t


def accuracy(result: dict, families: tuple[str, ...]) -> float:
    fams = result["families"]
    return sum(fams[f]["correct"] for f in families) / sum(fams[f]["n"] for f in families)


def digit_accuracy(result: dict, family: str = "fine_code") -> float:
    """Per-character accuracy of the code answers (position by position; a missing character is
    wrong): a finer read-out than exact match, chance 0.1 per digit."""
    hits = total = 0
    for s in result["samples"]:
        if s["family"] == family:
            answer, pred = s["answer"].strip(), s["prediction"].strip()
            hits += sum(a == b for a, b in zip(answer, pred))
            total += len(answer)
    return hits / max(total, 1)


def _image_result(final: Path, res: dict, secs: float) -> dict:
    """One image variant's row of Tables 1 and 1b: tokens per image, accuracies, train seconds."""
    return {"tokens": tokens_per_image(final), "fine": accuracy(res, FINE), "fine_digits": digit_accuracy(res),
            "coarse": accuracy(res, COARSE), "train_s": secs,
            "per_family": {f: v["accuracy"] for f, v in res["families"].items()}}


def _image_table(title: str, rows: dict) -> list[str]:
    """Markdown lines of an image table (Table 1 or 1b) from its ``_image_result`` rows."""
    lines = [title, "", "| variant | visual tokens / image | fine detail (fine_code) | fine_code per digit |"
             " coarse (colour, count, shape) | train time |", "|---|---:|---:|---:|---:|---:|"]
    for name, r in rows.items():
        lines.append(f"| {name} | {r['tokens']} | {r['fine']:.3f} | {r['fine_digits']:.3f} | {r['coarse']:.3f} | "
                     f"{r['train_s'] / 60:.1f} min |")
    return lines


def to_markdown(results: dict) -> str:
    lines = _image_table("Table 1 analogue: image resolution and spatial compression (held-out exact match)",
                         results["table1"])
    if results.get("table1b"):
        lines += ["", *_image_table("Table 1b: fine detail after the recipe's code curriculum (stages 7a-7d from "
                                    "its stage-6 checkpoint; held-out exact match)", results["table1b"])]
    lines += ["", "Table 2 analogue: frames and temporal pooling (held-out exact match)", "",
              "| variant | visual tokens / video | video_colour | video_order | video_count | all video |"
              " train time |", "|---|---:|---:|---:|---:|---:|---:|"]
    for name, r in results["table2"].items():
        per = r["per_family"]
        lines.append(f"| {name} | {r['tokens']} | {per['video_colour']:.3f} | {per['video_order']:.3f} | "
                     f"{per['video_count']:.3f} | {r['video']:.3f} | {r['train_s'] / 60:.1f} min |")
    return "\n".join(lines) + "\n"


def plot(results: dict, path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(14, 4.4), gridspec_kw={"width_ratios": [3, 2]})
    t1 = {**results["table1"], **{f"1b: {n} + code curriculum": r for n, r in results.get("table1b", {}).items()}}
    names = list(t1)
    x = range(len(names))
    a.bar([i - 0.27 for i in x], [t1[n]["fine"] for n in names], 0.27, label="fine_code exact")
    a.bar(list(x), [t1[n]["fine_digits"] for n in names], 0.27, label="fine_code per digit")
    a.bar([i + 0.27 for i in x], [t1[n]["coarse"] for n in names], 0.27, label="coarse (colour/count/shape)")
    a.set_xticks(list(x), [f"{textwrap.fill(n, 16)}\n{t1[n]['tokens']} tok" for n in names], fontsize=7)
    a.set_ylabel("held-out exact match")
    a.set_ylim(0, 1)
    a.set_title("Table 1 analogue: scale, then compress")
    a.legend(fontsize=7)
    t2 = results["table2"]
    names = list(t2)
    fams = VIDEO
    for k, fam in enumerate(fams):
        b.bar([i + (k - 1) * 0.25 for i in range(len(names))], [t2[n]["per_family"][fam] for n in names], 0.25,
              label=fam)
    b.set_xticks(list(range(len(names))), [f"{textwrap.fill(n, 16)}\n{t2[n]['tokens']} tok" for n in names],
                 fontsize=7)
    b.set_ylim(0, 1)
    b.set_title("Table 2 analogue: more frames, pooled")
    b.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--base", type=Path, default=Path("runs/synthvila/stage2g_fine/final"),
                        help="shared checkpoint (default: the end of stage 2, 2g, of recipes/synthvila/train.py --out runs/synthvila)")
    parser.add_argument("--data", type=Path, default=None,
                        help="SynthVILA train data (default: the data/ directory of the recipe run of --base)")
    parser.add_argument("--recipe-run", type=Path, default=Path("runs/synthvila"),
                        help="Table 1b: a full recipes/synthvila/train.py run directory (its stage6_count "
                             "checkpoint and data/ with the code-curriculum splits)")
    parser.add_argument("--run", type=Path, default=Path("runs/ablations"), help="output directory")
    parser.add_argument("--mode", choices=sorted(MODES), default="full")
    parser.add_argument("--tables", default="1,1b,2", help="which tables to run, comma-separated: 1, 1b, 2")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")

    import torch

    from nvila.eval import evaluate
    from nvila.data.synthetic import generate_eval_splits

    tables = {t.strip() for t in args.tables.split(",")}
    if tables - {"1", "1b", "2"}:
        sys.stderr.write(f"ablations: error: unknown table {sorted(tables - {'1', '1b', '2'})}; valid: 1, 1b, 2\n")
        return 2
    data = args.data or args.base.parents[1] / "data"
    if tables & {"1", "2"}:
        if not (args.base / "config.json").is_file():
            sys.stderr.write(f"ablations: error: no shared checkpoint at {args.base}; run "
                             f"`python recipes/synthvila/train.py --out runs/synthvila` first (or pass --base)\n")
            return 2
        if not (data / "done.json").is_file():
            sys.stderr.write(f"ablations: error: no SynthVILA train data at {data} (pass --data: the data/ "
                             f"directory of a recipes/synthvila/train.py run)\n")
            return 2
    base1b, data1b = args.recipe_run / "stage6_count" / "final", args.recipe_run / "data"
    code_stages = recipe_code_stages(args.mode) if "1b" in tables else []
    if "1b" in tables:
        missing = [f for _, _, mix, *_ in code_stages for f in mix
                   if not (data1b / f"{f}.jsonl").is_file()]
        if not (base1b / "config.json").is_file() or missing:
            sys.stderr.write(f"ablations: error: Table 1b needs a recipes/synthvila/train.py run with its stage-6 "
                             f"checkpoint ({base1b}) and the code-curriculum data ({data1b}); pass --recipe-run\n")
            return 2
    torch.set_num_threads(args.threads)
    mode = MODES[args.mode]
    run = args.run
    run.mkdir(parents=True, exist_ok=True)
    results_path = run / "results.json"
    results = json.loads(results_path.read_text()) if results_path.is_file() else {}
    results = {"table1": {}, "table1b": {}, "table2": {}, **results}
    results["mode"], results["base"], results["recipe_run"] = args.mode, str(args.base), str(args.recipe_run)
    kw = dict(batch=mode["batch"], threads=args.threads, seed=args.seed, progress=not args.no_progress)

    if tables & {"1", "1b"}:  # one held-out image split for Tables 1 and 1b
        image_split = generate_eval_splits([*FINE, *COARSE], mode["eval"], run / "eval-image")
    if "1" in tables:
        for k, (name, (options, vep)) in enumerate(TABLE1.items()):
            if name in results["table1"]:
                continue
            vdir = run / f"t1-{k}"
            start = _variant_start(args.base, vdir / "init", args.seed, options)
            plan = [("P", "stage1_projector.yaml", IMAGE_TRAIN, mode["p"], (), False),
                    ("X", "stage3_vep.yaml" if vep else "stage1_projector.yaml", IMAGE_TRAIN, mode["x"], (), False),
                    ("S", "stage2_llm.yaml", IMAGE_TRAIN, mode["s"], S_LR, True)]
            final, secs = train_variant(start, vdir, data, plan, **kw)
            res = evaluate(final, image_split, progress=not args.no_progress)
            results["table1"][name] = _image_result(final, res, secs)
            results_path.write_text(json.dumps(results, indent=2))

    if "1b" in tables:
        for k, (name, options) in enumerate(TABLE1B.items()):
            if name in results["table1b"]:
                continue
            vdir = run / f"t1b-{k}"
            start = _variant_start(base1b, vdir / "init", args.seed, options)
            plan = [("P", "stage1_projector.yaml", IMAGE_TRAIN, mode["p1b"], (), False),
                    *code_stages]
            final, secs = train_variant(start, vdir, data1b, plan, **kw)
            res = evaluate(final, image_split, progress=not args.no_progress)
            results["table1b"][name] = _image_result(final, res, secs)
            results_path.write_text(json.dumps(results, indent=2))

    if "2" in tables:
        split = generate_eval_splits(list(VIDEO), mode["eval"], run / "eval-video")
        for k, (name, options) in enumerate(TABLE2.items()):
            if name in results["table2"]:
                continue
            vdir = run / f"t2-{k}"
            start = _variant_start(args.base, vdir / "init", args.seed, options)
            plan = [("P", "stage1_projector.yaml", VIDEO_TRAIN, mode["video_p"], (), False),
                    ("S", "stage2_llm.yaml", VIDEO_TRAIN, mode["video_s"], S_LR, True)]
            final, secs = train_variant(start, vdir, data, plan, **kw)
            res = evaluate(final, split, progress=not args.no_progress)
            results["table2"][name] = {"tokens": tokens_per_video(final), "video": accuracy(res, VIDEO),
                                       "train_s": secs,
                                       "per_family": {f: v["accuracy"] for f, v in res["families"].items()}}
            results_path.write_text(json.dumps(results, indent=2))

    if results["table1"] and results["table2"]:
        table = to_markdown(results)
        (run / "ablations.md").write_text(table)
        plot(results, run / "ablations.png")
        sys.stdout.write(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
