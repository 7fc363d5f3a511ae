"""Conversation + media -> model inputs. The processor owns every token count.

Pipeline for one conversation (spec §3.3, §4, §8, §9):

1. media parts are decoded (media.py) and tiled (tiling.py);
2. each message becomes text: text parts as-is, one ``<image>`` / ``<vila/video>`` per medium, and
   for NVILA-Lite with exactly one image, ``"<image>\\n" * n_tiles``; then ``strip()``;
3. the checkpoint's chat template renders the messages and the tokenizer maps the text to ids;
4. every placeholder id is expanded into the medium's full token block: the optional start ids,
   one media-token id per visual feature row, and the end ids (``"\\n"``) as real token ids.

The model later writes the visual features into the media-token positions, in order. Token counts
are pure functions of sizes and config: ``num_image_tokens`` / ``num_video_tokens``.

The processor knows the tokenizer and the config; it knows nothing about weights.
"""

from __future__ import annotations

import hashlib
import logging
import os
import threading
from collections import OrderedDict, deque
from dataclasses import dataclass, field, replace
from typing import Any

import torch

from . import media as media_io
from . import tiling
from .checkpoint import MEDIA_TOKENS, check_layout, resolve_chat_template, token_ids
from .config import NVILAConfig, TokenIds
from .layouts import detect
from .projector import tokens_per_tile
from .temporal import video_layout
from .timetokens import decode_time_tokens, ensure_time_tokens
from .vision import s2_output_grid

logger = logging.getLogger(__name__)

DEFAULT_MEDIA_CACHE_MIB = 64  # memory for the tiles of recent images (NVILAProcessor)

@dataclass
class MediumInfo:
    """What one medium became: for reports (CLI, server usage), not for the model."""

    kind: str  # "image" | "video"
    source: str
    num_tokens: int  # rows of the expanded block, end/start tokens included
    num_visual_tokens: int
    num_tiles: int  # tiles (images) or frames (videos)
    block_size: tuple[int, int] | None = None
    frame_indices: list[int] = field(default_factory=list)
    duration_s: float | None = None  # videos: the source's seconds, when its frame rate is known
    digest: str = ""  # hex content hash of the decoded medium and its preprocessing (feature / prefix keys)


@dataclass
class _Item:
    kind: str
    pixels: torch.Tensor  # (n, 3, S, S) float32
    block_size: tuple[int, int] | None
    ids: list[int]
    info: MediumInfo


class NVILAInputs(dict):
    """Model inputs: tensors plus host-side media metadata (plain lists, never synced from a device).

    Keys: ``input_ids`` (B, L) and ``attention_mask`` (B, L); with images ``pixel_values``
    (N_tiles, 3, S, S) and ``image_block_sizes`` (one (rows, cols) or None per image medium); with
    videos ``pixel_values_videos`` (N_frames, 3, S, S) and ``video_num_frames`` (frames per video).
    """

    def to(self, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> "NVILAInputs":
        """Move tensors to ``device``; cast floating tensors (pixels) to ``dtype`` if given."""
        out = NVILAInputs()
        for k, v in self.items():
            if isinstance(v, torch.Tensor):
                v = v.to(device=device, dtype=dtype if (dtype is not None and v.is_floating_point()) else None)
            out[k] = v
        return out


def _num_blocks(cfg: NVILAConfig, block_size: tuple[int, int]) -> int:
    rows, cols = s2_output_grid(block_size, cfg.s2_scales, cfg.vision.image_size, cfg.s2_resize_output_to_scale_idx)
    return rows * cols


def num_image_tokens(cfg: NVILAConfig, width: int, height: int, *, single: bool = True,
                     max_tiles: int | None = None) -> list[int]:
    """Visual tokens of one image, per medium it becomes (Lite: one medium per tile).

    Counts exclude start/end tokens. Pure function of the image size and the config.
    """
    tile, per_tile = cfg.vision.image_size, tokens_per_tile(cfg.projector_type, cfg.vision.grid)
    max_tiles = max_tiles or cfg.max_tiles
    if single and cfg.image_aspect_ratio == "dynamic_s2":
        block = tiling.dynamic_s2_grid(width, height, cfg.s2_scales, max_tiles)
        return [per_tile * _num_blocks(cfg, block)]
    if single and cfg.image_aspect_ratio == "dynamic":
        rows, cols = tiling.dynamic_grid(width, height, cfg.min_tiles, max_tiles, tile)
        n = rows * cols + (1 if rows * cols != 1 else 0)
        return [per_tile] * n
    return [per_tile]


def num_video_tokens(cfg: NVILAConfig, num_frames: int) -> int:
    """Visual tokens of one video of ``num_frames`` sampled frames (start/end tokens excluded)."""
    per_frame = tokens_per_tile(cfg.projector_type, cfg.vision.grid)
    return sum(t * n for t, n in video_layout(num_frames, per_frame, cfg.video_encoder))


class NVILAProcessor:
    """Chat template, media preprocessing and placeholder expansion for one checkpoint."""

    def __init__(self, tokenizer, config: NVILAConfig, *, chat_template: str | None = None,
                 max_pixels: int = media_io.DEFAULT_MAX_PIXELS, media_cache_mib: int = DEFAULT_MEDIA_CACHE_MIB):
        """``media_cache_mib``: the tiled pixels of recent images are kept (LRU, this many MiB; 0 for
        none), keyed by their content hash, so a follow-up turn about the same image skips the tiling."""
        self.tokenizer = tokenizer
        self.config = config
        self.chat_template = chat_template or resolve_chat_template(config, tokenizer)
        self.ids: TokenIds = token_ids(tokenizer, self.chat_template)
        self.max_pixels = max_pixels
        enc = lambda s: self.tokenizer(s, add_special_tokens=False).input_ids if s else []  # noqa: E731
        self._image_start, self._image_end = enc(config.image_encoder.start_tokens), enc(config.image_encoder.end_tokens)
        vcfg = config.video_encoder
        self._video_start, self._video_end, self._video_sep = enc(vcfg.start_tokens), enc(vcfg.end_tokens), enc(vcfg.sep_tokens)
        self._image_cache: OrderedDict[str, list[_Item]] = OrderedDict()  # digest -> items, LRU last
        self._image_cache_bytes, self._image_cache_limit = 0, media_cache_mib * 2**20
        self._image_cache_lock = threading.Lock()  # prepare() may run on several request threads

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, *, local_files_only: bool = False,
                        **overrides: Any) -> "NVILAProcessor":
        """Load from a checkpoint directory or a Hub id ``ORG/NAME[@REVISION]`` (``checkpoint.check_layout``;
        of a Hub id only the configs and tokenizer files are fetched). ``overrides`` change preprocessing
        fields of the config (``max_tiles``, ``num_video_frames``, ``fps``, ...) or set ``max_pixels`` and
        ``media_cache_mib`` (``__init__``)."""
        root = check_layout(path, weights=False, local_files_only=local_files_only)
        max_pixels = overrides.pop("max_pixels", media_io.DEFAULT_MAX_PIXELS)
        media_cache_mib = overrides.pop("media_cache_mib", DEFAULT_MEDIA_CACHE_MIB)
        config = NVILAConfig.from_pretrained(root)
        if overrides:
            config = config.with_overrides(**{k: v for k, v in overrides.items() if v is not None})
        tok = detect(root).load_tokenizer(root)
        ensure_time_tokens(tok, config.num_time_tokens, config.time_token_format)
        return cls(tok, config, max_pixels=max_pixels, media_cache_mib=media_cache_mib)

    # ---------------------------------------------------------------------------------- public API
    def apply_chat_template(self, conversation, *, add_generation_prompt: bool = False, tokenize: bool = False,
                            return_dict: bool = False, return_tensors: str | None = None,
                            padding_side: str = "left", **options: Any):
        """HF-style entry point. ``conversation`` is one list of messages or a list of them (a batch).

        Messages are ``{"role": ..., "content": str | [parts]}`` with parts ``{"type": "text", "text"}``,
        ``{"type": "image", "image": path|bytes|PIL|ndarray|data URL}`` and ``{"type": "video", "video":
        file|frame dir|list of frames}``. ``options``: ``max_tiles``, ``num_video_frames``, ``fps``.

        Returns the prompt text(s) if not ``tokenize``; the expanded ids if not ``return_dict``; else
        ``NVILAInputs`` (tensors when ``return_tensors="pt"``, the only tensor type supported).
        """
        batched = bool(conversation) and isinstance(conversation[0], (list, tuple))
        convs = conversation if batched else [conversation]
        if not tokenize:
            texts = [self._render(c, add_generation_prompt, options)[0] for c in convs]
            return texts if batched else texts[0]
        inputs, _ = self.prepare(convs, add_generation_prompt=add_generation_prompt,
                                 padding_side=padding_side, **options)
        if return_tensors not in (None, "pt"):
            raise ValueError(f"return_tensors={return_tensors!r} is not supported; use 'pt' or None")
        if not return_dict:
            ids = inputs["input_ids"]
            if return_tensors == "pt":
                return ids
            rows = [r[m.bool()].tolist() for r, m in zip(ids, inputs["attention_mask"])]
            return rows if batched else rows[0]
        return inputs

    def prepare(self, conversations: list, *, add_generation_prompt: bool = True, padding_side: str = "left",
                **options: Any) -> tuple[NVILAInputs, list[list[MediumInfo]]]:
        """Tokenize a batch of conversations. Returns the inputs and, per conversation, its media."""
        if padding_side not in ("left", "right"):
            raise ValueError(f"padding_side must be 'left' or 'right', got {padding_side!r}")
        rows, items = [], []
        for conv in conversations:
            ids, conv_items = self._encode(conv, add_generation_prompt, options)
            rows.append(ids)
            items.append(conv_items)
        length = max(len(r) for r in rows)
        input_ids = torch.full((len(rows), length), self.ids.pad, dtype=torch.long)
        attention_mask = torch.zeros((len(rows), length), dtype=torch.long)
        for i, r in enumerate(rows):
            sl = slice(length - len(r), length) if padding_side == "left" else slice(0, len(r))
            input_ids[i, sl] = torch.tensor(r, dtype=torch.long)
            attention_mask[i, sl] = 1
        out = NVILAInputs(input_ids=input_ids, attention_mask=attention_mask)
        flat = [it for conv_items in items for it in conv_items]
        images = [it for it in flat if it.kind == "image"]
        videos = [it for it in flat if it.kind == "video"]
        if images:
            out["pixel_values"] = _concat([it.pixels for it in images])
            out["image_block_sizes"] = [it.block_size for it in images]
        if videos:
            out["pixel_values_videos"] = torch.cat([it.pixels for it in videos])
            out["video_num_frames"] = [it.pixels.shape[0] for it in videos]
        return out, [[it.info for it in conv_items] for conv_items in items]

    def decode(self, ids, skip_special_tokens: bool = True, *, decode_time_tokens: float | None = None,
               **kw: Any) -> str:
        """Text of ``ids``. ``decode_time_tokens``: the duration in seconds of the prompt's one video;
        with it, a checkpoint's time tokens become ``<seconds>`` (``timetokens.decode_time_tokens``)."""
        text = self.tokenizer.decode(ids, skip_special_tokens=skip_special_tokens, **kw).strip()
        return self._time_tokens_to_seconds(text, decode_time_tokens)

    def batch_decode(self, ids, skip_special_tokens: bool = True, *,
                     decode_time_tokens: list[float | None] | None = None, **kw: Any) -> list[str]:
        """``decode`` per row; ``decode_time_tokens`` gives one video duration (or None) per row."""
        texts = [t.strip() for t in self.tokenizer.batch_decode(ids, skip_special_tokens=skip_special_tokens, **kw)]
        if decode_time_tokens is None:
            return texts
        if len(decode_time_tokens) != len(texts):
            raise ValueError(f"decode_time_tokens needs one duration per row: got {len(decode_time_tokens)} for "
                             f"{len(texts)} rows")
        return [self._time_tokens_to_seconds(t, d) for t, d in zip(texts, decode_time_tokens)]

    def time_token_duration(self, infos: list[MediumInfo], *, warn: bool = True) -> float | None:
        """The seconds a time-token answer about a conversation's media is decoded against: None when
        the checkpoint has no time tokens or the media are not exactly one video; the video's
        duration; 1.0 (positions as fractions of the clip), with a warning unless ``warn`` is False
        (a caller that warns once the answer holds a time token), when its frame rate is unknown (a
        frame directory without a declared fps)."""
        if not self.config.num_time_tokens or len(infos) != 1 or infos[0].kind != "video":
            return None
        if infos[0].duration_s is None:
            if warn:
                logger.warning("%s: its frame rate is unknown (declare it: --video-fps, or the video part's fps), so "
                               "times are fractions of the clip", infos[0].source)
            return 1.0
        return infos[0].duration_s

    def _time_tokens_to_seconds(self, text: str, duration: float | None) -> str:
        if duration is None or not self.config.num_time_tokens:
            return text
        return decode_time_tokens(text, duration, self.config.num_time_tokens, self.config.time_token_format)

    def num_image_tokens(self, width: int, height: int, *, single: bool = True, max_tiles: int | None = None) -> list[int]:
        return num_image_tokens(self.config, width, height, single=single, max_tiles=max_tiles)

    def num_video_tokens(self, num_frames: int) -> int:
        return num_video_tokens(self.config, num_frames)

    # ------------------------------------------------------------------------------------ internals
    def _cfg(self, options: dict) -> NVILAConfig:
        unknown = set(options) - {"max_tiles", "num_video_frames", "fps", "video_fps"}
        if unknown:
            raise TypeError(f"unknown processor options {sorted(unknown)}; valid: fps, max_tiles, num_video_frames, "
                            "video_fps")
        changes = {k: v for k, v in options.items() if v is not None and k != "video_fps"}
        return self.config.with_overrides(**changes) if changes else self.config

    def _render(self, conversation, add_generation_prompt: bool, options: dict):
        """Messages -> prompt text (placeholders included) and the media items in order."""
        cfg = self._cfg(options)
        messages = _normalise(conversation)
        n_images = sum(1 for m in messages for p in m["parts"] or () if p[0] == "image")
        items: list[_Item] = []
        rendered = []
        for m in messages:
            if m["parts"] is None:
                rendered.append({"role": m["role"], "content": None})
                continue
            text = ""
            for kind, value, declared_fps in m["parts"]:
                if kind == "text":
                    text += value
                    continue
                text += MEDIA_TOKENS[kind]
                declared_fps = declared_fps or options.get("video_fps")
                new = (self._image_items(value, cfg, single=n_images == 1) if kind == "image"
                       else [self._video_item(value, cfg, declared_fps)])
                if kind == "image" and n_images == 1 and cfg.image_aspect_ratio == "dynamic":
                    # NVILA-Lite: each tile is its own medium, each placeholder followed by "\n".
                    text = text[: -len(MEDIA_TOKENS["image"])] + (MEDIA_TOKENS["image"] + "\n") * len(new)
                items.extend(new)
            rendered.append({"role": m["role"], "content": text.strip()})
        prompt = self.tokenizer.apply_chat_template(rendered, chat_template=self.chat_template, tokenize=False,
                                                    add_generation_prompt=add_generation_prompt)
        return prompt, items

    def _encode(self, conversation, add_generation_prompt: bool, options: dict) -> tuple[list[int], list[_Item]]:
        prompt, items = self._render(conversation, add_generation_prompt, options)
        ids = self.tokenizer(prompt, add_special_tokens=False).input_ids
        queues = {self.ids.image: deque(it for it in items if it.kind == "image"),
                  self.ids.video: deque(it for it in items if it.kind == "video")}
        out: list[int] = []
        for t in ids:
            if t in queues:
                if not queues[t]:
                    raise ValueError("the prompt has more media placeholders than media")
                out.extend(queues[t].popleft().ids)
            else:
                out.append(t)
        if any(queues.values()):
            raise ValueError("the prompt has fewer media placeholders than media")
        return out, items

    def _image_items(self, source: Any, cfg: NVILAConfig, *, single: bool) -> list[_Item]:
        image = media_io.load_image(source, max_pixels=self.max_pixels)
        digest = _digest([image], _settings(cfg, single))
        with self._image_cache_lock:
            items = self._image_cache.get(digest)
            if items is not None:
                self._image_cache.move_to_end(digest)
        if items is None:
            items = self._tile_image(image, cfg, single, digest)
            self._remember(digest, items)
        name = _describe(source)
        return [replace(it, info=replace(it.info, source=name)) for it in items]

    def _tile_image(self, image, cfg: NVILAConfig, single: bool, digest: str) -> list[_Item]:
        tile = cfg.vision.image_size
        tiles, block = _tiles(image, cfg, single=single)
        per_tile = tokens_per_tile(cfg.projector_type, cfg.vision.grid)
        pixels = tiling.to_pixels(tiles, tile, cfg.image_mean, cfg.image_std)  # (n, 3, S, S)
        if block is not None:
            n = per_tile * _num_blocks(cfg, block)
            ids = self._image_start + [self.ids.image] * n + self._image_end
            info = MediumInfo("image", "", len(ids), n, len(tiles), block_size=block, digest=digest)
            return [_Item("image", pixels, block, ids, info)]
        out = []
        for i in range(len(tiles)):  # each tile is its own medium, with its own digest; pixels are views
            ids = self._image_start + [self.ids.image] * per_tile + self._image_end
            tile_digest = hashlib.sha1(f"{digest}/{i}".encode()).hexdigest()
            info = MediumInfo("image", "", len(ids), per_tile, 1, digest=tile_digest)
            out.append(_Item("image", pixels[i:i + 1], None, ids, info))
        return out

    def _remember(self, digest: str, items: list[_Item]) -> None:
        """Keep ``items`` (their pixels are shared with callers: never written) within the byte bound."""
        size = _nbytes(items)
        if size > self._image_cache_limit:
            return
        with self._image_cache_lock:
            if digest in self._image_cache:
                return
            self._image_cache[digest] = items
            self._image_cache_bytes += size
            while self._image_cache_bytes > self._image_cache_limit:
                _, old = self._image_cache.popitem(last=False)
                self._image_cache_bytes -= _nbytes(old)

    def _video_item(self, source: Any, cfg: NVILAConfig, declared_fps: float | None = None) -> _Item:
        video = media_io.load_video(source, num_frames=cfg.num_video_frames, fps=cfg.fps, max_pixels=self.max_pixels)
        tile = cfg.vision.image_size
        frames = [_tiles(f, cfg, single=False)[0][0] for f in video.frames]
        per_frame = tokens_per_tile(cfg.projector_type, cfg.vision.grid)
        layout = video_layout(len(frames), per_frame, cfg.video_encoder)
        ids: list[int] = []
        for n_frames, n_tokens in layout:
            for _ in range(n_frames):
                ids += self._video_start + [self.ids.video] * n_tokens + self._video_end
            ids += self._video_sep
        n_visual = sum(t * n for t, n in layout)
        info = MediumInfo("video", _describe(source), len(ids), n_visual, len(frames), frame_indices=list(video.indices),
                          duration_s=video.duration(declared_fps),
                          digest=_digest(video.frames, _settings(cfg, False) + (repr(cfg.video_encoder),)))
        return _Item("video", tiling.to_pixels(frames, tile, cfg.image_mean, cfg.image_std), None, ids, info)


def _tiles(image, cfg: NVILAConfig, *, single: bool):
    """One image -> its tiles and block size under the config's ``image_aspect_ratio`` (spec §4)."""
    fill = tuple(int(255 * m) for m in cfg.image_mean)  # the reference pads with the mean colour
    return tiling.preprocess_image(image, cfg.image_aspect_ratio, tile=cfg.vision.image_size, scales=cfg.s2_scales,
                                   min_tiles=cfg.min_tiles, max_tiles=cfg.max_tiles, single=single, fill=fill)


def _concat(tensors: list[torch.Tensor]) -> torch.Tensor:
    """``torch.cat`` along dim 0, or a view when the tensors already lie back to back in one storage (the
    tiles of one cached image): the result may share memory with the processor's cache, read it only."""
    first = tensors[0]
    step = first[0].numel() * first.element_size()
    ptr, rows = first.data_ptr(), 0
    for t in tensors:
        if not t.is_contiguous() or t.untyped_storage().data_ptr() != first.untyped_storage().data_ptr() \
                or t.data_ptr() != ptr + rows * step or t.shape[1:] != first.shape[1:]:
            return torch.cat(tensors)
        rows += t.shape[0]
    return first.as_strided((rows, *first.shape[1:]), first.stride())


def _nbytes(items: list[_Item]) -> int:
    """Bytes of the items' pixels (the views of one image's tiles add up to their tensor)."""
    return sum(it.pixels.numel() * it.pixels.element_size() for it in items)


def _settings(cfg: NVILAConfig, single: bool) -> tuple:
    """The config fields that turn a decoded image into pixels and a token block."""
    return (cfg.image_aspect_ratio, cfg.vision.image_size, cfg.s2_scales, cfg.min_tiles, cfg.max_tiles,
            cfg.image_mean, cfg.image_std, cfg.projector_type, cfg.vision.grid, single)


def _digest(images, settings: tuple) -> str:
    """Hex SHA-1 of decoded RGB images (sizes and bytes) and the preprocessing settings that turn them
    into features: two media with equal digests give equal pixels and token blocks."""
    h = hashlib.sha1(repr(settings).encode())
    for im in images:
        h.update(f"{im.mode}{im.size}".encode())
        h.update(im.tobytes())
    return h.hexdigest()


def _describe(source: Any) -> str:
    if isinstance(source, (str, os.PathLike)):
        s = os.fspath(source)
        return s if not s.startswith("data:") else s[:32] + "..."
    if isinstance(source, (list, tuple)):
        return f"<{len(source)} frames>"
    return f"<{type(source).__name__}>"


def _normalise(conversation) -> list[dict]:
    """Messages -> [{"role", "parts": [(kind, value), ...] | None}] with kinds text/image/video."""
    if not isinstance(conversation, (list, tuple)) or not conversation:
        raise ValueError("a conversation must be a non-empty list of messages")
    out = []
    for i, m in enumerate(conversation):
        if not isinstance(m, dict) or "role" not in m:
            raise ValueError(f"message {i} must be a dict with 'role' and 'content'")
        role = {"human": "user", "gpt": "assistant"}.get(m["role"], m["role"])
        if role not in ("system", "user", "assistant"):
            raise ValueError(f"message {i} has unknown role {m['role']!r}; valid: system, user, assistant")
        content = m.get("content")
        if content is None:
            out.append({"role": role, "parts": None})
            continue
        if isinstance(content, str):
            content = [{"type": "text", "text": content}]
        parts = []
        for part in content:
            parts.append(_part(part, i))
        out.append({"role": role, "parts": parts})
    return out


def _part(part: Any, i: int) -> tuple[str, Any, float | None]:
    """A content part -> (kind, value, declared frame rate of a frame-directory video or None)."""
    if isinstance(part, str):
        part = {"type": "text", "text": part}
    if not isinstance(part, dict) or "type" not in part:
        raise ValueError(f"message {i}: each content part must be a dict with a 'type'")
    kind = part["type"]
    if kind == "text":
        text = part.get("text", "")
        for token in MEDIA_TOKENS.values():
            if token in text:
                logger.warning("removing a literal %s from the text: media go in their own content parts", token)
                text = text.replace(token, "").strip()
        return "text", text, None
    fps = part.get("fps") if kind in ("video", "video_url") else None
    if fps is not None and (isinstance(fps, bool) or not isinstance(fps, (int, float)) or not fps > 0):
        raise ValueError(f"message {i}: a video part's fps (the frame rate of its frames) must be > 0, got {fps!r}")
    if kind in ("image", "video"):
        for key in (kind, "url", "path"):
            if part.get(key) is not None:
                return kind, part[key], fps
        raise ValueError(f"message {i}: {kind} part has no '{kind}' value")
    if kind in ("image_url", "video_url"):
        value = part.get(kind)
        url = value.get("url") if isinstance(value, dict) else value
        if not url:
            raise ValueError(f"message {i}: {kind} part has no url")
        return kind.split("_")[0], url, fps
    raise ValueError(f"message {i}: unknown content part type {kind!r}; valid: text, image, video, image_url, video_url")
