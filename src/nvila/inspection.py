"""``nvila inspect``: a checkpoint's or config's dimensions, parameter counts and token budget.

Reads configs and the tokenizer only (parameters are counted on the meta device), so it works on a
Hub id without downloading weights. ``run`` returns 0 and writes one report to stdout (human text, or
one JSON object with ``--json``); bad input raises the errors ``nvila.cli`` reports in one line.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from . import tiling
from .argtypes import HUB_HELP, image_size, int_at_least, text_table
from .checkpoint import check_layout, resolve_chat_template, resolve_checkpoint, token_ids
from .config import NVILAConfig
from .layouts import detect
from .model import NVILAForConditionalGeneration
from .processor import num_image_tokens, num_video_tokens
from .projector import tokens_per_tile
from .temporal import video_layout

HELP = "summarise a checkpoint or config.json: dimensions, parameters, token budget"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("path", metavar="PATH",
                   help="a checkpoint directory (exact vocabulary from its tokenizer), a bare top-level config.json, "
                        f"or {HUB_HELP} (configs and tokenizer only)")
    p.add_argument("--image-size", type=image_size, nargs="+", action="extend", metavar="WxH",
                   help="image sizes for the token budget (default: 1000x700)")
    p.add_argument("--video-frames", type=int_at_least(1), metavar="N",
                   help="frames for the video token budget (default: the config's num_video_frames)")
    p.add_argument("--max-tiles", type=int_at_least(1), metavar="N", help="override the config's max_tiles")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of the human report")


def _family(cfg: NVILAConfig) -> str:
    if cfg.video_encoder.kind == "tsp":
        return "NVILA-Video"
    return {"dynamic_s2": "NVILA", "dynamic": "NVILA-Lite"}.get(cfg.image_aspect_ratio, "NVILA-like")


def _marker_tokens(text: str | None, tok) -> int | None:
    """Tokens of a start/end/separator string; without a tokenizer only the Qwen2 ``"\\n"`` is known."""
    if not text:
        return 0
    if tok is not None:
        return len(tok(text, add_special_tokens=False).input_ids)
    return 1 if text == "\n" else None


def _image_budget(cfg: NVILAConfig, width: int, height: int, tok) -> dict[str, Any]:
    per_medium = num_image_tokens(cfg, width, height, single=True)
    block = None
    tiles = len(per_medium)
    if cfg.is_dynamic_s2:
        block = tiling.dynamic_s2_grid(width, height, cfg.s2_scales, cfg.max_tiles)
        tiles = tiling.dynamic_s2_num_tiles(block, cfg.s2_scales, cfg.vision.image_size)
    elif cfg.image_aspect_ratio == "dynamic":
        block = tiling.dynamic_grid(width, height, cfg.min_tiles, cfg.max_tiles, cfg.vision.image_size)
    start, end = (_marker_tokens(s, tok) for s in (cfg.image_encoder.start_tokens, cfg.image_encoder.end_tokens))
    marks = None if start is None or end is None else (start + end) * len(per_medium)
    visual = sum(per_medium)
    return {"width": width, "height": height, "tiles": tiles, "block_size": list(block) if block else None,
            "media": len(per_medium), "visual_tokens": visual, "tokens": None if marks is None else visual + marks}


def _video_budget(cfg: NVILAConfig, frames: int, tok) -> dict[str, Any]:
    visual = num_video_tokens(cfg, frames)  # raises ValueError if TSP pools do not divide the frames
    layout = video_layout(frames, tokens_per_tile(cfg.projector_type, cfg.vision.grid), cfg.video_encoder)
    enc = cfg.video_encoder
    start, end, sep = (_marker_tokens(s, tok) for s in (enc.start_tokens, enc.end_tokens, enc.sep_tokens))
    tokens = None
    if None not in (start, end, sep):
        tokens = sum(n * (start + t + end) for n, t in layout) + sep * len(layout)
    return {"frames": frames, "fps": cfg.fps, "pooled_frames": sum(n for n, _ in layout),
            "visual_tokens": visual, "tokens": tokens}


def run(args: argparse.Namespace) -> int:
    path = resolve_checkpoint(args.path, weights=False)
    tok = ids = None
    if path.is_dir():
        check_layout(path, weights=False)
    cfg = NVILAConfig.from_pretrained(path)
    if path.is_dir():
        tok = detect(path).load_tokenizer(path)
        ids = token_ids(tok, resolve_chat_template(cfg, tok))
    if args.max_tiles is not None:
        cfg = cfg.with_overrides(max_tiles=args.max_tiles)
    params = NVILAForConditionalGeneration.on_meta(cfg, ids).num_parameters()
    llm, vis, enc = cfg.llm, cfg.vision, cfg.video_encoder
    report = {
        "path": str(args.path),
        "family": _family(cfg),
        "image_aspect_ratio": cfg.image_aspect_ratio,
        "s2_scales": list(cfg.s2_scales) if cfg.s2_scales else None,
        "max_tiles": cfg.max_tiles,
        "min_tiles": cfg.min_tiles,
        "projector_type": cfg.projector_type,
        "mm_hidden_size": cfg.mm_hidden_size,
        "llm": {"hidden_size": llm.hidden_size, "intermediate_size": llm.intermediate_size,
                "num_hidden_layers": llm.num_hidden_layers, "num_attention_heads": llm.num_attention_heads,
                "num_key_value_heads": llm.num_key_value_heads, "head_dim": llm.head_dim,
                "vocab_size": ids.vocab_size if ids else llm.vocab_size,
                "vocab_source": "tokenizer" if ids else "config",
                "tie_word_embeddings": llm.tie_word_embeddings, "model_max_length": llm.model_max_length},
        "vision": {"hidden_size": vis.hidden_size, "intermediate_size": vis.intermediate_size,
                   "num_hidden_layers": vis.num_hidden_layers, "num_attention_heads": vis.num_attention_heads,
                   "image_size": vis.image_size, "patch_size": vis.patch_size,
                   "select_layer": vis.select_layer, "select_feature": vis.select_feature},
        "video_encoder": {"kind": enc.kind, "pool_sizes": [list(p) for p in enc.pool_sizes]},
        "num_video_frames": cfg.num_video_frames,
        "fps": cfg.fps,
        "parameters": params,
        "images": [_image_budget(cfg, w, h, tok) for w, h in (args.image_size or [(1000, 700)])],
        "video": _video_budget(cfg, args.video_frames or cfg.num_video_frames, tok),
    }
    sys.stdout.write((json.dumps(report) if args.json else _format_inspect(report)) + "\n")
    return 0


def _count(n: int) -> str:
    for unit, scale in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= scale:
            return f"{n / scale:.2f} {unit}"
    return str(n)


def _format_inspect(r: dict[str, Any]) -> str:
    llm, vis, enc = r["llm"], r["vision"], r["video_encoder"]
    images = r["image_aspect_ratio"]
    if r["s2_scales"]:
        images += f", S2 scales {', '.join(map(str, r['s2_scales']))}"
    if r["image_aspect_ratio"] in ("dynamic_s2", "dynamic"):
        images += f", tiles {r['min_tiles']}..{r['max_tiles']}"
    video = enc["kind"] + (f" (pool sizes {', '.join('x'.join(map(str, p)) for p in enc['pool_sizes'])})"
                           if enc["pool_sizes"] else "")
    video += f", {r['num_video_frames']} frames" + (f" at most, at {r['fps']:g} fps" if r["fps"] else "")
    summary = [
        ["images", images],
        ["projector", f"{r['projector_type']}, mm_hidden_size {r['mm_hidden_size']}"],
        ["llm", f"Qwen2, hidden {llm['hidden_size']}, {llm['num_hidden_layers']} layers, "
                f"{llm['num_attention_heads']} heads ({llm['num_key_value_heads']} KV, dim {llm['head_dim']}), "
                f"FFN {llm['intermediate_size']}, vocab {llm['vocab_size']} ({llm['vocab_source']}), "
                f"context {llm['model_max_length']}"],
        ["vision", f"SigLIP, hidden {vis['hidden_size']}, {vis['num_hidden_layers']} layers, "
                   f"{vis['num_attention_heads']} heads, FFN {vis['intermediate_size']}, {vis['image_size']} px "
                   f"tiles, patch {vis['patch_size']}, select layer {vis['select_layer']} ({vis['select_feature']})"],
        ["video", video],
    ]
    lines = [f"{r['path']}: {r['family']}"]
    lines += ["  " + s for s in text_table(["", ""], summary, set())[1:]]
    p = r["parameters"]
    lines += ["parameters"]
    counts = [[k, _count(p[k])] for k in ("vision_tower", "mm_projector", "llm", "total")]
    lines += ["  " + s for s in text_table(["", ""], counts, {1})[1:]]
    lines += ["token budget (one medium alone in its prompt; tokens include start/end tokens)"]
    rows = [[f"image {m['width']}x{m['height']}", m["tiles"], "x".join(map(str, m["block_size"])) if m["block_size"] else None,
             m["visual_tokens"], m["tokens"] if m["tokens"] is not None else "?"] for m in r["images"]]
    v = r["video"]
    pooled = v["frames"] if v["pooled_frames"] == v["frames"] else f"{v['pooled_frames']} pooled"
    rows.append([f"video {v['frames']} frames", pooled, None, v["visual_tokens"],
                 v["tokens"] if v["tokens"] is not None else "?"])
    lines += ["  " + s for s in text_table(["medium", "tiles/frames", "block", "visual tokens", "tokens"], rows, {1, 3, 4})]
    return "\n".join(lines)
