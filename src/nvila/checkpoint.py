"""NVILA checkpoints <-> our modules: hub ids, safetensors files, key maps, strict loading, the tokenizer.

Module keys per component (the vila layout stores them as they are, one directory per component;
the hf layout prefixes them with the component name; see ``nvila.layouts``, which tells the two
apart and reads their configs)::

    llm            Qwen2 weights ("model.*", "lm_head.weight") + tokenizer files
    vision_tower   SigLIP weights, keys "vision_model.*"
    mm_projector   projector weights, keys "layers.<i>.weight|bias"

This module owns: resolving a Hugging Face Hub id into its cached snapshot (``resolve_checkpoint``),
checking a directory (``check_layout``), finding the safetensors files of a directory (single file
or sharded index), one key map per component,
strict key checking (missing and unexpected keys are errors), the vocabulary resize of spec §2.2,
and the tokenizer with its run-time additions (spec §3.1). Pickle files are never loaded (nor
fetched). It does not know how the modules compute anything.
"""

from __future__ import annotations

import json
import logging
import os
import re
from pathlib import Path

import torch
from torch import nn

from .config import TokenIds
from .llm import fit_vocab_rows

logger = logging.getLogger(__name__)

COMPONENTS = ("llm", "vision_tower", "mm_projector")
SENTINEL = "<vila/sentinel>"
MEDIA_TOKENS = {"image": "<image>", "video": "<vila/video>"}


class CheckpointError(ValueError):
    """A checkpoint directory is in no known layout (``nvila.layouts``), or its weights do not fit."""


# -------------------------------------------------------------------------------------- hub ids
# A checkpoint argument that is not an existing local path is a Hugging Face Hub model id when it
# reads ORG/NAME or ORG/NAME@REVISION: exactly one "/" before the "@", ORG and NAME of letters,
# digits, "_", "-" and "." starting with a letter or digit (so "./x", "../x", "/x", "~/x" and
# "a/b/c" stay paths), and a revision (branch, tag or commit) without whitespace after the first
# "@". The Hub's own id rules (length, no "--" or "..") are checked by huggingface_hub.
HUB_ID = re.compile(r"(?P<repo>[A-Za-z0-9][A-Za-z0-9_.-]*/[A-Za-z0-9][A-Za-z0-9_.-]*)(?:@(?P<revision>\S+))?")


def hub_patterns(weights: bool = True) -> list[str]:
    """The files fetched for a Hub id, in either layout (``nvila.layouts``): JSON configs and tokenizer
    files (``tokenizer.json``, ``vocab.json``, ``tokenizer_config.json``, ``special_tokens_map.json``,
    ``added_tokens.json``, ``merges.txt``) and chat templates (``*.jinja``) at the root and in each
    component directory and, with ``weights``, the safetensors. Never code (``*.py``) or pickles
    (``*.bin``, ``*.pt``)."""
    kinds = ["*.json", "*.txt", "*.jinja", *(["*.safetensors"] if weights else [])]
    return [*kinds, *(f"{c}/{k}" for c in COMPONENTS for k in kinds)]


def resolve_checkpoint(path_or_id: str | os.PathLike, *, weights: bool = True,
                       local_files_only: bool = False) -> Path:
    """A local checkpoint path, or the snapshot of a Hub id in the Hugging Face cache.

    An existing local path always wins; anything else of the ``HUB_ID`` shape is fetched with
    ``huggingface_hub.snapshot_download`` (an optional dependency, ``pip install 'nvila[hub]'``)
    into its cache (``HF_HOME`` / ``HF_HUB_CACHE``), files of ``hub_patterns(weights)`` only.

    Args:
        path_or_id: a checkpoint directory, a ``config.json``, or ``ORG/NAME[@REVISION]``.
        weights: also fetch the safetensors (False: configs and tokenizer only, enough for
            ``NVILAConfig`` and ``nvila inspect``).
        local_files_only: use the cache only, never the network; ``HF_HUB_OFFLINE=1`` does the same.
    Returns:
        The path as given when it exists or is not a Hub id (``check_layout`` reports a missing
        one), else the snapshot directory.
    Raises:
        CheckpointError: in one line: huggingface_hub is not installed; the id is not cached while
            downloads are off; the Hub cannot be reached; the repository or revision does not exist.
    """
    text = os.fspath(path_or_id)
    match = None if Path(text).exists() else HUB_ID.fullmatch(text)
    if match is None:
        return Path(text)
    try:
        import huggingface_hub
        from huggingface_hub import constants, errors
    except ImportError:
        raise CheckpointError(f"{text}: no such local directory; to fetch it from the Hugging Face Hub, install "
                              f"huggingface_hub (pip install 'nvila[hub]')") from None
    repo, revision = match["repo"], match["revision"]
    offline = "local_files_only" if local_files_only else "HF_HUB_OFFLINE=1" if constants.HF_HUB_OFFLINE else None
    cache = constants.HF_HUB_CACHE
    try:
        snapshot = huggingface_hub.snapshot_download(repo, revision=revision, allow_patterns=hub_patterns(weights),
                                                     local_files_only=local_files_only)
    except errors.RevisionNotFoundError:
        raise CheckpointError(f"{text}: the Hugging Face Hub repository {repo} has no revision {revision!r}") from None
    except errors.GatedRepoError:
        raise CheckpointError(f"{text}: the Hugging Face Hub repository {repo} is gated: accept its terms on the "
                              f"Hub, then log in (hf auth login, or set HF_TOKEN)") from None
    except errors.RepositoryNotFoundError:
        raise CheckpointError(f"{text}: no such local directory, and no model repository {repo} on the Hugging "
                              f"Face Hub (a private one needs a login: hf auth login, or set HF_TOKEN)") from None
    except errors.IncompleteSnapshotError:
        why = f"downloads are off ({offline})" if offline else f"the Hub ({constants.ENDPOINT}) could not be reached"
        raise CheckpointError(f"{text}: its snapshot in the Hugging Face cache ({cache}) is incomplete and {why}; "
                              f"download it again online") from None
    except errors.LocalEntryNotFoundError as e:
        if offline:
            raise CheckpointError(f"{text}: no such local directory, and not in the Hugging Face cache ({cache}) "
                                  f"while downloads are off ({offline}); download it once online") from None
        cause = f" ({type(e.__cause__).__name__}: {e.__cause__})" if e.__cause__ else ""
        raise CheckpointError(f"{text}: no such local directory, and the Hugging Face Hub ({constants.ENDPOINT}) "
                              f"could not be reached{cause}; it is not in the cache ({cache})") from None
    except errors.HfHubHTTPError as e:
        raise CheckpointError(f"{text}: the Hugging Face Hub refused the download ({str(e).splitlines()[0]})") from None
    except errors.HFValidationError as e:
        raise CheckpointError(f"{text}: no such local directory, and not a valid Hugging Face Hub id ({e})") from None
    logger.info("%s: using the Hugging Face snapshot %s", text, snapshot)
    return Path(snapshot)


# ---------------------------------------------------------------------------------------- layout
def check_layout(path: str | os.PathLike, *, weights: bool = True, local_files_only: bool = False) -> Path:
    """Return the checkpoint root, or raise ``CheckpointError`` naming what is missing.

    ``path`` may be a Hub id: it is resolved first (``resolve_checkpoint``, with the safetensors
    unless ``weights`` is False) and the snapshot directory is returned, so callers resolve once and
    pass the returned path on.
    """
    from .layouts import detect, known_layouts  # layouts.py imports this module

    root = resolve_checkpoint(path, weights=weights, local_files_only=local_files_only)
    name = str(root) if root == Path(path) else f"{os.fspath(path)} ({root})"
    if not root.exists():
        raise CheckpointError(f"{name}: no such checkpoint directory")
    if not root.is_dir():
        raise CheckpointError(f"{name}: not a directory (expected a checkpoint; known layouts: {known_layouts()})")
    if not (root / "config.json").is_file():
        raise CheckpointError(f"{name}: not an NVILA checkpoint (no config.json); known layouts: {known_layouts()}")
    detect(root).check(root, name, weights)
    return root


def safetensors_files(component_dir: Path) -> list[Path]:
    """The safetensors files of one component: a sharded index if present, else ``*.safetensors``."""
    index = component_dir / "model.safetensors.index.json"
    if index.is_file():
        with open(index, encoding="utf-8") as f:
            weight_map = json.load(f).get("weight_map", {})
        files = sorted({component_dir / name for name in weight_map.values()})
    else:
        files = sorted(component_dir.glob("*.safetensors"))
    if not files:
        pickled = sorted(p.name for p in component_dir.glob("*") if p.suffix in (".bin", ".pt", ".pth", ".ckpt"))
        hint = f" (found {', '.join(pickled)}: pickle files are not loaded; convert them to safetensors)" if pickled else ""
        raise CheckpointError(f"{component_dir}: no safetensors weights{hint}")
    for f in files:
        if not f.is_file():
            raise CheckpointError(f"{f}: listed in the shard index but missing")
    return files


# -------------------------------------------------------------------------------------- key maps
# One map per component: (published prefix, module prefix) pairs, first match wins. The published
# layouts use transformers' own names (Qwen2ForCausalLM, SiglipVisionModel) and the projector's
# nn.Sequential indices, so every map is the identity today; a renamed layout adds pairs here.
KEY_MAPS: dict[str, list[tuple[str, str]]] = {
    "llm": [("", "")],
    "vision_tower": [("", "")],
    "mm_projector": [("", "")],
}


def map_key(name: str, key: str, *, to_published: bool = False) -> str:
    """Rename one key of component ``name`` (published -> module, or back with ``to_published``)."""
    for published, ours in KEY_MAPS[name]:
        src, dst = (ours, published) if to_published else (published, ours)
        if key.startswith(src):
            return dst + key[len(src):]
    raise CheckpointError(f"{name}: key {key!r} matches no entry of the key map")


def load_component(module: nn.Module, name: str, state: dict[str, torch.Tensor],
                   *, tied: tuple[str, ...] = ()) -> None:
    """Copy ``state`` (published keys) into ``module`` through the component's key map.

    Args:
        module: the materialised component (parameters allocated, any dtype/device).
        name: component name, a key of ``KEY_MAPS``.
        state: published tensors.
        tied: module keys that alias another parameter and may be absent from (or duplicated in) the file.

    Raises:
        CheckpointError: on missing or unexpected keys, or on a shape mismatch.
    """
    mapped = {map_key(name, k): v for k, v in state.items()}
    expected = set(module.state_dict())
    missing = sorted(expected - set(mapped) - set(tied))
    unexpected = sorted(set(mapped) - expected)
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"missing keys {_few(missing)}")
        if unexpected:
            parts.append(f"unexpected keys {_few(unexpected)}")
        raise CheckpointError(f"{name}: weights do not match the model ({'; '.join(parts)})")
    own = module.state_dict()
    for key, value in mapped.items():
        if tuple(value.shape) != tuple(own[key].shape):
            raise CheckpointError(f"{name}: {key} has shape {tuple(value.shape)} in the checkpoint, "
                                  f"the model expects {tuple(own[key].shape)}")
    for key in tied:
        mapped.pop(key, None)
    with torch.no_grad():
        module.load_state_dict(mapped, strict=False)


def _few(keys: list[str], n: int = 5) -> str:
    more = f" (+{len(keys) - n} more)" if len(keys) > n else ""
    return ", ".join(keys[:n]) + more


def load_llm_state(llm: nn.Module, state: dict[str, torch.Tensor], vocab_size: int, tied: bool) -> None:
    """Load the LLM, resizing the vocabulary rows to ``vocab_size`` as the reference does (spec §2.2)."""
    for key in ("model.embed_tokens.weight", "lm_head.weight"):
        if key in state and state[key].shape[0] != vocab_size:
            logger.info("resizing %s from %d to %d rows (new rows = mean of the old ones)",
                        key, state[key].shape[0], vocab_size)
            state[key] = fit_vocab_rows(state[key], vocab_size)
    load_component(llm, "llm", state, tied=("lm_head.weight",) if tied else ())


# ------------------------------------------------------------------------------------- tokenizer
# VILA's "qwen2" chat template (rendering described in spec §3.2): a default system line without a
# final period unless the first message is a system message; messages with content None are skipped.
CHAT_TEMPLATES = {
    "qwen2": (
        "{% if messages[0]['role'] != 'system' %}"
        "{{ '<|im_start|>system\\nYou are a helpful assistant<|im_end|>\\n' }}"
        "{% endif %}"
        "{% for message in messages if message['content'] is not none %}"
        "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
        "{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
    ),
}



def resolve_chat_template(config, tok) -> str:
    """The template the reference uses: ``config.chat_template`` by name if set, else the tokenizer's."""
    if config.chat_template is not None:
        if config.chat_template not in CHAT_TEMPLATES:
            raise CheckpointError(f"unknown chat_template {config.chat_template!r}; valid: {sorted(CHAT_TEMPLATES)}")
        return CHAT_TEMPLATES[config.chat_template]
    if not tok.chat_template:
        logger.warning("the tokenizer has no chat template; using VILA's qwen2 template")
    return tok.chat_template or CHAT_TEMPLATES["qwen2"]


def load_tokenizer(llm_dir: str | os.PathLike):
    """transformers' fast tokenizer of ``llm_dir`` (``llm/``, or an hf root) with NVILA's run-time additions.

    The directory's ``config.json`` is not consulted (an hf root's names model_type ``nvila``, which
    transformers does not know): the class is the one ``tokenizer_config.json`` names, else Qwen2's.

    Additions in the reference order (spec §3.1): ``<vila/sentinel>``, then ``<image>``, then
    ``<vila/video>``, each added as a special token only if absent. Stop tokens are the token that
    follows an assistant turn in the chat template, plus ``eos_token``.

    Returns:
        the tokenizer (``token_ids`` derives its ids).
    """
    from transformers import AutoTokenizer, Qwen2Config

    llm_dir = Path(llm_dir)
    try:
        tok = AutoTokenizer.from_pretrained(os.fspath(llm_dir), config=Qwen2Config(), padding_side="right",
                                            use_fast=True)
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{llm_dir}: cannot load the tokenizer ({e})") from None
    for token in (SENTINEL, *MEDIA_TOKENS.values()):
        if tok.convert_tokens_to_ids(token) in (None, tok.unk_token_id):
            tok.add_tokens([token], special_tokens=True)
    return tok


def token_ids(tok, chat_template: str) -> TokenIds:
    """Derive the special ids NVILA needs from a tokenizer that went through ``load_tokenizer``."""
    stop = {tok.eos_token} if tok.eos_token else set()
    dummy = []
    for i in range(3):
        dummy += [{"role": "user", "content": f"question {i}"}, {"role": "assistant", "content": SENTINEL}]
    text = tok.apply_chat_template(dummy, chat_template=chat_template, tokenize=False)
    for tail in text.split(SENTINEL)[1:]:
        pieces = tok.tokenize(tail)
        if pieces:
            stop.add(pieces[0])
    stop_ids = sorted(tok.convert_tokens_to_ids(t) for t in stop)
    newline = tok("\n", add_special_tokens=False).input_ids
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.convert_tokens_to_ids("<|endoftext|>")
    return TokenIds(
        image=tok.convert_tokens_to_ids(MEDIA_TOKENS["image"]),
        video=tok.convert_tokens_to_ids(MEDIA_TOKENS["video"]),
        pad=pad,
        stop=tuple(stop_ids),
        newline=tuple(newline),
        vocab_size=len(tok),
    )




# ---------------------------------------------------------------------------------------- saving
def write_json(path: Path, obj: dict) -> None:
    """``obj`` as indented JSON with sorted keys and a final newline."""
    with open(path, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=2, sort_keys=True)
        f.write("\n")


def save_pretrained(model: nn.Module, tokenizer, out_dir: str | os.PathLike, *,
                    metadata: dict[str, str] | None = None,
                    component_metadata: dict[str, dict[str, str]] | None = None) -> Path:
    """Write ``model`` (an ``NVILAForConditionalGeneration``) and its tokenizer in the vila layout.

    The directory appears atomically: everything is written to a sibling temporary directory which
    is then renamed over ``out_dir`` (an existing ``out_dir`` is replaced).

    Args:
        model: the model; its ``config`` provides every JSON file.
        tokenizer: the tokenizer to store in ``llm/`` (with the chat template).
        out_dir: destination.
        metadata: extra safetensors ``__metadata__`` for every weight file.
        component_metadata: extra ``__metadata__`` per component name (e.g. the quantization
            format of ``nvila.quant.format``), added to ``metadata`` for that component's file.
    Returns:
        The checkpoint path.
    """
    states = ((name, getattr(model, name).state_dict()) for name in COMPONENTS)
    return save_published(model.config, tokenizer, out_dir, states, metadata=metadata,
                          component_metadata=component_metadata)


def save_published(config, tokenizer, out_dir: str | os.PathLike, states, *,
                   metadata: dict[str, str] | None = None,
                   component_metadata: dict[str, dict[str, str]] | None = None) -> Path:
    """``save_pretrained`` from component state dicts produced one at a time (a streamed export).

    Args:
        config: the ``NVILAConfig`` that provides every JSON file.
        states: an iterable of (component name, {module key: tensor}) covering ``COMPONENTS``; it is
            consumed lazily, so at most one component's tensors need to exist at once.
        Other arguments as in ``save_pretrained``.
    """
    import shutil
    import tempfile

    from safetensors.torch import save_file

    out = Path(out_dir)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        files = config.to_published()
        write_json(tmp / "config.json", files["config.json"])
        tied = config.llm.tie_word_embeddings
        written = []
        for name, component in states:
            (tmp / name).mkdir()
            write_json(tmp / name / "config.json", files[name])
            state = {map_key(name, k, to_published=True): v.detach().to("cpu").contiguous()
                     for k, v in component.items() if not (name == "llm" and tied and k == "lm_head.weight")}
            del component
            meta = {"format": "pt", **(metadata or {}), **(component_metadata or {}).get(name, {})}
            save_file(state, tmp / name / "model.safetensors", metadata=meta)
            written.append(name)
        if sorted(written) != sorted(COMPONENTS):
            raise CheckpointError(f"save_published got components {written}, expected {list(COMPONENTS)}")
        write_json(tmp / "vision_tower" / "preprocessor_config.json", files["preprocessor"])
        tokenizer.save_pretrained(os.fspath(tmp / "llm"))
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out
