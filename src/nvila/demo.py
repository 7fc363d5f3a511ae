"""``make demo``: run the main job, ``nvila infer``, on the bundled example image and video.

The project has no trained model of its own yet, so the demo builds a tiny checkpoint with RANDOM
weights (the real NVILA architecture and geometry at toy widths, in the published layout) and
says so. The answers are meaningless; what the demo shows is the pipeline: tiling, the visual-token
budget per medium, and the timings.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from .cli import main as cli_main
from .tiny import TINY_FAMILIES, build_tiny_checkpoint

REPO = Path(__file__).resolve().parents[2]
ASSETS = REPO / "assets"

BANNER = """\
==============================================================================================
 nvila demo: {family} family, tiny checkpoint with RANDOM weights (built just now in {path})
 The architecture, tiling and token accounting are real; the weights are not trained, so the
 answers below are gibberish. Look at the token budget per medium and the timings.
=============================================================================================="""


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m nvila.demo", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--family", default="nvila", choices=sorted(TINY_FAMILIES),
                    help="which NVILA family to build (default: nvila, dynamic-S2 tiling)")
    ap.add_argument("--out", type=Path, default=REPO / ".demo",
                    help="where the tiny checkpoint is written (default: .demo/ in the repo)")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")

    image, video = ASSETS / "example.png", ASSETS / "example.mp4"
    missing = [p for p in (image, video) if not p.exists()]
    if missing:
        sys.stderr.write(f"nvila demo: error: bundled media missing: {', '.join(map(str, missing))}\n")
        return 2
    path = build_tiny_checkpoint(args.out / f"tiny-{args.family}", args.family)
    sys.stdout.write(BANNER.format(family=args.family, path=path) + "\n\n")
    jobs = [
        ("image", [str(image)], "Describe the image in detail."),
        ("video", [str(video)], "What happens in this video?"),
    ]
    for name, media, question in jobs:
        sys.stdout.write(f"--- {name}: {', '.join(Path(m).name for m in media)} | {question}\n")
        sys.stdout.flush()
        code = cli_main(["infer", "--model", str(path), "--media", *media, "--text", question,
                         "--max-new-tokens", "16"])
        if code:
            return code
        sys.stdout.write("\n")
    sys.stdout.write("Weights were random: answers are not meaningful. Run `nvila infer --model PATH ...` "
                     "on a real NVILA checkpoint for real answers.\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
