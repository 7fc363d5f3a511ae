"""Building blocks of the SynthVILA recipe (recipes/synthvila/train.py) and its ablations.

The recipe trains the bundled small NVILA from random init on SynthVILA data with our own trainer:
stage 0 (dense vision pre-training, ``stage0.py``, and text-only LLM pre-training on the answer
language), then NVILA's stages 1-5. These helpers write the data, the mixtures and the initial
checkpoint, mean-centre a projector's output, run one trainer stage from a recipe YAML and copy a
training checkpoint's published layout into a bundle directory. Held-out splits come from
``nvila.data.synthetic.generate_eval_splits``.

Contract: every path is explicit; nothing here chooses step counts or learning rates (the recipe
script and the ablation benchmark do).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np

logger = logging.getLogger(__name__)

PUBLISHED = ("config.json", "llm", "vision_tower", "mm_projector")


def make_data(out_dir: str | os.PathLike, sizes: dict[str, int], *, preset: str = "small", seed: int = 1,
              variants: dict[str, tuple[str, dict]] | None = None) -> Path:
    """Generate train splits (family -> samples) and the text-only corpus under ``out_dir``.

    Each family gets its own seed (``seed + index``), so the image families do not repeat one
    another's images. ``variants`` adds splits ``name -> (family, size options over the preset)``
    of ``sizes[name]`` samples each (curriculum data: ``out_dir/<name>.jsonl``), from the family's
    seed. A ``done.json`` marker with the arguments and the preset's size options makes a repeated
    call a no-op, and a changed preset regenerate the data.
    """
    from nvila.data.synthetic import FAMILIES, generate, preset_options

    out = Path(out_dir)
    marker = out / "done.json"
    variants = variants or {}
    specs = {name: variants.get(name, (name, {})) for name in sizes}  # split -> (family, extra options)
    options = {name: preset_options(family, preset) for name, (family, _) in specs.items()}
    want = json.loads(json.dumps({"sizes": sizes, "preset": preset, "options": options, "seed": seed,
                                  "variants": variants}))
    if marker.is_file() and json.loads(marker.read_text()) == want:
        return out
    out.mkdir(parents=True, exist_ok=True)
    names = list(FAMILIES)
    for name, n in sizes.items():
        family, extra = specs[name]
        generate(family, n, out, seed + names.index(family), split=name, **{**options[name], **extra})
    write_text_corpus(out / "text.jsonl", n=4000, seed=seed)
    marker.write_text(json.dumps(want))
    return out


def write_text_corpus(path: Path, n: int, seed: int) -> Path:
    """Text-only QA records for stage 0a: every family's question with a random answer of its
    vocabulary (codes: random digit strings). Teaches the LLM the answer language, not the answers."""
    from nvila.data.synthetic import ANSWER_VOCAB, FAMILIES, QUESTIONS

    rng = np.random.default_rng([seed, 7])
    names = [name for name in FAMILIES if name in ANSWER_VOCAB]  # not the localization family's timestamps
    with path.open("w", encoding="utf-8") as f:
        for i in range(n):
            name = names[i % len(names)]
            vocab = ANSWER_VOCAB[name]
            if name == "fine_code":
                answer = "".join(rng.choice(vocab, size=3).tolist())
            elif name == "video_order":
                answer = " ".join(rng.choice(vocab, size=3, replace=False).tolist())
            else:
                answer = str(vocab[int(rng.integers(len(vocab)))])
            f.write(json.dumps({"id": f"text-{i}", "conversations": [
                {"from": "human", "value": QUESTIONS[name]}, {"from": "gpt", "value": answer}]}) + "\n")
    return path


def write_mixture(path: Path, data_dir: Path, weights: dict[str, int]) -> Path:
    """A trainer mixture YAML over ``data_dir/<name>.jsonl`` files, ``weights`` = repeat counts."""
    import yaml

    datasets = [{"name": name, "path": str((data_dir / f"{name}.jsonl").resolve()),
                 "media_root": str(data_dir.resolve()), "repeat": int(rep)} for name, rep in weights.items() if rep]
    path.write_text(yaml.safe_dump({"datasets": datasets}, sort_keys=False), encoding="utf-8")
    return path


def init_checkpoint(out_dir: str | os.PathLike, *, seed: int = 0, base: str | os.PathLike | None = None,
                    **config_options) -> Path:
    """A SynthVILA checkpoint of ``nvila.tiny.synthvila_config(**config_options)`` in the published
    layout, randomly initialised from ``seed``.

    Without ``base`` it has the synthetic-language tokenizer. With ``base`` (a SynthVILA checkpoint)
    it takes the base's tokenizer, vision tower and LLM, and keeps only its projector fresh: the
    start of every ablation variant, whose projector width depends on the variant.
    """
    import torch

    from nvila.checkpoint import CHAT_TEMPLATES, load_tokenizer, save_pretrained, token_ids
    from nvila.data.synthetic import build_synth_tokenizer
    from nvila.model import NVILAForConditionalGeneration
    from nvila.tiny import synthvila_config

    tok = build_synth_tokenizer() if base is None else load_tokenizer(Path(base) / "llm")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = NVILAForConditionalGeneration(synthvila_config(len(tok), **config_options),
                                              token_ids(tok, CHAT_TEMPLATES["qwen2"]))
    if base is not None:
        shared = NVILAForConditionalGeneration.from_pretrained(base)
        model.vision_tower.load_state_dict(shared.vision_tower.state_dict())
        model.llm.load_state_dict(shared.llm.state_dict())
    weights = "random" if base is None else "random projector; vision tower and LLM from a base checkpoint"
    return save_pretrained(model, tok, out_dir, metadata={"nvila_weights": weights})


def centre_projector(start: str | os.PathLike, out_dir: str | os.PathLike, data_dir: str | os.PathLike, *,
                     images: int = 64) -> Path:
    """Copy checkpoint ``start`` to ``out_dir`` with its projector's output mean-centred.

    The visual tokens of the small model share one large common component (measured on the v1
    recipe: a mean token of norm 58-70 against 9-12 of per-token variation, text embeddings 0.33),
    so after the LLM's RMSNorm every visual token looks alike. A 4x-pooled video flash then
    stayed at chance for 150 steps of its family alone, and was learned in ~60 steps once
    centred. The bias of the projector's last Linear absorbs minus the mean visual token over the
    first ``images`` images of ``data_dir/coarse_colour.jsonl``; no other weight changes. Training
    regrows the offset (0.8 -> 22 in 150 steps), so the recipe centres before every stage that
    trains the LLM.
    """
    import torch

    from nvila.checkpoint import load_tokenizer, save_pretrained
    from nvila.model import NVILAForConditionalGeneration
    from nvila.processor import NVILAProcessor

    data = Path(data_dir)
    records = [json.loads(line) for line in (data / "coarse_colour.jsonl").read_text().splitlines()[:images]]
    if not records:
        raise ValueError(f"{data / 'coarse_colour.jsonl'}: no images to centre the projector on")
    model = NVILAForConditionalGeneration.from_pretrained(start).eval()
    processor = NVILAProcessor.from_pretrained(start)
    tokens = []
    with torch.no_grad():
        for rec in records:
            conv = [{"role": "user", "content": [{"type": "image", "image": str(data / rec["image"])}]}]
            inputs, _ = processor.prepare([conv])
            tokens.append(model.encode_images(inputs["pixel_values"], inputs["image_block_sizes"]))  # (T, D)
        mean = torch.cat(tokens).mean(0)
        last = [m for m in model.mm_projector.modules() if isinstance(m, torch.nn.Linear)][-1]
        last.bias.sub_(mean.to(last.bias.dtype))
    logger.info("centred the projector of %s: mean visual token norm %.2f removed", start, float(mean.norm()))
    return save_pretrained(model, load_tokenizer(Path(start) / "llm"), out_dir,
                           metadata={"nvila_weights": "trained; projector output mean-centred"})


@dataclass
class Stage:
    """One trainer stage: a recipe YAML and what the recipe script fills in. ``centre``: start from
    a mean-centred copy of the start checkpoint (``centre_projector``), for stages that train the LLM."""

    name: str
    recipe: Path
    mixture: dict[str, int]
    steps: int
    batch: int = 16
    centre: bool = False


def run_stage(stage: Stage, start: Path, out_dir: Path, data_dir: Path, *, threads: int | None = None,
              seed: int = 0, progress: bool = True, overrides: list[str] = ()) -> Path:
    """Train one stage from ``start`` into ``out_dir``; returns the final checkpoint directory.

    A stage whose ``out_dir/final`` exists is skipped (the recipe can be re-run after a stop). A
    ``stage.centre`` stage trains from ``out_dir/centred``, the start with its projector mean-centred.
    """
    from .config import load_config
    from .trainer import train

    final = out_dir / "final"
    if (final / "config.json").is_file():
        logger.info("stage %s: already done (%s)", stage.name, final)
        return final
    out_dir.mkdir(parents=True, exist_ok=True)
    if stage.centre:
        start = centre_projector(start, out_dir / "centred", data_dir)
    mixture = write_mixture(out_dir / "mixture.yaml", data_dir, stage.mixture)
    cfg = load_config(stage.recipe, [
        f"model.path={start}", f"data.mixture={mixture}", f"run.output_dir={out_dir}", f"run.seed={seed}",
        f"optim.max_steps={stage.steps}", f"optim.global_batch_size={stage.batch}",
        f"run.save_every={stage.steps}", "run.keep_last=1", f"run.progress={str(progress).lower()}",
        *([f"run.threads={threads}"] if threads else []), *overrides])
    last = train(cfg)
    bundle(last, final)
    shutil.copy(out_dir / "metrics.jsonl", final / "metrics.jsonl")
    return final


def bundle(checkpoint: Path, dest: Path) -> Path:
    """Copy the published layout of a training checkpoint (no trainer state) to ``dest``."""
    tmp = dest.parent / f".tmp-{dest.name}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    for name in PUBLISHED:
        src = checkpoint / name
        (shutil.copytree if src.is_dir() else shutil.copy)(src, tmp / name)
    shutil.rmtree(dest, ignore_errors=True)
    tmp.rename(dest)
    return dest

