"""Exact-match evaluation of a checkpoint on LLaVA-style QA records (SynthVILA or any JSONL).

Contract: ``evaluate(model_path, task_jsonl)`` answers the first human turn of every record
greedily through the continuous-batching engine (``nvila.engine.Engine``, ``batch_size`` streams at
once; media through the checkpoint's processor, exactly as ``nvila infer``, ``nvila serve`` and the
trainer see them; records parsed by ``nvila.data.llava``) and compares the answer with the
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
from collections import deque
from pathlib import Path

import torch
from tqdm import tqdm

from nvila.data.llava import BadSample, read_records, to_conversation

logger = logging.getLogger(__name__)


def normalise(text: str) -> str:
    """Lower-case, collapse whitespace and drop one trailing full stop."""
    text = re.sub(r"\s+", " ", text).strip().lower()
    return text[:-1].rstrip() if text.endswith(".") else text


def _prompt_and_answer(record: dict, root: Path) -> tuple[list[dict], str]:
    """Messages up to the first assistant turn (media in the first user turn) and that turn's text.

    Raises:
        BadSample: the record fails the shared checks (no human turn or answer, missing media).
    """
    messages = to_conversation(record, root)
    k = next(i for i, m in enumerate(messages) if m["role"] == "assistant")
    return messages[:k], messages[k]["content"]


def evaluate(model_path: str | os.PathLike, task: str | os.PathLike, limit: int | None = None, *,
             max_new_tokens: int = 16, batch_size: int = 8, progress: bool = True,
             dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu", **processor_options) -> dict:
    """Exact-match accuracy of a checkpoint on a task JSONL, overall and per family.

    Args:
        model_path: a checkpoint directory (either layout) or a Hub id ``ORG/NAME[@REVISION]``.
        task: a ``.jsonl`` (or ``.json``) file of LLaVA-style records.
        limit: evaluate only the first ``limit`` records.
        max_new_tokens: decode budget per answer (SynthVILA answers are a few tokens).
        batch_size: samples decoded together by the engine (its KV-cache slots); at most twice as
            many are preprocessed and queued at a time.
        progress: show a tqdm progress bar on stderr.
        dtype: model weights dtype.
        **processor_options: processor overrides (``max_tiles``, ``num_video_frames``, ``fps``).
    Returns:
        ``{"model", "task", "n", "correct", "accuracy", "seconds", "batch_size", "families": {name:
        {"n", "correct", "accuracy"}}, "samples": [{"id", "family", "answer", "prediction", "correct"}]}``;
        ``seconds`` is the answering time, model loading excluded.
    Raises:
        ValueError: an unreadable task file, no records, ``limit < 1``, ``batch_size < 1``, or a
            record without a first human turn and an answer.
    """
    from nvila.engine import Engine, EngineConfig, GenerationRequest

    path = Path(task)
    if limit is not None and limit < 1:
        raise ValueError(f"limit must be >= 1, got {limit}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    records = read_records(path)
    records = records[:limit] if limit is not None else records
    if not records:
        raise ValueError(f"{path}: no records to evaluate")
    prompts = []  # (id, family, messages, answer)
    for i, record in enumerate(records):
        try:
            messages, answer = _prompt_and_answer(record, path.parent)
        except BadSample as e:
            raise ValueError(f"{path}: record {i} ({record.get('id', '?')}): cannot evaluate ({e})") from None
        prompts.append((record.get("id", str(i)), (record.get("meta") or {}).get("family", path.stem), messages, answer))
    engine = Engine.from_pretrained(model_path, dtype=dtype, device=device, config=EngineConfig(max_batch_size=batch_size),
                                    **processor_options)
    t0 = time.perf_counter()
    predictions: list[str] = [""] * len(prompts)
    pending: deque = deque()  # (index, handle), oldest first
    bar = tqdm(total=len(prompts), desc=f"eval {path.stem}", unit="sample", disable=not progress)
    try:
        for i, (_, _, messages, _) in enumerate(prompts):
            pending.append((i, engine.submit(GenerationRequest(messages=messages, max_tokens=max_new_tokens))))
            while len(pending) > 2 * batch_size or (pending and i + 1 == len(prompts)):
                j, handle = pending.popleft()
                predictions[j] = handle.text().strip()
                bar.update()
    finally:
        engine.shutdown()
        bar.close()
    seconds = time.perf_counter() - t0
    samples = [{"id": sid, "family": family, "answer": answer, "prediction": prediction,
                "correct": normalise(prediction) == normalise(answer)}
               for (sid, family, _, answer), prediction in zip(prompts, predictions)]
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
            "accuracy": correct / len(samples), "seconds": round(seconds, 3), "batch_size": batch_size,
            "families": families, "samples": samples}


def to_markdown(result: dict) -> str:
    """The per-family accuracy table of an ``evaluate`` result, with an overall row."""
    lines = [f"Model `{result['model']}` on `{result['task']}`", "",
             "| task | n | correct | accuracy |", "|---|---:|---:|---:|"]
    for name, f in sorted(result["families"].items()):
        lines.append(f"| {name} | {f['n']} | {f['correct']} | {f['accuracy']:.3f} |")
    lines.append(f"| **all** | {result['n']} | {result['correct']} | {result['accuracy']:.3f} |")
    return "\n".join(lines) + "\n"
