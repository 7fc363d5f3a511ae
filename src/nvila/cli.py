"""The ``nvila`` command line: ``nvila infer`` here, and every other subcommand from its own module.

Contract: every subcommand is a ``Command`` in ``COMMANDS`` (name -> arguments + run function), so
each subcommand is one more entry, its flags and run function in its own module. ``main(argv)``
returns the exit code:

* 0 on success; results go to stdout (human text, or one JSON object with ``--json``);
* 2 on bad input (flags, media, checkpoints, configs): one line ``nvila: error: <message>`` on
  stderr, nothing on stdout, no traceback (``-vv`` logs the traceback at debug level);
* 130 on Ctrl-C.

A subcommand whose ``--model`` defaults to None (``infer``, ``serve``, ``eval``) runs on the bundled
SynthVILA checkpoint (``nvila.bundled.default_model_path``) when the flag is left out. A checkpoint
argument may also be a Hugging Face Hub id ``ORG/NAME[@REVISION]`` (``checkpoint.resolve_checkpoint``).

Logs go to stderr through ``logging``: ``-v`` info, ``-vv`` debug; by default warnings only, held
until the command ends and dropped on bad input. This module knows flags, output formats and
timings; the token accounting comes from the processor and the model does the rest.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import logging
import logging.handlers
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from . import __version__, timetokens
from .argtypes import HUB_HELP, float_in, int_at_least, text_table
from .bundled import default_model_path
from .checkpoint import CheckpointError, check_layout
from .config import ConfigError
from .engine.constraints import JsonConstraints
from .eval import cli as eval_cli
from .media import DEFAULT_MAX_PIXELS, MediaError
from .model import NVILAForConditionalGeneration
from .prune import cli as prune_cli
from .processor import MediumInfo, NVILAProcessor
from . import convert, inspection
from .quant import cli as quant_cli
from .server import cli as serve_cli  # imports neither FastAPI nor uvicorn
from .train import cli as train_cli

logger = logging.getLogger(__name__)

# Errors that mean "the input is bad", reported in one line with exit code 2. The first three are
# ValueError subclasses; they are listed to document where bad input is detected.
BAD_INPUT = (MediaError, CheckpointError, ConfigError, ValueError, OSError)
EXIT_BAD_INPUT = 2
EXIT_INTERRUPTED = 130

# A path with one of these suffixes is a video; a directory is a frame directory (a video); anything
# else is an image. ``.gif`` is an image (its first frame): write ``video:clip.gif`` to sample it.
VIDEO_SUFFIXES = frozenset({".mp4", ".m4v", ".mov", ".mkv", ".webm", ".avi", ".mpg", ".mpeg", ".wmv",
                            ".flv", ".3gp"})
DTYPES = ("float32", "bfloat16", "float16")


class UsageError(Exception):
    """A command-line flag is missing or has a bad value (argparse's errors end up here)."""


class _Parser(argparse.ArgumentParser):
    """argparse, but a usage error raises instead of printing the usage and exiting."""

    def error(self, message: str):
        raise UsageError(f"{message} (see '{self.prog} --help')")


# ------------------------------------------------------------------------------ flag value types
def _device(text: str) -> torch.device:
    try:
        device = torch.device(text)
    except RuntimeError as e:
        raise argparse.ArgumentTypeError(str(e).splitlines()[0]) from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise argparse.ArgumentTypeError(f"{text!r}: CUDA is not available on this machine")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise argparse.ArgumentTypeError(f"{text!r}: MPS is not available on this machine")
    return device


# ----------------------------------------------------------------------------------------- infer
def _infer_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", metavar="PATH",
                   help="checkpoint directory in the vila layout (config.json, llm/, vision_tower/, mm_projector/) "
                        f"or the hf layout (docs/checkpoints.md), or {HUB_HELP}; default: the bundled SynthVILA model")
    p.add_argument("--media", nargs="+", default=[], metavar="F",
                   help="images and videos, placed before the text in this order. A directory is a video "
                        f"(its files are the frames, in name order); {', '.join(sorted(VIDEO_SUFFIXES))} are "
                        "videos; anything else is an image (.gif too: its first frame). Prefix 'image:' or "
                        "'video:' to choose the kind yourself. Omit for a text-only prompt")
    p.add_argument("--text", required=True, help="the question or instruction, after the media")
    p.add_argument("--system", metavar="TEXT", help="system prompt (default: the chat template's own)")
    pre = p.add_argument_group("preprocessing (defaults come from the checkpoint's config)")
    pre.add_argument("--max-tiles", type=int_at_least(1), metavar="N",
                     help="most tiles per image (NVILA: at the largest S2 scale, so >= 9 for scales 448..1344)")
    frames = pre.add_mutually_exclusive_group()
    frames.add_argument("--num-frames", type=int_at_least(1), metavar="N",
                        help="frames sampled evenly from each video (TSP models: a multiple of the temporal pool)")
    frames.add_argument("--fps", type=float_in(0, low_open=True), metavar="F",
                        help="sample video files at F frames per second instead, at most the config's frame count")
    pre.add_argument("--max-pixels", type=int_at_least(1), default=DEFAULT_MAX_PIXELS, metavar="N",
                     help="reject images and video frames with more than N pixels (default: %(default)s)")
    pre.add_argument("--video-fps", type=float_in(0, low_open=True), metavar="F",
                     help="the frame rate of a frame-directory video, which has none of its own: with it, a "
                          "time-token checkpoint's answer gives seconds (video files carry their own)")
    gen = p.add_argument_group("generation")
    gen.add_argument("--max-new-tokens", type=int_at_least(1), default=256, metavar="N",
                     help="most tokens to generate (default: %(default)s)")
    gen.add_argument("--do-sample", action="store_true", help="sample instead of greedy decoding")
    gen.add_argument("--temperature", type=float_in(0), default=1.0, metavar="T",
                     help="sampling temperature, 0 = greedy (default: %(default)s; needs --do-sample)")
    gen.add_argument("--top-p", type=float_in(0, 1, low_open=True), default=1.0, metavar="P",
                     help="nucleus sampling: keep the most likely tokens up to mass P (default: %(default)s = off)")
    gen.add_argument("--top-k", type=int_at_least(0), default=0, metavar="K",
                     help="keep the K most likely tokens (default: %(default)s = off)")
    gen.add_argument("--seed", type=int, metavar="S", help="random seed for sampling (reproducible runs)")
    shape = gen.add_mutually_exclusive_group()
    shape.add_argument("--json-mode", action="store_true",
                       help="constrain the answer to one JSON object (grammar-guided decoding with xgrammar; "
                            "needs the 'json' extra)")
    shape.add_argument("--json-schema", metavar="FILE",
                       help="constrain the answer to JSON that validates against the JSON schema in FILE "
                            "(needs the 'json' extra)")
    run = p.add_argument_group("runtime")
    run.add_argument("--dtype", choices=DTYPES, default="float32",
                     help="weights and activations dtype (default: %(default)s)")
    run.add_argument("--device", type=_device, metavar="DEV",
                     help="torch device, e.g. cpu, cuda, cuda:1 (default: cuda if available, else cpu)")
    run.add_argument("--threads", type=int_at_least(1), metavar="N", help="CPU threads for torch (torch.set_num_threads)")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of the human report")


def media_part(spec: str) -> dict[str, str]:
    """A ``--media`` value -> a message content part, with the kind decided as ``--help`` says."""
    for kind in ("image", "video"):
        if spec.startswith(kind + ":"):
            return {"type": kind, kind: spec[len(kind) + 1:]}
    path = Path(spec)
    kind = "video" if path.is_dir() or path.suffix.lower() in VIDEO_SUFFIXES else "image"
    return {"type": kind, kind: spec}


def _group_media(parts: list[dict], infos: list[MediumInfo]) -> list[list[MediumInfo]]:
    """Processor media -> one group per ``--media`` value.

    The processor's rule: an image alone among the images of a conversation may become several media
    (NVILA-Lite: one per tile, consecutive); every other image or video is exactly one medium.
    """
    single = sum(p["type"] == "image" for p in parts) == 1
    groups, i = [], 0
    for part in parts:
        n = 1
        if part["type"] == "image" and single:
            while i + n < len(infos) and infos[i + n].kind == "image":
                n += 1
        groups.append(infos[i:i + n])
        i += n
    if i != len(infos):
        raise RuntimeError(f"{len(infos)} processed media do not map onto {len(parts)} inputs")
    return groups


def _media_row(group: list[MediumInfo]) -> dict[str, Any]:
    first = group[0]
    video = first.kind == "video"
    return {
        "kind": first.kind,
        "source": first.source,
        "tiles": None if video else sum(m.num_tiles for m in group),
        "frames": first.num_tiles if video else None,
        "block_size": list(first.block_size) if first.block_size else None,
        "frame_indices": first.frame_indices if video else None,
        "visual_tokens": sum(m.num_visual_tokens for m in group),
        "tokens": sum(m.num_tokens for m in group),
    }


class _Clock:
    """A ``generate`` streamer that records when each token arrives (the first one: after prefill)."""

    def __init__(self, sync: Callable[[], None] | None = None):
        self.sync = sync
        self.start = time.perf_counter()
        self.times: list[float] = []

    def put(self, ids) -> None:  # ids: (B,)
        if self.sync is not None:
            self.sync()
        self.times.append(time.perf_counter())

    def end(self) -> None:
        pass


def run_infer(args: argparse.Namespace) -> int:
    if args.threads:
        torch.set_num_threads(args.threads)
    device = args.device or torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = getattr(torch, args.dtype)
    if not args.do_sample and (args.temperature != 1.0 or args.top_p != 1.0 or args.top_k or args.seed is not None):
        logger.warning("--temperature/--top-p/--top-k/--seed only apply with --do-sample; decoding greedily")
    response_format = _response_format(args)
    parts = [media_part(m) for m in args.media]
    messages = []
    if args.system is not None:
        messages.append({"role": "system", "content": args.system})
    messages.append({"role": "user", "content": [*parts, {"type": "text", "text": args.text}]})

    # A Hub id is fetched once and both loaders read that snapshot. Media are decoded before the
    # weights are loaded, so bad media fail fast.
    t0 = time.perf_counter()
    root = check_layout(args.model)
    processor = NVILAProcessor.from_pretrained(root, max_tiles=args.max_tiles, num_video_frames=args.num_frames,
                                               fps=args.fps, max_pixels=args.max_pixels)
    t1 = time.perf_counter()
    inputs, infos = processor.prepare([messages], add_generation_prompt=True, video_fps=args.video_fps)
    constraint = None
    if response_format is not None:  # compiled before the weights load, so a bad schema fails fast
        ids = processor.ids  # the same ids (and logits width) the model is built with
        constraint = JsonConstraints(processor.tokenizer, ids.vocab_size, list(ids.stop)).processor(response_format)
    t2 = time.perf_counter()
    logger.info("preprocessed %d media into a %d-token prompt in %.2f s", len(infos[0]),
                inputs["input_ids"].shape[1], t2 - t1)
    model = NVILAForConditionalGeneration.from_pretrained(root, torch_dtype=dtype, device=device)
    t3 = time.perf_counter()
    logger.info("loaded %s (%s, %s) in %.2f s", args.model, args.dtype, device, t3 - t2 + t1 - t0)
    inputs = inputs.to(model.device)
    t4 = time.perf_counter()
    result = generate_report(model, processor, inputs, infos[0], parts, max_new_tokens=args.max_new_tokens,
                             do_sample=args.do_sample, temperature=args.temperature, top_k=args.top_k,
                             top_p=args.top_p, seed=args.seed,
                             logits_processors=None if constraint is None else [[constraint]])
    report = {"model": str(args.model), "dtype": args.dtype, "device": str(model.device), **result}
    report["timings"] = {"model_load_s": (t1 - t0) + (t3 - t2), "preprocess_s": (t2 - t1) + (t4 - t3),
                         **result["timings"]}
    _write(json.dumps(report, ensure_ascii=False) if args.json else _format_infer(report))
    return 0


def _response_format(args: argparse.Namespace) -> dict[str, Any] | None:
    """``--json-mode`` / ``--json-schema FILE`` as an OpenAI ``response_format`` (None: free text)."""
    if args.json_mode:
        return {"type": "json_object"}
    if args.json_schema is None:
        return None
    try:
        schema = json.loads(Path(args.json_schema).read_text(encoding="utf-8"))
    except OSError as e:
        raise ValueError(f"--json-schema: cannot read {args.json_schema}: {e.strerror or e}") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"--json-schema: {args.json_schema} is not JSON: {e}") from None
    if not isinstance(schema, dict):
        raise ValueError(f"--json-schema: {args.json_schema} must hold a JSON object (a JSON schema)")
    return {"type": "json_schema", "json_schema": {"name": Path(args.json_schema).stem, "schema": schema}}


def generate_report(model: NVILAForConditionalGeneration, processor: NVILAProcessor, inputs, infos: list[MediumInfo],
                    parts: list[dict], **generate_kwargs) -> dict[str, Any]:
    """Answer one prepared prompt and describe the run, as ``nvila infer`` reports it.

    Args:
        model, processor: a loaded checkpoint.
        inputs: ``processor.prepare`` output for one conversation, already on ``model.device``.
        infos: that conversation's ``MediumInfo`` list.
        parts: the user's media parts (``media_part``), one per medium the user gave.
        **generate_kwargs: ``model.generate`` options (``max_new_tokens``, ``do_sample``, ...).
    Returns:
        ``{"answer", "finish_reason", "prompt_tokens", "new_tokens", "media": [one row per part],
        "timings": {"time_to_first_token_s", "decode_tokens_per_s", "generate_s"}}``, and for a
        time-token checkpoint asked about one video, ``"segments"``: the answer's [start, end] pairs.
    """
    sync = torch.cuda.synchronize if model.device.type == "cuda" else None
    clock = _Clock(sync)
    t0 = time.perf_counter()
    ids = model.generate(**inputs, streamer=clock, **generate_kwargs)
    t1 = time.perf_counter()
    prompt_len = inputs["input_ids"].shape[1]
    new = ids[0, prompt_len:].tolist()
    limit = generate_kwargs.get("max_new_tokens")  # below it, a processor (JSON complete) or a stop ended the answer
    ttft = clock.times[0] - clock.start if clock.times else None
    decode_s = clock.times[-1] - clock.times[0] if len(clock.times) > 1 else None
    answer, segments = _answer(processor, new, infos)
    return {
        "answer": answer,
        **({"segments": segments} if segments is not None else {}),
        "finish_reason": "stop" if (new and new[-1] in model.ids.stop) or (limit and len(new) < limit) else "length",
        "prompt_tokens": prompt_len,
        "new_tokens": len(new),
        "media": [_media_row(g) for g in _group_media(parts, infos)],
        "timings": {
            "time_to_first_token_s": ttft,
            "decode_tokens_per_s": (len(clock.times) - 1) / decode_s if decode_s else None,
            "generate_s": t1 - t0,
        },
    }


def _answer(processor: NVILAProcessor, new: list[int], infos: list[MediumInfo]) -> tuple[str, list | None]:
    """The answer's text and, for a time-token checkpoint asked about exactly one video, its segments
    in seconds (time tokens decoded against the video's duration; as fractions of the clip, with a
    warning, when the duration is unknown). Elsewhere time tokens stay as they are."""
    cfg = processor.config
    duration = processor.time_token_duration(infos, warn=False)  # warned below, if the answer has time tokens
    raw = processor.decode(new)
    timed = bool(cfg.num_time_tokens and timetokens.time_token_regex(cfg.time_token_format).search(raw))
    if duration is None:
        if timed:
            logger.warning("the answer holds time tokens, left as they are: they are positions in a video, and "
                           "the prompt has %s", "no video" if not infos else "more than one medium")
        return raw, None
    if timed and infos[0].duration_s is None:
        processor.time_token_duration(infos)  # says that the frame rate is unknown
    text = processor.decode(new, decode_time_tokens=duration)
    return text, timetokens.segments(text)


def format_budget(r: dict[str, Any]) -> list[str]:
    """The token-budget lines of a report: one table row per medium, then the prompt length."""
    rows = [[m["kind"], m["source"], m["tiles"] if m["kind"] == "image" else m["frames"],
             "x".join(map(str, m["block_size"])) if m["block_size"] else None, m["visual_tokens"], m["tokens"]]
            for m in r["media"]]
    lines = []
    if rows:
        lines += text_table(["kind", "file", "tiles/frames", "block", "visual tokens", "tokens"], rows, {2, 4, 5})
    media_tokens = sum(m["tokens"] for m in r["media"])
    lines.append(f"prompt: {r['prompt_tokens']} tokens ({media_tokens} media + {r['prompt_tokens'] - media_tokens} text)")
    return lines


def _format_infer(r: dict[str, Any]) -> str:
    lines = [r["answer"], "", *format_budget(r)]
    t = r["timings"]
    ttft = f"{t['time_to_first_token_s']:.3f} s (prefill)" if t["time_to_first_token_s"] is not None else None
    rate = f"{t['decode_tokens_per_s']:.1f} tokens/s" if t["decode_tokens_per_s"] is not None else None
    lines += ["", f"timings: {r['model']} ({r['dtype']}, {r['device']})"]
    lines += ["  " + s for s in text_table(["", ""], [
        ["model load", f"{t['model_load_s']:.3f} s"],
        ["preprocessing", f"{t['preprocess_s']:.3f} s"],
        ["first token", ttft],
        ["decode", rate],
        ["new tokens", f"{r['new_tokens']} ({r['finish_reason']})"],
    ], set())[1:]]
    return "\n".join(lines)


# -------------------------------------------------------------------------------------- plumbing
@dataclass(frozen=True)
class Command:
    help: str
    add_arguments: Callable[[argparse.ArgumentParser], None]
    run: Callable[[argparse.Namespace], int]


COMMANDS: dict[str, Command] = {
    "infer": Command("answer a prompt about images and videos with a checkpoint", _infer_arguments, run_infer),
    "inspect": Command(inspection.HELP, inspection.add_arguments, inspection.run),
    "serve": Command(serve_cli.HELP, serve_cli.add_arguments, serve_cli.run),
    "quantize": Command(quant_cli.HELP, quant_cli.add_arguments, quant_cli.run),
    "convert": Command(convert.HELP, convert.add_arguments, convert.run),
    "train": Command("train or fine-tune NVILA from a recipe YAML", train_cli.add_arguments, train_cli.run),
    "finetune": Command("PEFT fine-tuning: LoRA on the LLM, LayerNorm-only ViT, full projector",
                        functools.partial(train_cli.add_arguments, finetune=True), train_cli.run),
    "eval": Command(eval_cli.HELP, eval_cli.add_arguments, eval_cli.run),
    "prune": Command(prune_cli.HELP, prune_cli.add_arguments, prune_cli.run),
}


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="nvila", description="NVILA vision-language models: run and inspect checkpoints.",
                     epilog="Exit codes: 0 success, 2 bad input (one 'nvila: error:' line on stderr), 130 interrupted.")
    parser.add_argument("--version", action="version", version=f"nvila {__version__}")
    parser.add_argument("-v", "--verbose", action="count", default=0, help="log more to stderr (-v info, -vv debug)")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, cmd in COMMANDS.items():
        p = sub.add_parser(name, help=cmd.help, description=cmd.help[:1].upper() + cmd.help[1:] + ".")
        p.add_argument("-v", "--verbose", action="count", default=argparse.SUPPRESS,
                       help="log more to stderr (-v info, -vv debug)")
        cmd.add_arguments(p)
        p.set_defaults(run=cmd.run)
    return parser


@contextlib.contextmanager
def _logging(verbose: int) -> Iterator[logging.handlers.MemoryHandler | None]:
    """Route the ``nvila`` loggers to the current stderr for one command; restore them afterwards.

    With ``-v``/``-vv`` records are written as they come. At the default verbosity (warnings) they
    are held in the yielded handler and written when the command ends, unless the caller clears it
    on bad input, so that an error is reported in exactly one line.
    """
    log = logging.getLogger("nvila")
    saved = log.level, log.propagate
    stream = logging.StreamHandler(sys.stderr)
    stream.setFormatter(logging.Formatter("nvila: %(levelname)s: %(message)s"))
    held = None
    if not verbose:
        held = logging.handlers.MemoryHandler(10_000, flushLevel=logging.CRITICAL + 1, target=stream,
                                              flushOnClose=False)
    handler = held or stream
    log.addHandler(handler)
    log.setLevel(logging.DEBUG if verbose >= 2 else logging.INFO if verbose == 1 else logging.WARNING)
    log.propagate = False
    try:
        yield held
    finally:
        if held is not None:
            held.flush()
        log.removeHandler(handler)
        log.setLevel(saved[0])
        log.propagate = saved[1]


def _write(text: str) -> None:
    sys.stdout.write(text + "\n")
    sys.stdout.flush()


def _fail(message: str) -> int:
    sys.stderr.write(f"nvila: error: {' '.join(message.split())}\n")
    return EXIT_BAD_INPUT


def main(argv: list[str] | None = None) -> int:
    """Run the ``nvila`` command line; returns the exit code (see the module docstring)."""
    try:
        try:
            parser = build_parser()
            args, extra = parser.parse_known_args(argv)
            if extra and hasattr(args, "overrides") and all("=" in a and not a.startswith("-") for a in extra):
                args.overrides = [*args.overrides, *extra]  # key=value overrides after flags (nvila train)
            elif extra:
                parser.error(f"unrecognized arguments: {' '.join(extra)}")
        except UsageError as e:
            return _fail(str(e))
        except SystemExit as e:  # --help, --version
            return e.code if isinstance(e.code, int) else 0
        with _logging(args.verbose) as held:
            try:
                if getattr(args, "model", "") is None:  # infer, serve, eval: --model defaults to the bundled model
                    args.model = str(default_model_path())
                return args.run(args)
            except BAD_INPUT as e:
                if held is not None:
                    held.buffer.clear()  # the error line is the whole report
                logger.debug("bad input", exc_info=True)
                return _fail(str(e) or type(e).__name__)
    except KeyboardInterrupt:
        sys.stderr.write("nvila: interrupted\n")
        return EXIT_INTERRUPTED

