"""Exact-match evaluation of a checkpoint on LLaVA-style QA records (SynthVILA or any JSONL).

Contract: ``evaluate(model_path, task_jsonl)`` answers the first human turn of every record
greedily with ``NVILAForConditionalGeneration.generate`` (media through the checkpoint's
processor, exactly as ``nvila infer`` and the trainer see them) and compares the answer with the
record's first ``gpt`` turn after ``normalise`` (case, surrounding and repeated whitespace, a final
full stop). Records are grouped by ``meta.family`` (SynthVILA) or, without it, by the JSONL file's
stem. Media paths are relative to the JSONL file's directory. The result is a plain dict (JSON-able);
``to_markdown`` renders its per-family table.
"""

from __future__ import annotations

import logging
import os
import re
import time
from pathlib import Path

import torch
from tqdm import tqdm

logger = logging.getLogger(__name__)


def normalise(text: str) -> str:
    """Lower-case, collapse whitespace and drop one trailing full stop."""
    text = re.sub(r"\s+", " ", text).strip().lower()
    return text[:-1].rstrip() if text.endswith(".") else text


def _prompt_and_answer(record: dict, root: Path) -> tuple[list[dict], str]:
    """Messages up to the first assistant turn (media in the first user turn) and that turn's text.

    Raises:
        BadSample: the trainer's checks fail (no human turn or answer, missing media).
    """
    from nvila.train.data import to_conversation

    messages = to_conversation(record, root)
    k = next(i for i, m in enumerate(messages) if m["role"] == "assistant")
    return messages[:k], messages[k]["content"]


def evaluate(model_path: str | os.PathLike, task: str | os.PathLike, limit: int | None = None, *,
             max_new_tokens: int = 16, progress: bool = True, dtype: torch.dtype = torch.float32,
             device: str | torch.device = "cpu", **processor_options) -> dict:
    """Exact-match accuracy of a checkpoint on a task JSONL, overall and per family.

    Args:
        model_path: a checkpoint directory in the published layout, or a Hub id ``ORG/NAME[@REVISION]``.
        task: a ``.jsonl`` (or ``.json``) file of LLaVA-style records.
        limit: evaluate only the first ``limit`` records.
        max_new_tokens: decode budget per answer (SynthVILA answers are a few tokens).
        progress: show a tqdm progress bar on stderr.
        dtype: model weights dtype.
        **processor_options: processor overrides (``max_tiles``, ``num_video_frames``, ``fps``).
    Returns:
        ``{"model", "task", "n", "correct", "accuracy", "seconds", "families": {name: {"n",
        "correct", "accuracy"}}, "samples": [{"id", "family", "answer", "prediction", "correct"}]}``.
    Raises:
        ValueError: an unreadable task file, no records, ``limit < 1``, or a record without a
            first human turn and an answer.
    """
    from nvila.checkpoint import check_layout
    from nvila.model import NVILAForConditionalGeneration
    from nvila.processor import NVILAProcessor
    from nvila.train.config import TrainConfigError
    from nvila.train.data import BadSample, read_records

    path = Path(task)
    if limit is not None and limit < 1:
        raise ValueError(f"limit must be >= 1, got {limit}")
    try:
        records = read_records(path)
    except TrainConfigError as e:
        raise ValueError(str(e)) from None
    records = records[:limit] if limit is not None else records
    if not records:
        raise ValueError(f"{path}: no records to evaluate")
    root = check_layout(model_path)  # a Hub id is fetched once; both loaders read the snapshot
    processor = NVILAProcessor.from_pretrained(root, **processor_options)
    model = NVILAForConditionalGeneration.from_pretrained(root, torch_dtype=dtype, device=device)
    t0 = time.perf_counter()
    samples = []
    for i, record in enumerate(tqdm(records, desc=f"eval {path.stem}", unit="sample", disable=not progress)):
        family = (record.get("meta") or {}).get("family", path.stem)
        try:
            messages, answer = _prompt_and_answer(record, path.parent)
        except BadSample as e:
            raise ValueError(f"{path}: record {i} ({record.get('id', '?')}): cannot evaluate ({e})") from None
        inputs, _ = processor.prepare([messages], add_generation_prompt=True)
        with torch.inference_mode():
            ids = model.generate(**inputs.to(model.device), max_new_tokens=max_new_tokens)
        prediction = processor.decode(ids[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True).strip()
        samples.append({"id": record.get("id", str(i)), "family": family, "answer": answer, "prediction": prediction,
                        "correct": normalise(prediction) == normalise(answer)})
    seconds = time.perf_counter() - t0
    families: dict[str, dict] = {}
    for s in samples:
        f = families.setdefault(s["family"], {"n": 0, "correct": 0})
        f["n"] += 1
        f["correct"] += int(s["correct"])
    for f in families.values():
        f["accuracy"] = f["correct"] / f["n"]
    correct = sum(int(s["correct"]) for s in samples)
    logger.info("%s on %s: %d/%d correct in %.1f s", model_path, path, correct, len(samples), seconds)
    return {"model": str(model_path), "task": str(path), "n": len(samples), "correct": correct,
            "accuracy": correct / len(samples), "seconds": round(seconds, 3), "families": families,
            "samples": samples}


def to_markdown(result: dict) -> str:
    """The per-family accuracy table of an ``evaluate`` result, with an overall row."""
    lines = [f"Model `{result['model']}` on `{result['task']}`", "",
             "| task | n | correct | accuracy |", "|---|---:|---:|---:|"]
    for name, f in sorted(result["families"].items()):
        lines.append(f"| {name} | {f['n']} | {f['correct']} | {f['accuracy']:.3f} |")
    lines.append(f"| **all** | {result['n']} | {result['correct']} | {result['accuracy']:.3f} |")
    return "\n".join(lines) + "\n"
