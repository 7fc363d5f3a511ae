"""``nvila convert``: rewrite a checkpoint from one layout of ``nvila.layouts`` into the other.

Contract: every tensor is copied bit for bit (same dtype, shape and bytes; only its key changes,
through the two layouts' key maps), and each safetensors file's ``__metadata__`` travels with its
tensors. Source files are read one at a time, each becoming one output file per target unit (the
hf root, or a vila component directory), so memory stays about the size of the largest source file
(plus the copy safetensors makes while writing it). The configs are translated through
``NVILAConfig`` (``to_published`` / ``to_hf``) and the tokenizer is re-saved with NVILA's media
tokens, so the config's ``image_token_id`` / ``video_token_id`` name real tokens. The output appears
atomically (a staging directory beside it, renamed at the end) and must not exist or be empty.

Quantized checkpoints are refused in both directions: nvila keeps its quantization metadata per
component directory (``nvila.quant.format``), which the hf layout does not have, and SGLang's NVILA
loaders read full-precision tensors only. Nothing in the checkpoint directory is executed.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path

from safetensors.torch import save_file
from tqdm import tqdm

from .checkpoint import CheckpointError, check_layout, resolve_chat_template, token_ids
from .layouts import LAYOUTS, detect, iter_shards, shard_metadata, write_index, write_json
from .quant.format import read_quant_metadata
from .timetokens import ensure_time_tokens

HELP = "convert a checkpoint between the vila and hf layouts (bit-identical tensors)"
GENERATION_CONFIG = "generation_config.json"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the ``nvila convert`` arguments to ``parser``."""
    parser.add_argument("--to", required=True, choices=sorted(LAYOUTS), help="the output layout")
    parser.add_argument("src", help="a checkpoint in the other layout: a directory or a Hugging Face Hub id "
                                    "ORG/NAME[@REVISION]")
    parser.add_argument("out", help="output directory; must not exist or be empty")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")


def run(args: argparse.Namespace) -> int:
    """Run ``nvila convert``; prints one JSON line ``{"out", "layout", "files"}``."""
    out = convert_checkpoint(args.src, args.out, args.to, progress=not args.no_progress)
    files = sorted(str(p.relative_to(out)) for p in out.rglob("*.safetensors"))
    sys.stdout.write(json.dumps({"out": str(out), "layout": args.to, "files": files}) + "\n")
    return 0


def convert_checkpoint(src: str | os.PathLike, out_dir: str | os.PathLike, to: str, *,
                       progress: bool = False) -> Path:
    """Write checkpoint ``src`` into ``out_dir`` in layout ``to``.

    Args:
        src: a checkpoint directory (or Hub id) in a layout other than ``to``.
        out_dir: destination; must not exist, or be an empty directory.
        to: a key of ``nvila.layouts.LAYOUTS`` ("vila" or "hf").
        progress: show a tqdm bar (bytes read) on stderr.
    Returns:
        The output path.
    Raises:
        CheckpointError: an unknown layout, a bad or quantized source, a source already in ``to``,
            or a non-empty output directory.
    """
    if to not in LAYOUTS:
        raise CheckpointError(f"unknown layout {to!r}; valid: {', '.join(LAYOUTS)}")
    out = Path(out_dir)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise CheckpointError(f"{out}: the output directory is not empty")
    root = check_layout(src)
    source, target = detect(root), LAYOUTS[to]
    if source is target:
        raise CheckpointError(f"{root}: already in the {to} layout")
    if read_quant_metadata(root):
        raise CheckpointError(f"{root}: a quantized checkpoint; the {to} layout cannot hold nvila's quantization "
                              f"metadata, so convert the full-precision checkpoint")
    config = source.read_config(root)
    tok = source.load_tokenizer(root)
    ensure_time_tokens(tok, config.num_time_tokens, config.time_token_format)  # as the loaders do
    template = resolve_chat_template(config, tok)
    ids = token_ids(tok, template)

    shards = source.shards(root)
    plan = []  # per source shard: [(output unit, [(source key, target key)])]
    for shard in shards:
        units: dict[str | None, list[tuple[str, str]]] = {}
        for key, (component, module_key) in shard.keys.items():
            units.setdefault(target.unit(component), []).append((key, target.publish_key(component, module_key)))
        plan.append(list(units.items()))
    names = iter(target.file_names([unit for units in plan for unit, _ in units]))

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        target.write_configs(config, ids, tmp)
        weight_maps: dict[Path, dict[str, str]] = {}
        sizes: dict[Path, int] = {}
        bar = tqdm(total=sum(s.path.stat().st_size for s in shards), unit="B", unit_scale=True,
                   desc=f"convert to {to}", disable=not progress)
        for (shard, tensors), units in zip(iter_shards(shards), plan):
            metadata = shard_metadata(shard.path)
            for _, keys in units:
                dest = tmp / next(names)
                dest.parent.mkdir(parents=True, exist_ok=True)
                save_file({new: tensors[old] for old, new in keys}, dest, metadata=metadata)
                weight_maps.setdefault(dest.parent, {}).update({new: dest.name for _, new in keys})
                sizes[dest.parent] = sizes.get(dest.parent, 0) + sum(tensors[old].nbytes for old, _ in keys)
            del tensors
            bar.update(shard.path.stat().st_size)
        bar.close()
        for directory, weight_map in weight_maps.items():
            if target.always_indexed or len(set(weight_map.values())) > 1:
                write_index(directory, weight_map, sizes[directory])
        tok_dir = target.tokenizer_dir(tmp)
        tok_dir.mkdir(exist_ok=True)
        if not tok.chat_template:  # the -hf layout ships chat_template.jinja; write the one in use
            tok.chat_template = template
        tok.save_pretrained(os.fspath(tok_dir))
        generation = source.tokenizer_dir(root) / GENERATION_CONFIG
        if generation.is_file():
            shutil.copyfile(generation, tok_dir / GENERATION_CONFIG)
        else:
            write_json(tok_dir / GENERATION_CONFIG, {"eos_token_id": list(ids.stop), "pad_token_id": ids.pad})
        _publish_permissions(tmp)
        os.replace(tmp, out)  # onto a missing or empty directory
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def _publish_permissions(root: Path) -> None:
    """Give the staged tree the modes of ordinary new files under the umask (the staging directory
    from ``mkdtemp`` and some written files are private to the owner)."""
    umask = os.umask(0)
    os.umask(umask)
    for path in (root, *root.rglob("*")):
        os.chmod(path, (0o777 if path.is_dir() else 0o666) & ~umask)
