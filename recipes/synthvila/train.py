"""Train the bundled SynthVILA model from random init with our own pipeline.

    python recipes/synthvila/train.py --out runs/synthvila                   # full run (~93 min, 2 threads)
    python recipes/synthvila/train.py --out runs/synthvila --bundle src/nvila/bundled/synthvila
    python recipes/synthvila/train.py --out /tmp/smoke --mode smoke          # CI: same script, ~20 s
    python recipes/synthvila/train.py --out runs/loc --start runs/synthvila/stage8_joint_sft/final --threads 1  # 9-10 only

The curriculum (spec training.md §7.4-7.5): SynthVILA data at the "small" size preset; a random
checkpoint of ``nvila.tiny.synthvila_config``; stage 0b dense per-patch pre-training of the ViT;
stage 0a the LLM on the answer language; then NVILA's stages with ``nvila.train``: 1 projector,
2 projector + LLM, 3 VEP (ViT + projector), 4 image SFT (all), 5 video SFT (all, image replay), 6 the
count alone, 7a-7d the code curriculum (the code's glyphs repeated to fill a large box at the code's
fixed place, then smaller boxes, then the code itself: the code alone stayed at chance), 7e-7f the
colour-comparison curriculum (one shape per image, then up to three: on the real images the
equality stayed at chance), 7g the count alone again (the curriculum stages erode it, and a joint
stage did not bring it back), 7h the video order and count alone again, 7i-7j the count comparison
without clutter, then on the real images (on them alone it stayed at chance), 7k the largest shape
alone (each run left one family on its plateau through stage 8; alone, right before it, each left the
plateau within ~125 steps), 8 a long joint SFT on every family that holds them (in a joint mixture
the count stayed at its chance loss for 1200 steps in one run of two; alone it leaves the plateau at
once, and a long joint stage keeps it), 9 temporal localization (the checkpoint gets 17 time tokens;
the localization family with the video families replayed, smoothed loss), 10 a short joint replay
of stage 8's mixture with the localization family. ``--start CKPT`` takes CKPT as stage 8's output
(the frozen v16 bundle) and runs stages 9-10 only; stages 9-10 train from the stage-8 projector as it
is, not re-centred (a short stage is too short to follow the shift of every visual token).
VEP comes after the projector + LLM stage here: a tiny text-only LLM that stays frozen never
learns to read visual tokens (measured: stage 1 and VEP with a frozen LLM stayed at the chance
loss), so it must learn to read first. Stage 2 is a curriculum, one family group at a time with
replay (2a colour, 2b shape, 2c count, 2d comparisons, 2e video colour, 2f video count/order, 2g
the code), the new group taking 60 % of the records: on all nine families at once it stayed near
the chance loss for 500 steps, while the colour family alone left the plateau within ~50 steps.
Every stage that trains the LLM starts from a mean-centred projector (``centre_projector``): the
visual tokens otherwise share an offset ~6x their variation, and a 4x-pooled video flash, diluted
to a quarter, was never learned (at chance for 150 steps alone; learned in ~60 once centred).
Every stage writes ``<out>/<stage>/final`` (the published layout + metrics.jsonl); a re-run skips
finished stages. The final model is evaluated on every family's held-out split; with ``--bundle``
the checkpoint, the training log, the eval results and this command are copied there.
"""

from __future__ import annotations

import argparse
import json
import logging
import shlex
import shutil
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent

STEPS9, STEPS10 = 300, 400  # the localization stages (full mode)
LATE = ("stage9_localize", "stage10_joint_replay")  # the stages after stage 8 (``--start``)
# mode -> train samples per family, stage-0 steps, stage steps, batch, eval samples per family
MODES = {
    "full": dict(image=3000, compare=2000, video=1500, vision_steps=3000, text_steps=300,
                 steps={"stage1_projector": 400, "stage2a_colour": 150, "stage2b_shape": 150, "stage2c_count": 500,
                        "stage2d_compare": 300, "stage2e_video_colour": 150, "stage2f_video_events": 300,
                        "stage2g_fine": 200, "stage3_vep": 300, "stage4_image_sft": 600, "stage5_video_sft": 300,
                        "stage6_count": 400, "stage7a_fill": 200, "stage7b_fill": 150, "stage7c_fill": 150,
                        "stage7d_code": 550, "stage7e_colour1": 300, "stage7f_colour3": 400, "stage7g_count": 400,
                        "stage7h_video": 300, "stage7i_count_clean": 150, "stage7j_compare_count": 250,
                        "stage7k_shape": 150,
                        "stage8_joint_sft": 1200, "stage9_localize": STEPS9, "stage10_joint_replay": STEPS10},
                 batch=16, eval=100),
    "smoke": dict(image=8, compare=8, video=8, vision_steps=20, text_steps=15,
                  steps={"stage1_projector": 2, "stage2a_colour": 2, "stage2b_shape": 2, "stage2c_count": 2,
                         "stage2d_compare": 2, "stage2e_video_colour": 2, "stage2f_video_events": 2,
                         "stage2g_fine": 2, "stage3_vep": 2, "stage4_image_sft": 2, "stage5_video_sft": 2,
                         "stage6_count": 2, "stage7a_fill": 2, "stage7b_fill": 2, "stage7c_fill": 2,
                         "stage7d_code": 2, "stage7e_colour1": 2, "stage7f_colour3": 2, "stage7g_count": 2,
                         "stage7h_video": 2, "stage7i_count_clean": 2, "stage7j_compare_count": 2, "stage7k_shape": 2,
                         "stage8_joint_sft": 2, "stage9_localize": 2, "stage10_joint_replay": 2},
                  batch=4, eval=2),
}
# stage -> mixture (family -> repeats); "text" is the stage-0a corpus
ALL = {"fine_code": 1, "coarse_colour": 1, "coarse_count": 1, "coarse_shape": 1, "compare_count": 1,
       "compare_colour": 1, "video_colour": 1, "video_order": 1, "video_count": 1}
IMAGES = {k: v for k, v in ALL.items() if not k.startswith("video")}
# Stage 2 curriculum: one new family group per sub-stage, replaying the groups already learned. The
# new group gets NEW_SHARE of the sampled records (a family learned alone within ~60 steps, and not
# at all at a weight of 3 against the replay, about a 20 % share).
_CURRICULUM = [("stage2a_colour", ["coarse_colour"]), ("stage2b_shape", ["coarse_shape"]),
               ("stage2c_count", ["coarse_count"]), ("stage2d_compare", ["compare_colour", "compare_count"]),
               ("stage2e_video_colour", ["video_colour"]), ("stage2f_video_events", ["video_count", "video_order"]),
               ("stage2g_fine", ["fine_code"])]
NEW_SHARE = 0.6
STAGE2 = [name for name, _ in _CURRICULUM]
# The code curriculum's extra splits (name -> code_repeat): the code's glyphs repeated to fill a
# large box at the preset's fixed place, then smaller boxes; stage 7d then reads the code itself.
# Read-outs are learned where the glyphs dominate the image (a box filling the canvas: 200 steps),
# never from the small box directly (measured: chance after 300 steps at a fixed place).
FILLS = {"fine_fill5x10": (5, 10), "fine_fill3x4": (3, 4), "fine_fill2x2": (2, 2)}
# The colour comparison's extra splits (name -> size options): the same question on images with one
# shape (no clutter), then up to three. The equality of two colours has no linear signal to start
# from; on one-shape images it left the chance loss within ~150 steps, never on the real ones.
COLOUR_STEPS = {"compare_colour1": {"max_shapes": 1, "clutter": 0}, "compare_colour3": {"max_shapes": 3}}
# The count comparison's extra split: the same question without clutter. On the real images it stayed
# on its chance loss through stages 2-8 in two runs of three (v13, v14), and for 150 steps alone; without
# clutter it left the plateau within ~75 steps alone, and then the real images followed (0.15 loss in
# 250 joint steps against the chance 0.35).
COUNT_STEPS = {"compare_count_clean": {"clutter": 0}}
STAGE7 = ["stage7a_fill", "stage7b_fill", "stage7c_fill", "stage7d_code", "stage7e_colour1", "stage7f_colour3"]
# stage -> recipe YAML, where the stage is not named after its recipe
RECIPE = {**{name: "stage2_llm" for name in STAGE2}, **{name: "stage7_curriculum" for name in STAGE7},
          "stage7g_count": "stage6_count", "stage7h_video": "stage5_video_sft", "stage7i_count_clean": "stage6_count",
          "stage7j_compare_count": "stage6_count", "stage7k_shape": "stage6_count"}


def _curriculum(sizes: dict[str, int]) -> dict[str, dict[str, int]]:
    """Stage -> mixture (family -> repeats): replay families once, new ones repeated to NEW_SHARE."""
    mixtures, seen = {}, []
    for name, new in _CURRICULUM:
        replay = sum(sizes[f] for f in seen)
        fresh = sum(sizes[f] for f in new)
        rep = max(1, round(NEW_SHARE / (1 - NEW_SHARE) * replay / fresh)) if seen else 1
        mixtures[name] = {**{f: 1 for f in seen}, **{f: rep for f in new}}
        seen += new
    return mixtures


def mixtures(sizes: dict[str, int]) -> dict[str, dict[str, int]]:
    """Every stage's mixture for the train split ``sizes`` (family -> records)."""
    return {
        "stage0a_llm": {"text": 1},
        "stage1_projector": ALL,
        **_curriculum(sizes),
        "stage3_vep": {**IMAGES, "fine_code": 2},
        "stage4_image_sft": {**IMAGES, "fine_code": 2},
        "stage5_video_sft": {"video_colour": 2, "video_order": 2, "video_count": 2, **IMAGES},
        "stage6_count": {"coarse_count": 1},
        "stage7a_fill": {"fine_fill5x10": 1},
        "stage7b_fill": {"fine_fill3x4": 2, "fine_fill5x10": 1},
        "stage7c_fill": {"fine_fill2x2": 2, "fine_fill3x4": 1},
        "stage7d_code": {"fine_code": 2, "fine_fill2x2": 1},
        "stage7e_colour1": {"compare_colour1": 1},
        # the code is replayed here: without it (run "v9") 7e-7g wiped it and stage 8 did not bring it back
        "stage7f_colour3": {"compare_colour3": 2, "compare_colour1": 1, "compare_colour": 1, "fine_code": 2,
                            "fine_fill2x2": 1},
        "stage7g_count": {"coarse_count": 1},
        # the video events alone again: in one run of two, stages 6-8 wiped the order (0.05 at seed 777)
        "stage7h_video": {"video_order": 2, "video_count": 1},
        "stage7i_count_clean": {"compare_count_clean": 1},
        "stage7j_compare_count": {"compare_count": 2, "compare_count_clean": 1, "coarse_count": 1},
        "stage7k_shape": {"coarse_shape": 1},
        "stage8_joint_sft": {**ALL, "coarse_shape": 3, "coarse_count": 4, "compare_count": 5, "compare_count_clean": 1,
                             "compare_colour": 4, "compare_colour3": 1, "video_order": 4, "video_count": 2,
                             "fine_code": 3},
        "stage9_localize": {"video_localize": 3, "video_colour": 1, "video_order": 1, "video_count": 1},
        # stage 8's mixture, the localization family ~12 % of the records
        "stage10_joint_replay": {**ALL, "coarse_shape": 3, "coarse_count": 4, "compare_count": 5,
                                 "compare_count_clean": 1, "compare_colour": 4, "compare_colour3": 1, "video_order": 4,
                                 "video_count": 2, "fine_code": 3, "video_localize": 6},
    }


# Every stage that trains the LLM starts from a mean-centred projector (synthvila.centre_projector).
# VEP (LLM frozen) starts where stage 2 ends: a frozen LLM cannot follow the shift.
CENTRED = (*STAGE2, "stage4_image_sft", "stage5_video_sft", "stage6_count", *STAGE7, "stage7g_count",
           "stage7h_video", "stage7i_count_clean", "stage7j_compare_count", "stage7k_shape", "stage8_joint_sft")


def _metrics(final: Path) -> list[dict]:
    return [json.loads(line) for line in (final / "metrics.jsonl").read_text().splitlines()]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    parser.add_argument("--out", type=Path, required=True, help="run directory (data, stages, eval)")
    parser.add_argument("--mode", choices=sorted(MODES), default="full", help="full run or the CI smoke version")
    parser.add_argument("--bundle", type=Path, default=None,
                        help="copy the final checkpoint, training log and eval results here")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch threads (default: torch's, one per core; 1 when another job shares the CPU)")
    parser.add_argument("--seed", type=int, default=0, help="initialisation and data-order seed")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    parser.add_argument("--start", type=Path, default=None,
                        help="a stage-8 checkpoint (the v16 bundle): run stages 9-10 from it, and log on top of its "
                             "training log")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")

    import torch

    from nvila.data.synthetic import FAMILIES, generate_eval_splits
    from nvila.eval import evaluate, to_markdown
    from nvila.train.stage0 import pretrain_vision
    from nvila.train.synthvila import Stage, bundle, init_checkpoint, make_data, run_stage

    if args.threads is not None:
        torch.set_num_threads(args.threads)
    mode = MODES[args.mode]
    out = args.out
    out.mkdir(parents=True, exist_ok=True)
    command = " ".join(shlex.quote(a) for a in [sys.executable, *sys.argv])

    sizes = {name: mode["video" if name.startswith("video") else "compare" if name.startswith("compare") else "image"]
             for name in FAMILIES}
    sizes.update({name: mode["image"] for name in [*FILLS, *COLOUR_STEPS]})
    sizes.update({name: mode["compare"] for name in COUNT_STEPS})
    mix = mixtures(sizes)
    if args.start is not None:  # stages 9-10 only: their splits only
        sizes = {name: n for name, n in sizes.items() if any(name in mix[stage] for stage in LATE)}
    data = make_data(out / "data", sizes, seed=1 + 100 * args.seed,
                     variants={**{name: ("fine_code", {"code_repeat": rep}) for name, rep in FILLS.items()},
                               **{name: ("compare_colour", opts) for name, opts in COLOUR_STEPS.items()},
                               **{name: ("compare_count", opts) for name, opts in COUNT_STEPS.items()}})

    ckpt = out / "init" if args.start is None else args.start
    if not (ckpt / "config.json").is_file():
        init_checkpoint(ckpt, seed=args.seed)

    stage0b = out / "stage0b_vision" / "final"
    if args.start is None and not (stage0b / "config.json").is_file():
        stage0b.parent.mkdir(parents=True, exist_ok=True)
        log = stage0b.parent / "metrics.jsonl"
        log.unlink(missing_ok=True)
        pretrain_vision(ckpt, stage0b, steps=mode["vision_steps"], scenes=8, frames=8, seed=args.seed,
                        progress=not args.no_progress,
                        eval_every=max(1, min(250, mode["vision_steps"] // 4)), log_path=log)
        shutil.copy(log, stage0b / "metrics.jsonl")

    stages = [Stage("stage0a_llm", HERE / "stage0a_llm.yaml", mix["stage0a_llm"], mode["text_steps"],
                    4 * mode["batch"])]
    stages += [Stage(name, HERE / f"{RECIPE.get(name, name)}.yaml", mix[name], steps, mode["batch"],
                     centre=name in CENTRED)
               for name, steps in mode["steps"].items()]
    if args.start is None:
        ckpt = stage0b
    else:
        stages = [s for s in stages if s.name in LATE]
    for stage in stages:
        ckpt = run_stage(stage, ckpt, out / stage.name, data, threads=args.threads, seed=args.seed,
                         progress=not args.no_progress)

    t = time.perf_counter()
    split = generate_eval_splits(None, mode["eval"], out / "eval")
    result = evaluate(ckpt, split, progress=not args.no_progress)
    eval_s = time.perf_counter() - t
    (out / "eval.json").write_text(json.dumps(result, indent=2))
    (out / "eval.md").write_text(to_markdown(result))
    # Training time per stage from the stages' own metrics, so a run resumed across invocations
    # (finished stages are skipped) still reports what each stage cost. From --start, the start's own
    # log (its stages 0-8) comes first.
    start_json = args.start / "train_log.json" if args.start is not None else None
    base = json.loads(start_json.read_text()) if start_json is not None and start_json.is_file() else {}
    train_s = dict(base.get("train_seconds", {}))
    if args.start is None:
        train_s["stage0b_vision"] = _metrics(stage0b)[-1]["elapsed_s"]
    train_s.update({s.name: sum(m["step_time_s"] for m in _metrics(out / s.name / "final")) for s in stages})
    train_log = {"command": command, "mode": args.mode, "threads": torch.get_num_threads(), "seed": args.seed,
                 **({"start": {"path": str(args.start), "command": base.get("command"),
                               "threads": base.get("threads")}} if args.start is not None else {}),
                 "train_seconds": {k: round(v, 1) for k, v in train_s.items()},
                 "train_seconds_total": round(sum(train_s.values()), 1), "eval_seconds": round(eval_s, 1),
                 "sizes": {**base.get("sizes", {}), **sizes},
                 "stage0b_vision": base.get("stage0b_vision", {"steps": mode["vision_steps"], "scenes": 8, "frames": 8}),
                 "stages": {**base.get("stages", {}), **{s.name: {"recipe": s.recipe.name, "steps": s.steps,
                                                                  "batch": s.batch, "mixture": s.mixture}
                                                         for s in stages}}}
    (out / "train_log.json").write_text(json.dumps(train_log, indent=2))
    logging.getLogger("synthvila").info("eval:\n%s", to_markdown(result))

    if args.bundle is not None:
        start_jsonl = args.start / "training_log.jsonl" if args.start is not None else None
        start_log = start_jsonl.read_text() if start_jsonl is not None and start_jsonl.is_file() else ""
        dest = bundle(ckpt, args.bundle)
        with open(dest / "training_log.jsonl", "w", encoding="utf-8") as f:
            f.write(start_log)
            for name in [*(["stage0b_vision"] if args.start is None else []), *(s.name for s in stages)]:
                for line in (out / name / "final" / "metrics.jsonl").read_text().splitlines():
                    f.write(json.dumps({"stage": name, **json.loads(line)}) + "\n")
        shutil.copy(out / "train_log.json", dest / "train_log.json")
        shutil.copy(out / "eval.json", dest / "eval.json")
        shutil.copy(out / "eval.md", dest / "eval.md")
    return 0

if __name__ == "__main__":
    sys.exit(main())
