"""``nvila prune``: keep the most informative fraction of every sub-dataset of a training mixture.

Usage::

    nvila prune --large CKPT --small CKPT --mixture mix.yaml --keep 0.5 --out pruned/
    nvila train --config ... data.mixture=pruned/mixture.yaml
    torchrun --nproc_per_node 8 -m nvila prune ...   # each rank scores a shard; rank 0 selects

Read top to bottom, ``run`` checks every input (errors before any work) -> scores what
``out/scores.jsonl`` does not hold yet (score.py) -> selects per sub-dataset and writes the drop-index
files, the pruned mixture and the report (select.py). ``add_arguments``/``run``/``HELP`` follow the
other subcommands; bad input raises ``ValueError``, which ``nvila.cli`` reports in one line.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from ..argtypes import positive_int
from .select import METHODS

HELP = "prune a training mixture: keep the top fraction of each dataset by DeltaLoss (or random / cluster)"

EPILOG = """\
score(x) = CE_small(x) - CE_large(x) over x's answer tokens (the training label masking); positive
means the large model is more confident, and the highest scores are kept: ceil(keep * n) records of
every dataset, so the mixture's proportions hold. Scores stream to OUT/scores.jsonl and a rerun
continues where a killed one stopped. OUT gets mixture.yaml (for nvila train), the drop-index files
filter_index/<keep>/<name>.json (the reference's name@tag layout), report.txt and scores.png."""


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The flags of ``nvila prune``."""
    p.epilog = EPILOG
    p.formatter_class = argparse.RawDescriptionHelpFormatter
    p.add_argument("--large", required=True, help="the large (reference) checkpoint")
    p.add_argument("--small", required=True, help="the small checkpoint; it must share the large one's tokenizer")
    p.add_argument("--mixture", required=True, help="the training mixture YAML to prune")
    p.add_argument("--keep", type=float, required=True, help="fraction of every dataset to keep, in (0, 1]")
    p.add_argument("--out", required=True, help="output directory (scores, pruned mixture, drop files, report)")
    p.add_argument("--method", default="deltaloss", choices=METHODS,
                   help="deltaloss (default); random: a seeded uniform sample; cluster: spread over k-means "
                        "clusters of the large model's sample embeddings")
    p.add_argument("--reduction", default="mean", choices=("mean", "sum"),
                   help="CE over a sample's answer tokens: per-token mean (default) or sum")
    p.add_argument("--batch-size", type=positive_int, default=8, help="samples packed per forward pass (default 8)")
    p.add_argument("--max-length", type=positive_int, default=8192,
                   help="longest media-expanded sample, as data.max_length in training (default 8192)")
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"))
    p.add_argument("--device", default="cpu", help="cpu (default) or cuda; under torchrun cuda:LOCAL_RANK")
    p.add_argument("--threads", type=positive_int, default=None, help="torch CPU threads")
    p.add_argument("--seed", type=int, default=0, help="seed of random and of k-means (default 0)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def _check(args: argparse.Namespace):
    """Every input check; returns (large root, small root, specs, candidates, record counts, processors)."""
    from ..checkpoint import check_layout
    from ..processor import NVILAProcessor
    from ..train.data import load_mixture, read_records, without_dropped

    if not 0 < args.keep <= 1:
        raise ValueError(f"--keep must be in (0, 1], got {args.keep}")
    specs = load_mixture(args.mixture)
    names = [s.name for s in specs]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise ValueError(f"{args.mixture}: dataset name {dup[0]!r} appears twice; names key the drop-index files")
    large, small = check_layout(args.large), check_layout(args.small)
    procs = {k: NVILAProcessor.from_pretrained(root) for k, root in (("large", large), ("small", small))}
    if (procs["large"].tokenizer.get_vocab() != procs["small"].tokenizer.get_vocab()
            or procs["large"].ids != procs["small"].ids):
        raise ValueError(f"--large {args.large} and --small {args.small} have different tokenizers; "
                         f"DeltaLoss compares the CE of the same tokens")
    counts = {s.name: len(read_records(s.path)) for s in specs}
    candidates = {s.name: without_dropped(list(range(counts[s.name])), s.drop) if s.drop else list(range(counts[s.name]))
                  for s in specs}
    return large, small, specs, candidates, counts, procs


def run(args: argparse.Namespace) -> int:
    """Score, select and write ``args.out``; a summary goes to stdout."""
    import torch

    from ..train import distributed as D
    from . import score as S

    large, small, specs, candidates, counts, procs = _check(args)
    out = Path(args.out)
    fp = S.fingerprint(large, small, specs, max_length=args.max_length, reduction=args.reduction, dtype=args.dtype,
                       embeddings=args.method == "cluster")
    scored = S.read_scores(out, fp) if out.is_dir() and args.method != "random" else {}  # refuses a stale file
    if args.threads:
        torch.set_num_threads(args.threads)
    info = D.init(args.device)
    try:
        return _score_and_select(args, info, large, small, specs, candidates, counts, procs, out, fp, scored)
    finally:
        D.shutdown()


def _score_and_select(args, info, large, small, specs, candidates, counts, procs, out, fp, scored) -> int:
    import torch

    from ..train import distributed as D
    from ..train.data import SampleEncoder
    from ..train.packing import use_packed_attention
    from . import score as S
    from .select import report, select, tag_for, write_outputs

    t0 = time.perf_counter()
    if args.method != "random":
        todo = S.pending(specs, set(scored), candidates, info.rank, info.world)
        if todo:
            from ..model import NVILAForConditionalGeneration

            out.mkdir(parents=True, exist_ok=True)
            device = torch.device(args.device)
            if device.type == "cuda" and info.world > 1:
                device = torch.device("cuda", info.local_rank)
            dtype = getattr(torch, args.dtype)
            models = {}
            for k, root in (("large", large), ("small", small)):
                models[k] = NVILAForConditionalGeneration.from_pretrained(root, dtype=dtype, device=device).eval()
                use_packed_attention(models[k].llm)
            encoders = {"large": SampleEncoder(procs["large"], args.max_length)}
            encoders["small"] = (encoders["large"] if S.same_media_processing(procs["large"], procs["small"])
                                 else SampleEncoder(procs["small"], args.max_length))
            path = out / (S.SCORES if info.rank == 0 else f"scores.rank{info.rank}.jsonl")
            sink = S.ScoresFile(path, fp)
            try:
                S.score_records(todo, specs, models, encoders, sink, batch_size=args.batch_size,
                                reduction=args.reduction, embeddings=args.method == "cluster",
                                progress=info.is_main and not args.no_progress)
            finally:
                sink.close()
        D.barrier()
        if not info.is_main:
            return 0
        S.merge_shards(out)
        scored = S.read_scores(out, fp)
    elif not info.is_main:
        return 0
    seconds = time.perf_counter() - t0

    rows: dict[str, list[dict]] = {s.name: [] for s in specs}
    for (name, _), r in sorted(scored.items(), key=lambda kv: (kv[0][0], kv[0][1])):
        rows[name].append(r)
    kept = select(rows, candidates, args.keep, args.method, args.seed)
    tag = tag_for(args.keep)
    out.mkdir(parents=True, exist_ok=True)
    mixture, drops = write_outputs(out, specs, counts, kept, tag)
    report(out, rows, kept, method=args.method)
    summary = {"method": args.method, "keep": args.keep, "scoring_seconds": round(seconds, 2), "mixture": str(mixture),
               "datasets": {s.name: {"records": counts[s.name], "candidates": len(candidates[s.name]),
                                     "kept": len(kept[s.name]), "drop_file": str(drops[s.name])} for s in specs}}
    lines = [f"nvila prune ({args.method}, keep {tag}): pruned mixture {mixture}"]
    lines += [f"  {n}: kept {d['kept']} of {d['candidates']}  (drops: {d['drop_file']})"
              for n, d in summary["datasets"].items()]
    lines.append(f"  report: {out / 'report.txt'}")
    (out / "summary.json").write_text(json.dumps(summary, indent=1) + "\n", encoding="utf-8")
    sys.stdout.write("\n".join(lines) + "\n")
    return 0
