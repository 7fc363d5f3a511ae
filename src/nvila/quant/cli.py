"""``nvila quantize``: a full-precision checkpoint -> a quantized one (see ``handler.py``, ``format.py``).

``add_arguments(parser)`` declares the flags, ``run(args)`` does the work and returns the exit code
(0; bad input raises ``ValueError`` subclasses, which ``nvila.cli`` reports as exit code 2), and
``add_parser(subparsers)`` registers the subcommand on any argparse sub-parser set. Torch is imported
only when the command runs.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from ..argtypes import positive_int

HELP = "quantize a checkpoint: SmoothQuant W8A8 vision tower/projector, AWQ W4A16 or W8A8 language model"


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The flags of ``nvila quantize``."""
    from .handler import CHOICES

    p.add_argument("--model", required=True,
                   help="full-precision checkpoint (vila or hf layout; the output is in the vila layout): a directory "
                        "or a Hugging Face Hub id "
                        "ORG/NAME[@REVISION]")
    p.add_argument("--out", required=True, help="output directory (written atomically)")
    p.add_argument("--vision", default="none", choices=CHOICES["vision"], help="vision tower scheme")
    p.add_argument("--llm", default="none", choices=CHOICES["llm"], help="language model scheme")
    p.add_argument("--projector", default="none", choices=CHOICES["projector"], help="projector scheme")
    p.add_argument("--lm-head", default="none", choices=CHOICES["lm_head"],
                   help="output head scheme (default: full precision)")
    p.add_argument("--calib", default=None, help="calibration JSONL with a \"text\" per line (default: bundled)")
    p.add_argument("--calib-images", nargs="+", default=None, metavar="PATH",
                   help="calibration images or directories for the vision tower (default: random colour fields)")
    p.add_argument("--calib-samples", type=positive_int, default=128, help="calibration text blocks (default 128)")
    p.add_argument("--calib-seq-len", type=positive_int, default=512, help="tokens per block (default 512)")
    p.add_argument("--calib-tiles", type=positive_int, default=8, help="calibration tiles (default 8)")
    p.add_argument("--search-tokens", type=positive_int, default=1024,
                   help="calibration rows per layer group for the AWQ searches (default 1024)")
    p.add_argument("--group-size", type=int, default=128, choices=(32, 64, 128, 256), help="W4A16 group size")
    p.add_argument("--alpha", type=float, default=0.5, help="SmoothQuant migration strength (default 0.5)")
    p.add_argument("--device", default="cpu", help="device used while quantizing (default cpu)")
    p.add_argument("--threads", type=positive_int, default=None, help="torch CPU threads")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", action="store_true", help="print one JSON object")


def add_parser(subparsers) -> argparse.ArgumentParser:
    """Register ``quantize`` on an argparse sub-parser set; returns the new parser."""
    p = subparsers.add_parser("quantize", help=HELP, description=HELP[:1].upper() + HELP[1:] + ".")
    add_arguments(p)
    p.set_defaults(run=run)
    return p


def run(args: argparse.Namespace) -> int:
    """Quantize ``args.model`` into ``args.out``; a summary goes to stdout."""
    import torch

    from .handler import QuantPlan, quantize_checkpoint

    if args.threads:
        torch.set_num_threads(args.threads)
    plan = QuantPlan(vision=args.vision, projector=args.projector, llm=args.llm, lm_head=args.lm_head,
                     alpha=args.alpha, group_size=args.group_size)
    t0 = time.perf_counter()
    out = quantize_checkpoint(args.model, args.out, plan, calib_file=args.calib, calib_images=args.calib_images,
                              n_samples=args.calib_samples, seq_len=args.calib_seq_len, n_tiles=args.calib_tiles,
                              search_tokens=args.search_tokens, device=args.device, seed=args.seed)
    sizes = {d.name: sum(f.stat().st_size for f in d.glob("*.safetensors")) for d in out.iterdir() if d.is_dir()}
    report = {"out": str(out), "vision": plan.vision, "projector": plan.projector, "llm": plan.llm,
              "lm_head": plan.lm_head, "seconds": round(time.perf_counter() - t0, 2), "weight_bytes": sizes}
    if args.json:
        text = json.dumps(report)
    else:
        text = "\n".join([f"wrote {out} in {report['seconds']} s",
                          *(f"  {k}: {v / 2**20:.1f} MiB" for k, v in sorted(sizes.items()))])
    sys.stdout.write(text + "\n")
    return 0
