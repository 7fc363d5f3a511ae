"""``nvila train`` / ``nvila finetune`` and ``python -m nvila.train`` (also under ``torchrun``).

Usage::

    nvila train --config nvila_stage1_projector model.path=CKPT data.mixture=MIX.yaml
    nvila train --config my_recipe.yaml ...       # a YAML file of your own
    nvila train --config ... --dry-run            # memory report from meta-device shapes, no weights
    nvila train --config ... --dry-run dist.strategy=fsdp2 dist.world_size=8   # per-rank bytes, 8 ranks
    nvila train --config ... --resume             # continue from the newest checkpoint in run.output_dir
    nvila finetune model.path=CKPT data.mixture=MIX.yaml        # the finetune_lora recipe by default
    torchrun --nproc_per_node 2 -m nvila.train --config ... [dist.strategy=fsdp2] [key=value ...]

``--config`` takes a YAML path or the name of a recipe shipped with nvila (package data, listed in
``--help``). Every setting is a config key; ``key=value`` arguments override the YAML
(``optim.lr.llm=1e-4``).
Config, data and batch-size errors are reported before any model is loaded. This module parses
flags and prints reports; the work is in trainer.py and memory.py.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys

from .config import shipped_recipes

logger = logging.getLogger(__name__)

FINETUNE_RECIPE = "finetune_lora"


def add_arguments(parser: argparse.ArgumentParser, *, finetune: bool = False) -> None:
    """Flags shared by ``train`` and ``finetune`` (``finetune`` defaults ``--config`` to the PEFT recipe)."""
    names = ", ".join(shipped_recipes())
    parser.add_argument("--config", default=FINETUNE_RECIPE if finetune else None, required=not finetune,
                        metavar="RECIPE", help=f"a recipe YAML file, or the name of a shipped recipe ({names})"
                        + (f"; default: {FINETUNE_RECIPE}" if finetune else ""))
    parser.add_argument("overrides", nargs="*", metavar="key=value",
                        help="config overrides with dotted keys, e.g. optim.lr.llm=1e-4 run.output_dir=out")
    parser.add_argument("--resume", action="store_true",
                        help="continue from the newest complete checkpoint in run.output_dir")
    parser.add_argument("--dry-run", action="store_true",
                        help="print weight/gradient/optimizer memory per component and exit (no weights read)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads per process (= run.threads)")
    parser.add_argument("--memory-limit-gib", type=float, default=24.0,
                        help="with --dry-run: say whether the total fits in this many GiB (default 24)")
    parser.add_argument("--json", action="store_true", help="with --dry-run: print the report as JSON")


def add_parser(subparsers) -> None:
    """Register ``train`` and ``finetune`` on an argparse sub-parser collection."""
    for name, text, ft in (("train", "train or fine-tune NVILA from a recipe YAML", False),
                           ("finetune", "PEFT fine-tuning (LoRA LLM, LayerNorm ViT, full projector)", True)):
        p = subparsers.add_parser(name, help=text, description=text[:1].upper() + text[1:] + ".")
        add_arguments(p, finetune=ft)
        p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    """Run a parsed ``train``/``finetune`` command; returns the exit code (errors raise ``ValueError``)."""
    from .config import load_config

    overrides = list(args.overrides)
    if args.threads is not None:
        overrides.append(f"run.threads={args.threads}")
    cfg = load_config(args.config, overrides)
    if args.dry_run:
        from .memory import GIB, format_report, memory_report

        report = memory_report(cfg)
        if args.json:
            out = {"dtype": report["dtype"], "precision": report["precision"], "optimizer": report["optimizer"],
                   "optimizer_gib": sum(c.optimizer_bytes for c in report["components"].values()) / GIB,
                   "total_gib": report["total_bytes"] / GIB,
                   "activation_gib": report["activation_bytes"] / GIB, "strategy": report["strategy"],
                   "world_size": report["world_size"], "gathered_gib": report["gathered_bytes"] / GIB,
                   "components": {k: {**vars(c), "total_bytes": c.total_bytes}
                                  for k, c in report["components"].items()}}
            sys.stdout.write(json.dumps(out) + "\n")
        else:
            sys.stdout.write(format_report(report, args.memory_limit_gib) + "\n")
        return 0
    from .trainer import train

    last = train(cfg, resume=args.resume)
    logger.info("last checkpoint: %s", last)
    return 0


def main(argv: list[str] | None = None) -> int:
    """``python -m nvila.train``: the ``nvila train`` flags; one ``error:`` line and exit 2 on bad input."""
    from .distributed import world_from_env

    parser = argparse.ArgumentParser(prog="python -m nvila.train", description="Train NVILA from a recipe YAML.")
    parser.add_argument("-v", "--verbose", action="store_true", help="log at debug level")
    add_arguments(parser)
    args = parser.parse_intermixed_args(argv)
    rank = world_from_env().rank
    logging.basicConfig(stream=sys.stderr, format=f"nvila[{rank}]: %(levelname)s: %(message)s",
                        level=logging.DEBUG if args.verbose else logging.INFO if rank == 0 else logging.WARNING)
    try:
        return run(args)
    except (ValueError, OSError) as e:
        logger.debug("bad input", exc_info=True)
        sys.stderr.write(f"nvila: error: {' '.join(str(e).split())}\n")
        return 2
    except KeyboardInterrupt:
        sys.stderr.write("nvila: interrupted\n")
        return 130
