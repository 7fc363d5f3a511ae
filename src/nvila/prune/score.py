"""DeltaLoss scoring (spec training.md §3): every record's answer CE under a large and a small model.

``score(x) = CE_small(x) - CE_large(x)`` over the labelled answer tokens of x, with the training
data path's tokenization, label masking and ``max_length`` (``train.data.SampleEncoder``). With
``reduction="mean"`` (default) CE is the per-token mean, with ``"sum"`` the sum. Positive = the
large model is more confident than the small one.

Speed: no gradients, and ``batch_size`` samples per forward pass packed into one row as training
packs them (``train.packing.pack`` + ``use_packed_attention``: per-sample causal attention,
positions restarting at 0), so a sample's CE does not depend on its neighbours. The LM head runs
only on the hidden states that predict a labelled token: for answer-only labels that is a small
fraction of the row, and the (T, V) logits of the whole row are never built. Media are encoded
per sample (see ``packed_ce``).

Resumable: ``ScoresFile`` streams one JSON line per record (flushed per batch) after a header line
holding a fingerprint of the inputs (model paths, config hashes, mixture contents, settings). A
rerun reads what is on disk, refuses a file whose fingerprint differs, and scores only the rest.
Under torchrun, rank r scores records r, r + W, ... of what is left into its own file
(``scores.jsonl`` on rank 0, ``scores.rank{r}.jsonl`` otherwise); ``merge_shards`` folds them into
``scores.jsonl``. Reading de-duplicates by (dataset, index), so a merge cut short is harmless.

This module knows models and samples; choosing what to keep is select.py's business.
"""

from __future__ import annotations

import hashlib
import json
import logging
import sys
from dataclasses import asdict
from pathlib import Path

import torch
import torch.nn.functional as F

from ..train.data import IGNORE_INDEX, BadSample, DatasetSpec, Sample, SampleEncoder, read_records
from ..train.packing import pack, to_device

logger = logging.getLogger(__name__)

SCORES = "scores.jsonl"
REDUCTIONS = ("mean", "sum")


class StaleScores(ValueError):
    """A scores file written for other models, mixture or settings."""


# ---------------------------------------------------------------------------------- fingerprint
def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def checkpoint_hash(root: Path) -> str:
    """sha256 over the checkpoint's ``config.json`` files (root and first-level components)."""
    h = hashlib.sha256()
    for p in sorted([root / "config.json", *root.glob("*/config.json")]):
        if p.is_file():
            h.update(str(p.relative_to(root)).encode() + b"\0" + p.read_bytes())
    return h.hexdigest()[:16]


def fingerprint(large: Path, small: Path, specs: list[DatasetSpec], **settings) -> dict:
    """What the stored CEs depend on: both checkpoints, every data file, and ``settings``."""
    return {
        "large": str(large), "large_config": checkpoint_hash(large),
        "small": str(small), "small_config": checkpoint_hash(small),
        "mixture": [{"name": s.name, "path": str(s.path), "sha256": _sha256(s.path)[:16],
                     "media_root": str(s.media_root)} for s in specs],
        **settings,
    }


# ----------------------------------------------------------------------------------- the file
def _read_lines(path: Path) -> tuple[dict | None, list[dict]]:
    """(header, rows) of one scores file; a torn last line (a killed writer) is ignored."""
    header, rows = None, []
    with open(path, encoding="utf-8") as f:
        for line in f:
            if not line.endswith("\n"):
                break  # the write a kill interrupted
            obj = json.loads(line)
            if header is None:
                header = obj.get("fingerprint")
                continue
            rows.append(obj)
    return header, rows


def read_scores(out_dir: Path, expected: dict | None = None) -> dict[tuple[str, int], dict]:
    """Every row in ``out_dir``'s scores files, keyed by (dataset, index), first occurrence wins.

    Raises:
        StaleScores: a file's fingerprint differs from ``expected``.
    """
    rows: dict[tuple[str, int], dict] = {}
    for path in sorted(out_dir.glob("scores*.jsonl")):
        header, lines = _read_lines(path)
        if expected is not None and header is not None and header != expected:
            diff = sorted(k for k in set(header) | set(expected) if header.get(k) != expected.get(k))
            raise StaleScores(f"{path} was written for other inputs (differs in: {', '.join(diff)}); "
                              f"use another --out or delete it")
        for r in lines:
            rows.setdefault((r["dataset"], r["index"]), r)
    return rows


class ScoresFile:
    """An append-only scores file: a header line with the fingerprint, then one row per record."""

    def __init__(self, path: Path, fp: dict):
        self.path = path
        fresh = not path.exists() or path.stat().st_size == 0
        if not fresh:
            self._trim_torn_tail()
        self.f = open(path, "a", encoding="utf-8")
        if fresh:
            self.f.write(json.dumps({"fingerprint": fp}) + "\n")
            self.f.flush()

    def _trim_torn_tail(self) -> None:
        data = self.path.read_bytes()
        cut = data.rfind(b"\n") + 1
        if cut != len(data):
            with open(self.path, "r+b") as f:
                f.truncate(cut)

    def write(self, rows: list[dict]) -> None:
        self.f.write("".join(json.dumps(r) + "\n" for r in rows))
        self.f.flush()

    def close(self) -> None:
        self.f.close()


def merge_shards(out_dir: Path) -> None:
    """Append the other ranks' rows to ``scores.jsonl`` and remove their files (rank 0, after a barrier)."""
    main = out_dir / SCORES
    have = {(r["dataset"], r["index"]) for r in _read_lines(main)[1]} if main.exists() else set()
    shards = sorted(out_dir.glob("scores.rank*.jsonl"))
    with open(main, "a", encoding="utf-8") as f:
        for path in shards:
            f.write("".join(json.dumps(r) + "\n" for r in _read_lines(path)[1]
                            if (r["dataset"], r["index"]) not in have))
    for path in shards:
        path.unlink()


# --------------------------------------------------------------------------------------- forward
@torch.inference_mode()
def packed_ce(model, samples: list[Sample], *, embeddings: bool = False) -> tuple[torch.Tensor, torch.Tensor,
                                                                                   torch.Tensor | None]:
    """Per-sample answer CE of ``samples`` packed into one row (the model's LLM uses packed attention).

    Returns:
        ce_sum (B,) float64: summed CE over each sample's labelled targets;
        tokens (B,) long: their count;
        embedding (B, H) float32 or None: the mean final hidden state over each sample's tokens.
    """
    lengths = [s.input_ids.numel() for s in samples]
    batch = to_device({k: v for k, v in pack(samples).items() if k in ("input_ids", "labels", "position_ids",
                                                                      "attention_mask")}, model.device, model.dtype)
    # Media are encoded one sample at a time (a sample's tiles or frames are already a batch): on CPU
    # the vision tower's eager attention ran slower on the tiles of 8 samples at once than one by one.
    dtype = model.vision_tower.dtype
    images = [model.encode_images(s.pixel_values.to(model.device, dtype), s.image_block_sizes)
              for s in samples if s.pixel_values is not None]
    videos = [model.encode_videos(s.pixel_values_videos.to(model.device, dtype), s.video_num_frames)
              for s in samples if s.pixel_values_videos is not None]
    embeds = model.fuse(batch["input_ids"], torch.cat(images) if images else None,
                        torch.cat(videos) if videos else None)  # (1, T, D)
    hidden = model.llm.model(inputs_embeds=embeds, attention_mask=batch["attention_mask"],
                             position_ids=batch["position_ids"]).last_hidden_state[0]  # (T, H)
    seg = torch.repeat_interleave(torch.arange(len(samples), device=hidden.device),
                                  torch.tensor(lengths, device=hidden.device))  # (T,) sample of each token
    target = batch["labels"][0, 1:]  # (T-1,) the token position t predicts
    pos = (target != IGNORE_INDEX).nonzero().flatten()  # (N,)
    logits = model.llm.lm_head(hidden[pos]).float()  # (N, V): only where a label is predicted
    ce = F.cross_entropy(logits, target[pos], reduction="none").double()  # (N,)
    owner = seg[1:][pos]  # pack() masks each sample's first label, so a target never crosses samples
    ce_sum = torch.zeros(len(samples), dtype=torch.float64, device=hidden.device).index_add_(0, owner, ce)
    tokens = torch.bincount(owner, minlength=len(samples))
    emb = None
    if embeddings:
        emb = torch.zeros(len(samples), hidden.shape[-1], device=hidden.device).index_add_(0, seg, hidden.float())
        emb = emb / torch.tensor(lengths, device=hidden.device)[:, None]
        emb = emb.cpu()
    return ce_sum.cpu(), tokens.cpu(), emb


def delta(ce_small: float, ce_large: float) -> float:
    """The DeltaLoss score: positive when the large model is more confident."""
    return ce_small - ce_large


# --------------------------------------------------------------------------------------- scoring
def same_media_processing(a, b) -> bool:
    """Whether two processors turn a record into the same ids and pixels (configs equal but the LLM)."""
    da, db = asdict(a.config), asdict(b.config)
    for d in (da, db):
        d.pop("llm"), d.pop("mm_hidden_size", None)
    return da == db and a.chat_template == b.chat_template and a.max_pixels == b.max_pixels


def pending(specs: list[DatasetSpec], done: set[tuple[str, int]], candidates: dict[str, list[int]],
            rank: int = 0, world: int = 1) -> list[tuple[int, int]]:
    """(dataset position, record index) of every candidate not on disk; this rank's share of them."""
    todo = [(d, i) for d, s in enumerate(specs) for i in candidates[s.name] if (s.name, i) not in done]
    return todo[rank::world]


def score_records(todo: list[tuple[int, int]], specs: list[DatasetSpec], models: dict, encoders: dict,
                  out: ScoresFile, *, batch_size: int, reduction: str, embeddings: bool = False,
                  progress: bool = True) -> int:
    """Score ``todo`` with both models, ``batch_size`` samples per packed forward; rows go to ``out``.

    Args:
        models / encoders: ``{"large": ..., "small": ...}``; the two encoders may be one object.
        embeddings: also store the large model's mean final hidden state (for ``--method cluster``).
    Returns:
        how many records were written.
    """
    from tqdm import tqdm

    records = {}
    bar = tqdm(total=len(todo), desc="prune: scoring", unit="sample", disable=not progress, file=sys.stderr,
               dynamic_ncols=True)
    written, i = 0, 0
    while i < len(todo):
        rows, good = [], []
        while len(good) < batch_size and i < len(todo):
            d, j = todo[i]
            i += 1
            spec = specs[d]
            if d not in records:
                records[d] = read_records(spec.path)
            rec = records[d][j]
            row = {"dataset": spec.name, "index": j, "id": rec.get("id") if isinstance(rec, dict) else None}
            try:
                by_encoder: dict[int, Sample] = {}
                for e in encoders.values():
                    if id(e) not in by_encoder:
                        by_encoder[id(e)] = e(rec, spec.media_root)
                enc = {k: by_encoder[id(e)] for k, e in encoders.items()}
            except BadSample as e:
                rows.append({**row, "skipped": e.reason, "score": None})
                continue
            good.append((row, enc))
        if good:
            out_k = {k: packed_ce(m, [enc[k] for _, enc in good], embeddings=embeddings and k == "large")
                     for k, m in models.items()}
            for b, (row, _) in enumerate(good):
                n = int(out_k["large"][1][b])
                ce = {k: float(out_k[k][0][b]) / (n if reduction == "mean" else 1) for k in models}
                row.update(ce_large=ce["large"], ce_small=ce["small"], score=delta(ce["small"], ce["large"]),
                           tokens=n)
                if embeddings:
                    row["embedding"] = [round(v, 6) for v in out_k["large"][2][b].tolist()]
                rows.append(row)
        out.write(rows)
        written += len(rows)
        bar.update(len(rows))
    bar.close()
    return written
