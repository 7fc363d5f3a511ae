"""Training samples: LLaVA-style JSON/JSONL records -> model inputs with assistant-only labels.

Record format (spec §2.1)::

    {"image": "a.jpg" | ["a.jpg", "b.jpg"], "video": "clip.mp4" | "frames_dir/",
     "conversations": [{"from": "human", "value": "<image>\\nWhat is this?"},
                       {"from": "gpt", "value": "A cat."}, ...]}

Media paths are relative to the dataset's media root. Reading files and turning records into
messages is ``nvila.data.llava`` (shared with ``nvila.eval``; its names are re-exported here).

Mixture YAML (paths relative to the YAML file)::

    datasets:
      - {name: cc3m, path: cc3m.jsonl, media_root: images, repeat: 1, fraction: 1.0}

``repeat`` copies a dataset (the reference's ``name*3``); ``fraction`` < 1 keeps a seeded random
subset first. ``drop: FILE.json`` (relative to the YAML) names a JSON list of record indices to leave
out before ``fraction`` and ``repeat`` apply: the reference's drop-index files (``name@tag``, spec
training.md §3), as ``nvila prune`` writes them.

Tokenization and media expansion are the inference processor's (``NVILAProcessor.prepare``), so
training and inference see identical ids. Labels (spec §2.2) cover every assistant content token
plus the ``<|im_end|>`` that closes it; system, user, role headers and media positions are -100.
The assistant header ids come from the checkpoint's chat template (its generation prompt).

Bad samples (missing or corrupt media, empty answers, no first human turn, longer than
``max_length`` after media expansion) raise ``BadSample``; the stream skips and counts them.

Time tokens (spec training.md §6): for a checkpoint with ``num_time_tokens`` N > 0, every
``<seconds>`` literal in an answer becomes ``<t{round(s / D * (N-1))}>``, D being the duration of the
record's one video (its ``duration`` field, else the video's own: frames over the file's rate, or
over the record's ``fps`` for frame directories). A literal past D is clamped (counted in the
stream's ``fixed``); a record with timestamps but no single video or no duration is skipped.
"""

from __future__ import annotations

import json
import logging
import os
import random
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..data.llava import BadSample, read_records, to_conversation
from ..timetokens import TIME_LITERAL, encode_timestamps
from .config import TrainConfigError

logger = logging.getLogger(__name__)

IGNORE_INDEX = -100


# ---------------------------------------------------------------------------------------- mixture
@dataclass
class DatasetSpec:
    name: str
    path: Path
    media_root: Path
    repeat: int = 1
    fraction: float = 1.0
    drop: Path | None = None  # a JSON list of record indices to leave out (a drop-index file)


def load_mixture(path: str | os.PathLike) -> list[DatasetSpec]:
    """Read and check a mixture YAML: every data file and media root must exist.

    Raises:
        TrainConfigError: a missing or malformed file, an unknown key, a bad repeat/fraction.
    """
    import yaml

    p = Path(path)
    if not str(path) or not p.is_file():
        raise TrainConfigError(f"data.mixture: {p}: no such mixture file")
    try:
        raw = yaml.safe_load(p.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as e:
        raise TrainConfigError(f"{p}: not valid YAML ({e})") from None
    entries = raw.get("datasets") if isinstance(raw, dict) else None
    if not isinstance(entries, list) or not entries:
        raise TrainConfigError(f"{p}: expected a non-empty 'datasets' list")
    valid = {"name", "path", "media_root", "repeat", "fraction", "drop"}
    specs = []
    for i, e in enumerate(entries):
        if not isinstance(e, dict) or "path" not in e:
            raise TrainConfigError(f"{p}: datasets[{i}] must be a mapping with a 'path'")
        unknown = sorted(set(e) - valid)
        if unknown:
            raise TrainConfigError(f"{p}: datasets[{i}] has unknown key {unknown[0]}; valid: {', '.join(sorted(valid))}")
        data = (p.parent / str(e["path"])).resolve()
        if not data.is_file():
            raise TrainConfigError(f"{p}: datasets[{i}]: data file {data} does not exist")
        root = (p.parent / str(e["media_root"])).resolve() if e.get("media_root") else data.parent
        if not root.is_dir():
            raise TrainConfigError(f"{p}: datasets[{i}]: media_root {root} is not a directory")
        repeat, fraction = e.get("repeat", 1), e.get("fraction", 1.0)
        if not isinstance(repeat, int) or repeat < 1 or not isinstance(fraction, (int, float)) or not 0 < fraction <= 1:
            raise TrainConfigError(f"{p}: datasets[{i}]: repeat must be an integer >= 1 and fraction in (0, 1]")
        drop = (p.parent / str(e["drop"])).resolve() if e.get("drop") else None
        if drop is not None and not drop.is_file():
            raise TrainConfigError(f"{p}: datasets[{i}]: drop-index file {drop} does not exist")
        specs.append(DatasetSpec(str(e.get("name", data.stem)), data, root, repeat, float(fraction), drop))
    return specs


def without_dropped(indices: list[int], drop_file: Path) -> list[int]:
    """``indices`` less those listed in a drop-index file (a JSON list of ints within range)."""
    try:
        drop = json.loads(drop_file.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise TrainConfigError(f"{drop_file}: unreadable drop-index file ({e})") from None
    if not isinstance(drop, list) or not all(isinstance(i, int) and 0 <= i < len(indices) for i in drop):
        raise TrainConfigError(f"{drop_file}: expected a JSON list of record indices in [0, {len(indices)})")
    gone = set(drop)
    return [i for i in indices if i not in gone]


class MixtureDataset:
    """The mixture as one indexable list of (record, media root), repeats and sub-sampling applied."""

    def __init__(self, specs: list[DatasetSpec], seed: int = 0):
        self.records: list[list[dict]] = [read_records(s.path) for s in specs]
        self.roots = [s.media_root for s in specs]
        self.names = [s.name for s in specs]
        self.index: list[tuple[int, int]] = []
        for d, (spec, recs) in enumerate(zip(specs, self.records)):
            keep = list(range(len(recs)))
            if spec.drop is not None:
                keep = without_dropped(keep, spec.drop)
            if spec.fraction < 1:
                keep = sorted(random.Random(f"{seed}:{spec.name}").sample(keep, max(1, round(len(recs) * spec.fraction))))
            self.index += [(d, i) for _ in range(spec.repeat) for i in keep]
            logger.info("dataset %s: %d records, %d samples in the mixture", spec.name, len(recs),
                        len(keep) * spec.repeat)

    def __len__(self) -> int:
        return len(self.index)

    def __getitem__(self, i: int) -> tuple[dict, Path]:
        d, j = self.index[i]
        return self.records[d][j], self.roots[d]

    def source(self, i: int) -> int:
        """The index in ``names`` of the dataset that mixture position ``i`` comes from."""
        return self.index[i][0]


# ---------------------------------------------------------------------------------------- samples
@dataclass
class Sample:
    """One encoded sample. Media tensors are in the order of their tokens in ``input_ids``."""

    input_ids: torch.Tensor  # (L,) long, media placeholders expanded
    labels: torch.Tensor  # (L,) long, IGNORE_INDEX outside assistant answers
    pixel_values: torch.Tensor | None = None  # (N_tiles, 3, S, S)
    image_block_sizes: list = field(default_factory=list)
    pixel_values_videos: torch.Tensor | None = None  # (N_frames, 3, S, S)
    video_num_frames: list[int] = field(default_factory=list)
    source: int = -1  # its dataset's index in the mixture (MixtureDataset.names); -1 when unknown
    fixes: dict[str, int] = field(default_factory=dict)  # what encoding corrected, e.g. clamped timestamps


def assistant_header_ids(processor) -> list[int]:
    """Token ids that open an assistant turn: the chat template's generation prompt."""
    tok, template = processor.tokenizer, processor.chat_template
    probe = [{"role": "user", "content": "x"}]
    plain = tok.apply_chat_template(probe, chat_template=template, tokenize=False, add_generation_prompt=False)
    prompt = tok.apply_chat_template(probe, chat_template=template, tokenize=False, add_generation_prompt=True)
    if not prompt.startswith(plain) or prompt == plain:
        raise TrainConfigError("the chat template has no generation prompt: cannot find assistant turns")
    return tok(prompt[len(plain):], add_special_tokens=False).input_ids


def assistant_labels(ids: list[int], header: list[int], stops: set[int]) -> list[int]:
    """Labels for one sequence: assistant content and its closing stop token; the rest IGNORE_INDEX."""
    labels = [IGNORE_INDEX] * len(ids)
    h, i = len(header), 0
    while i + h <= len(ids):
        if ids[i:i + h] != header:
            i += 1
            continue
        j = i + h
        while j < len(ids):
            labels[j] = ids[j]
            j += 1
            if ids[j - 1] in stops:
                break
        i = j
    return labels


class SampleEncoder:
    """Record -> ``Sample`` through the inference processor.

    Args:
        processor: an ``NVILAProcessor`` (its config sets tiles and frames).
        max_length: the longest media-expanded sequence kept.
    """

    def __init__(self, processor, max_length: int):
        self.processor = processor
        self.max_length = max_length
        self.header = assistant_header_ids(processor)
        self.stops = set(processor.ids.stop)

    def __call__(self, record: dict, media_root: Path) -> Sample:
        from nvila.media import MediaError

        conversation = to_conversation(record, media_root)
        fixes = {}
        cfg = self.processor.config
        if cfg.num_time_tokens and any(TIME_LITERAL.search(m["content"]) for m in conversation
                                       if m["role"] == "assistant"):
            clamped = self._encode_timestamps(record, conversation)
            if clamped:
                fixes["clamped timestamp"] = clamped
        try:
            inputs, _ = self.processor.prepare([conversation], add_generation_prompt=False)
        except (MediaError, OSError, ValueError) as e:
            raise BadSample("unreadable media", str(e)) from None
        ids = inputs["input_ids"][0]  # (L,) a batch of one has no padding
        if ids.numel() > self.max_length:
            raise BadSample("too long", f"{ids.numel()} > {self.max_length} tokens")
        labels = torch.tensor(assistant_labels(ids.tolist(), self.header, self.stops), dtype=torch.long)
        if not (labels != IGNORE_INDEX).any():
            raise BadSample("no supervised tokens")
        return Sample(ids, labels, inputs.get("pixel_values"), list(inputs.get("image_block_sizes", [])),
                      inputs.get("pixel_values_videos"), list(inputs.get("video_num_frames", [])), fixes=fixes)

    def _encode_timestamps(self, record: dict, conversation: list[dict]) -> int:
        """Rewrite the answers' ``<seconds>`` literals as time tokens in place (LITA's rule, against the
        one video's duration: the record's ``duration``, else the video's own); returns the clamps.

        Raises:
            BadSample: no single video, or no usable duration.
        """
        from nvila.media import MediaError

        cfg = self.processor.config
        videos = [p for p in conversation[next(i for i, m in enumerate(conversation) if m["role"] == "user")]
                  ["content"] if isinstance(p, dict) and p.get("type") == "video"]
        if len(videos) != 1 or record.get("image"):
            raise BadSample("timestamps without one video")
        duration = record.get("duration")
        if duration is None:
            try:
                _, infos = self.processor.prepare([conversation], add_generation_prompt=False,
                                                  video_fps=record.get("fps"))
            except (MediaError, OSError, ValueError) as e:
                raise BadSample("unreadable media", str(e)) from None
            duration = infos[0][0].duration_s
            if duration is None:
                raise BadSample("no video duration", "declare the record's duration or fps")
        if isinstance(duration, bool) or not isinstance(duration, (int, float)) or not duration > 0:
            raise BadSample("bad video duration", repr(duration))
        clamped = 0
        for m in conversation:
            if m["role"] == "assistant":
                m["content"], n = encode_timestamps(m["content"], float(duration), cfg.num_time_tokens,
                                                    cfg.time_token_format)
                clamped += n
        return clamped


# ----------------------------------------------------------------------------------------- stream
class SampleStream:
    """This rank's endless, resumable walk over the mixture, skipping and counting bad samples.

    Each epoch is a permutation of the mixture seeded by ``(seed, epoch)``; rank ``r`` of ``world``
    reads positions ``r, r + world, ...`` of it (the remainder is dropped so every rank sees the
    same count). With no bad samples, global batch ``s`` is therefore the same set of samples for
    any split into processes x micro-batches. The state is the cursor and the skip counters.
    """

    def __init__(self, dataset: MixtureDataset, encode: SampleEncoder, *, rank: int = 0, world: int = 1,
                 seed: int = 0, shuffle: bool = True):
        self.dataset, self.encode = dataset, encode
        self.rank, self.world, self.seed, self.shuffle = rank, world, seed, shuffle
        self.per_rank = len(dataset) // world
        self.cursor = 0
        self.skipped: Counter = Counter()
        self.fixed: Counter = Counter()  # corrections made while encoding (clamped timestamps)
        self._epoch, self._order = -1, []

    def _index(self, position: int) -> int:
        epoch, k = divmod(position, self.per_rank)
        if epoch != self._epoch:
            n = len(self.dataset)
            if self.shuffle:
                g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
                self._order = torch.randperm(n, generator=g).tolist()
            else:
                self._order = list(range(n))
            self._epoch = epoch
        return self._order[self.rank + self.world * k]

    def take(self, n: int) -> list[Sample]:
        """The next ``n`` good samples of this rank."""
        out = []
        misses = 0
        while len(out) < n:
            index = self._index(self.cursor)
            record, root = self.dataset[index]
            self.cursor += 1
            try:
                sample = self.encode(record, root)
                sample.source = self.dataset.source(index)
                self.fixed.update(sample.fixes)
                out.append(sample)
                misses = 0
            except BadSample as e:
                self.skipped[e.reason] += 1
                logger.debug("skipped a sample: %s", e)
                misses += 1
                if misses >= self.per_rank:
                    raise TrainConfigError(f"no usable sample in a whole epoch (skipped: {dict(self.skipped)}; "
                                           f"last: {e})") from None
        return out

    def state_dict(self) -> dict:
        return {"cursor": self.cursor, "skipped": dict(self.skipped), "fixed": dict(self.fixed)}

    def load_state_dict(self, state: dict) -> None:
        self.cursor = int(state["cursor"])
        self.skipped = Counter(state["skipped"])
        self.fixed = Counter(state.get("fixed", {}))
