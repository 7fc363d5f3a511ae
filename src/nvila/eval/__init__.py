"""Exact-match evaluation of a checkpoint on LLaVA-style QA records (SynthVILA or any JSONL).

Contract: ``evaluate(model_path, task_jsonl)`` answers the first human turn of every record
greedily through the continuous-batching engine (``nvila.engine.Engine``, ``batch_size`` streams at
once; media through the checkpoint's processor, exactly as ``nvila infer``, ``nvila serve`` and the
trainer see them; records parsed by ``nvila.data.llava``) and compares the answer with the
record's first ``gpt`` turn after ``normalise`` (case, surrounding and repeated whitespace, a final
full stop). Records are grouped by ``meta.family`` (SynthVILA) or, without it, by the JSONL file's
stem. Media paths are relative to the JSONL file's directory. The result is a plain dict (JSON-able);
``to_markdown`` renders its per-family table.

Temporal localization records carry ``"segment": [start, end]`` in seconds (and may carry the
video's ``duration``, else the video's own is used). They are scored by the reference's rule
(``nvila.timetokens``): the answer's first two timestamps (time tokens come back as seconds),
clamped to the clip and sorted, else the whole clip; per family, mean IoU and Precision@0.5 as the
mean over videos of the per-video means.
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
from nvila.timetokens import iou, localization_scores, predicted_interval

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
    segments: dict[int, tuple[tuple[float, float], float | None, str]] = {}  # localization: truth, duration, video
    for i, record in enumerate(records):
        try:
            messages, answer = _prompt_and_answer(record, path.parent)
            if "segment" in record:
                segments[i] = _segment(record)
        except BadSample as e:
            raise ValueError(f"{path}: record {i} ({record.get('id', '?')}): cannot evaluate ({e})") from None
        prompts.append((record.get("id", str(i)), (record.get("meta") or {}).get("family", path.stem), messages, answer))
    engine = Engine.from_pretrained(model_path, dtype=dtype, device=device, config=EngineConfig(max_batch_size=batch_size),
                                    **processor_options)
    t0 = time.perf_counter()
    predictions: list[str] = [""] * len(prompts)
    durations: list[float | None] = [None] * len(prompts)  # each prompt's video duration, as the engine saw it
    pending: deque = deque()  # (index, handle), oldest first
    bar = tqdm(total=len(prompts), desc=f"eval {path.stem}", unit="sample", disable=not progress)
    try:
        for i, (_, _, messages, _) in enumerate(prompts):
            pending.append((i, engine.submit(GenerationRequest(messages=messages, max_tokens=max_new_tokens))))
            while len(pending) > 2 * batch_size or (pending and i + 1 == len(prompts)):
                j, handle = pending.popleft()
                predictions[j] = handle.text().strip()
                videos = [m for m in handle.media if m.kind == "video"]
                durations[j] = videos[0].duration_s if len(videos) == 1 else None
                bar.update()
    finally:
        engine.shutdown()
        bar.close()
    seconds = time.perf_counter() - t0
    samples, localized = [], []
    for i, ((sid, family, _, answer), prediction) in enumerate(zip(prompts, predictions)):
        if i not in segments:
            samples.append({"id": sid, "family": family, "answer": answer, "prediction": prediction,
                            "correct": normalise(prediction) == normalise(answer)})
            continue
        truth, duration, video = segments[i]
        duration = duration or durations[i]
        if duration is None:
            raise ValueError(f"{path}: record {i} ({sid}): the video's duration is unknown; give the record a "
                             "'duration' in seconds")
        localized.append((video, prediction, truth, duration))
        samples.append({"id": sid, "family": family, "answer": answer, "prediction": prediction,
                        "segment": list(truth), "predicted": list(predicted_interval(prediction, duration)),
                        "iou": iou(predicted_interval(prediction, duration), truth), "duration": duration})
    families: dict[str, dict] = {}
    for s in samples:
        if "segment" in s:
            continue
        f = families.setdefault(s["family"], {"n": 0, "correct": 0})
        f["n"] += 1
        f["correct"] += int(s["correct"])
    for f in families.values():
        f["accuracy"] = f["correct"] / f["n"]
    for name in dict.fromkeys(s["family"] for s in samples if "segment" in s):
        rows = [x for x, s in zip(localized, (s for s in samples if "segment" in s)) if s["family"] == name]
        families[name] = {"n": len(rows), **localization_scores(rows)}
    qa = [s for s in samples if "segment" not in s]
    correct = sum(int(s["correct"]) for s in qa)
    logger.info("%s on %s: %d/%d correct, %d localization samples, in %.1f s", model_path, path, correct, len(qa),
                len(localized), seconds)
    result = {"model": str(model_path), "task": str(path), "n": len(samples), "correct": correct,
              "accuracy": correct / len(qa) if qa else None, "seconds": round(seconds, 3), "batch_size": batch_size,
              "families": families, "samples": samples}
    if localized:
        result["localization"] = localization_scores(localized)
    return result


def _segment(record: dict) -> tuple[tuple[float, float], float | None, str]:
    """A localization record's ([start, end] in seconds, declared duration or None, video path).

    Raises:
        BadSample: a malformed segment or duration, or no video.
    """
    seg, duration, video = record.get("segment"), record.get("duration"), record.get("video")
    if not isinstance(video, str):
        raise BadSample("a localization record needs one video")
    if (not isinstance(seg, (list, tuple)) or len(seg) != 2
            or not all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in seg) or seg[0] > seg[1]):
        raise BadSample("segment must be [start, end] in seconds with start <= end", repr(seg)[:40])
    if duration is not None and (isinstance(duration, bool) or not isinstance(duration, (int, float))
                                 or not duration > 0):
        raise BadSample("duration must be > 0 seconds", repr(duration))
    return (float(seg[0]), float(seg[1])), (float(duration) if duration is not None else None), video


def to_markdown(result: dict) -> str:
    """The per-family accuracy table of an ``evaluate`` result, with an overall row, and a mean IoU /
    Precision@0.5 table for its temporal-localization families."""
    lines = [f"Model `{result['model']}` on `{result['task']}`", ""]
    qa = {k: f for k, f in result["families"].items() if "accuracy" in f}
    if qa:
        lines += ["| task | n | correct | accuracy |", "|---|---:|---:|---:|"]
        for name, f in sorted(qa.items()):
            lines.append(f"| {name} | {f['n']} | {f['correct']} | {f['accuracy']:.3f} |")
        n = sum(f["n"] for f in qa.values())
        lines.append(f"| **all** | {n} | {result['correct']} | {result['accuracy']:.3f} |")
    loc = {k: f for k, f in result["families"].items() if "miou" in f}
    if loc:
        lines += ["", "| localization task | n | videos | mIoU | P@0.5 |", "|---|---:|---:|---:|---:|"]
        for name, f in sorted(loc.items()):
            lines.append(f"| {name} | {f['n']} | {f['videos']} | {f['miou']:.3f} | {f['p_at_0.5']:.3f} |")
    return "\n".join(lines) + "\n"
