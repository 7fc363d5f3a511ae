"""``nvila eval``: exact-match accuracy of a checkpoint on a SynthVILA family or a task JSONL.

Contract: ``--task`` is a JSONL/JSON file, a SynthVILA family name (``nvila.data.FAMILIES``), or
``all``. A family's eval split is generated into a temporary directory from the family's own eval
seed (or ``--seed``) at the ``--preset`` sizes (``--limit`` samples, default ``--eval-size``); ``all``
does so for every family. For a file,
``--limit`` keeps its first N records. Output on stdout: the Markdown table, or one JSON object with
``--json``; ``--markdown FILE`` also writes the table to FILE. Bad input raises ``ValueError``
(exit code 2 through ``nvila.cli``).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

HELP = "exact-match accuracy of a checkpoint on a SynthVILA task family or a task JSONL"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the ``nvila eval`` flags to ``parser``."""
    parser.add_argument("--model", default=None,
                        help="checkpoint directory or Hugging Face Hub id ORG/NAME[@REVISION] (default: the bundled "
                             "SynthVILA model)")
    parser.add_argument("--task", required=True,
                        help="a task JSONL file, a SynthVILA family name, or 'all' (every family)")
    parser.add_argument("--limit", type=int, default=None, help="evaluate at most N samples (per family for names)")
    parser.add_argument("--eval-size", type=int, default=100,
                        help="samples generated per family when --task is a name and --limit is not given")
    parser.add_argument("--preset", default="small",
                        help="SynthVILA size preset of generated splits: small (the bundled model's 24-px "
                             "geometry) or paper (448-px tiles)")
    parser.add_argument("--seed", type=int, default=None,
                        help="generate the split from this seed instead of each family's eval seed")
    parser.add_argument("--max-new-tokens", type=int, default=16, help="decode budget per answer")
    parser.add_argument("--batch-size", type=int, default=8,
                        help="samples the continuous-batching engine decodes together (KV-cache slots)")
    parser.add_argument("--max-tiles", type=int, default=None, help="override the checkpoint's max_tiles")
    parser.add_argument("--num-frames", type=int, default=None, help="override the video frames sampled")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    parser.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
    parser.add_argument("--json", action="store_true", help="print one JSON object (with per-sample predictions)")
    parser.add_argument("--markdown", metavar="FILE", default=None, help="also write the Markdown table to FILE")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")


def _task_file(task: str, n: int, tmp: Path, preset: str = "small", seed: int | None = None) -> Path:
    """The JSONL to evaluate: ``task`` itself, or a generated eval split of one or every family
    (``preset`` sizes; each family's eval seed unless ``seed`` is given)."""
    from nvila.data.synthetic import FAMILIES, SIZE_PRESETS, generate_eval_splits

    if Path(task).is_file():
        return Path(task)
    if task != "all" and task not in FAMILIES:
        raise ValueError(f"--task {task!r} is neither a file nor a task family; families: all, {', '.join(FAMILIES)}")
    if n < 1:
        raise ValueError(f"--eval-size must be >= 1, got {n}")
    if preset not in SIZE_PRESETS:
        raise ValueError(f"--preset {preset!r} is not valid; choose one of {', '.join(SIZE_PRESETS)}")
    return generate_eval_splits(None if task == "all" else [task], n, tmp, preset=preset, seed=seed)


def run(args: argparse.Namespace) -> int:
    """Run ``nvila eval``; returns the exit code."""
    import torch

    from . import evaluate, to_markdown

    if args.limit is not None and args.limit < 1:
        raise ValueError(f"--limit must be >= 1, got {args.limit}")
    if args.batch_size < 1:
        raise ValueError(f"--batch-size must be >= 1, got {args.batch_size}")
    if args.threads:
        torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory(prefix="nvila-eval-") as tmp:
        path = _task_file(args.task, args.eval_size if args.limit is None else args.limit, Path(tmp),
                          args.preset, args.seed)
        generated = path.parent == Path(tmp)
        result = evaluate(args.model, path, None if generated else args.limit, max_new_tokens=args.max_new_tokens,
                          batch_size=args.batch_size, progress=not args.no_progress, max_tiles=args.max_tiles,
                          num_video_frames=args.num_frames,
                          device=args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if generated:
        result["task"] = args.task
    table = to_markdown(result)
    if args.markdown:
        Path(args.markdown).write_text(table, encoding="utf-8")
    sys.stdout.write((json.dumps(result, indent=2) if args.json else table.rstrip("\n")) + "\n")
    return 0
