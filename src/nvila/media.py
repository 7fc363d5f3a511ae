"""Decoding of user media: files, bytes, data URLs and arrays into RGB images and video frames.

This is the only module that reads media. Every bad input (missing, empty, corrupt, unsupported,
too large) raises :class:`MediaError` with a one-line message that names the input. Images come
back fully decoded and converted with ``.convert("RGB")`` exactly as the reference does (alpha is
dropped, not composited; no EXIF rotation). Videos are frame directories, lists of images, or files
decoded with PyAV (the ``[video]`` extra, imported only when a video file is read); frames are
sampled as the reference's ``_load_video`` does (spec §9.1).

This module knows nothing about tiling, tokens or models, and it never fetches remote URLs: an
``http(s)://`` source is an error here, and fetching is the server's decision.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import glob
import io
import logging
import os
from dataclasses import dataclass
from typing import Any, Iterator, Sequence

import numpy as np
from PIL import Image, UnidentifiedImageError

logger = logging.getLogger(__name__)

DEFAULT_MAX_PIXELS = 100_000_000


class MediaError(ValueError):
    """A media input cannot be used: missing, empty, corrupt, unsupported or over the size limit."""


def _reason(e: BaseException) -> str:
    """The first line of an exception's message (library messages can span lines)."""
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


def _check_pixels(size: tuple[int, int], name: str, max_pixels: int) -> None:
    w, h = size
    if w * h > max_pixels:
        raise MediaError(f"{name}: {w}x{h} = {w * h} pixels is over the limit of {max_pixels} pixels")


def _check_file(path: str) -> None:
    if not os.path.exists(path):
        raise MediaError(f"{path}: no such file")
    if os.path.isdir(path):
        raise MediaError(f"{path}: is a directory, not a file")
    if os.path.getsize(path) == 0:
        raise MediaError(f"{path}: empty file (0 bytes)")


# ------------------------------------------------------------------------------------ images
def _decode_image(fp: Any, name: str, max_pixels: int) -> Image.Image:
    """Open lazily, check the header size against the limit, then decode and convert to RGB."""
    try:
        with Image.open(fp) as im:
            _check_pixels(im.size, name, max_pixels)
            im.load()
            mode = im.mode
            try:
                return im.convert("RGB")
            except ValueError:
                raise MediaError(f"{name}: image mode {mode} cannot be converted to RGB") from None
    except MediaError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise MediaError(f"{name}: rejected by Pillow's decompression-bomb guard ({_reason(e)})") from None
    except UnidentifiedImageError:
        raise MediaError(f"{name}: not an image in a supported format") from None
    except Exception as e:  # noqa: BLE001 - any decoder failure on untrusted bytes is a bad input
        raise MediaError(f"{name}: corrupt or undecodable image ({_reason(e)})") from None


def _data_url_bytes(url: str) -> tuple[bytes, str]:
    """Payload of a ``data:image/...;base64,...`` URL, and a short name for messages."""
    head, sep, payload = url.partition(",")
    name = f"{head[:64]},..."
    if not sep:
        raise MediaError(f"{name}: bad data URL (no ',' before the payload)")
    mime, *params = head[len("data:"):].lower().split(";")
    if not mime.startswith("image/"):
        raise MediaError(f"{name}: bad data URL (media type {mime or 'missing'!r} is not image/*)")
    if "base64" not in params:
        raise MediaError(f"{name}: bad data URL (only base64 payloads are supported)")
    try:
        data = base64.b64decode("".join(payload.split()), validate=True)
    except (binascii.Error, ValueError):
        raise MediaError(f"{name}: bad data URL (payload is not valid base64)") from None
    if not data:
        raise MediaError(f"{name}: bad data URL (empty payload)")
    return data, name


def _image_from_array(arr: np.ndarray, max_pixels: int) -> Image.Image:
    name = f"<array {arr.shape} {arr.dtype}>"
    if arr.dtype != np.uint8:
        raise MediaError(f"{name}: image arrays must be uint8")
    if not (arr.ndim == 2 or (arr.ndim == 3 and arr.shape[2] in (3, 4))):
        raise MediaError(f"{name}: image arrays must be HxW, HxWx3 or HxWx4")
    if arr.shape[0] == 0 or arr.shape[1] == 0:
        raise MediaError(f"{name}: empty image")
    _check_pixels((arr.shape[1], arr.shape[0]), name, max_pixels)
    return Image.fromarray(np.ascontiguousarray(arr)).convert("RGB")


def _is_remote(src: str) -> bool:
    return src[:8].lower().startswith(("http://", "https://"))


def load_image(src: Any, *, max_pixels: int = DEFAULT_MAX_PIXELS) -> Image.Image:
    """Decode one image into a fully loaded RGB ``PIL.Image``.

    Args:
        src: A path (``str`` / ``os.PathLike``), raw encoded bytes, a ``data:image/...;base64,...``
            URL, a ``PIL.Image.Image``, or a uint8 numpy array (HxW, HxWx3 or HxWx4).
        max_pixels: Largest ``width * height`` accepted, checked from the header before decoding.

    Returns:
        The image after ``.convert("RGB")`` (a new image, also for RGB inputs).

    Raises:
        MediaError: The input is missing, empty, corrupt, not an image, over ``max_pixels``, a remote
            URL, or of an unsupported type.
    """
    if isinstance(src, Image.Image):
        _check_pixels(src.size, "<PIL image>", max_pixels)
        try:
            return src.convert("RGB")
        except Exception as e:  # noqa: BLE001 - a lazily opened image may fail to decode here
            raise MediaError(f"<PIL image>: cannot be converted to RGB ({_reason(e)})") from None
    if isinstance(src, np.ndarray):
        return _image_from_array(src, max_pixels)
    if isinstance(src, (bytes, bytearray, memoryview)):
        data = bytes(src)
        if not data:
            raise MediaError("<bytes>: empty input (0 bytes)")
        return _decode_image(io.BytesIO(data), f"<{len(data)} bytes>", max_pixels)
    if isinstance(src, str) and _is_remote(src):
        raise MediaError(f"{src[:200]}: remote URLs are not fetched by the library; download the file "
                         f"(the server decides whether to fetch URLs)")
    if isinstance(src, str) and src[:5].lower() == "data:":
        data, name = _data_url_bytes(src)
        return _decode_image(io.BytesIO(data), name, max_pixels)
    if isinstance(src, (str, os.PathLike)):
        path = os.fsdecode(src)
        _check_file(path)
        try:
            f = open(path, "rb")
        except OSError as e:
            raise MediaError(f"{path}: cannot be read ({_reason(e)})") from None
        with f:
            return _decode_image(f, path, max_pixels)
    raise MediaError(f"<{type(src).__name__}>: unsupported image source type; expected a path, bytes, a data "
                     f"URL, a PIL image or a uint8 numpy array")


# ------------------------------------------------------------------------------------ frame sampling
def sample_frame_indices(n_frames: int, num_frames: int) -> list[int]:
    """Evenly spaced frame indices, as ``np.round(np.linspace(0, n - 1, num_frames))``.

    numpy rounds half to even; when ``num_frames > n_frames`` indices repeat.

    Args:
        n_frames: Frames available.
        num_frames: Frames wanted.

    Returns:
        ``num_frames`` indices in ``[0, n_frames - 1]``, non-decreasing.
    """
    if n_frames < 1 or num_frames < 1:
        raise ValueError(f"need n_frames >= 1 and num_frames >= 1, got {n_frames}, {num_frames}")
    return np.round(np.linspace(0, n_frames - 1, num_frames)).astype(int).tolist()


def sample_frame_indices_by_fps(n_frames: int, video_fps: float, fps: float, max_frames: int) -> list[int]:
    """Frame indices at a fixed sampling rate (reference HEAD ``_load_video`` with ``fps > 0``).

    Timestamps are ``np.arange(0, n_frames / video_fps, 1 / fps)[:max_frames]``; a timestamp ``t``
    maps to frame ``int(t * video_fps)``, clipped to the last frame.

    Args:
        n_frames: Frames available.
        video_fps: Frame rate of the source.
        fps: Sampling rate.
        max_frames: Most frames returned.

    Returns:
        At most ``max_frames`` indices in ``[0, n_frames - 1]``.
    """
    if n_frames < 1 or max_frames < 1 or video_fps <= 0 or fps <= 0:
        raise ValueError(f"need n_frames, max_frames >= 1 and video_fps, fps > 0; got {n_frames}, {max_frames}, "
                         f"{video_fps}, {fps}")
    times = np.arange(0, n_frames / video_fps, 1 / fps)[:max_frames]
    return [min(int(t * video_fps), n_frames - 1) for t in times]


# ------------------------------------------------------------------------------------ videos
@dataclass
class Video:
    """Frames sampled from a video, with where they came from."""

    frames: list[Image.Image]  # RGB, in sampling order (a repeated index repeats the frame)
    indices: list[int]  # index of each frame among the source's frames
    num_source_frames: int
    source_fps: float | None  # None for frame directories and lists of images
    source: str

    def duration(self, declared_fps: float | None = None) -> float | None:
        """Seconds the source spans: its frames over its frame rate (the container's, else
        ``declared_fps`` for frame directories); None when neither is known."""
        fps = self.source_fps or declared_fps
        return self.num_source_frames / fps if fps else None


def _video_from_images(items: Sequence[Any], source: str, num_frames: int, fps: float,
                       max_pixels: int) -> Video:
    if fps > 0:
        logger.warning("%s: image frames have no frame rate; fps=%s is ignored and %d frames are sampled "
                       "evenly", source, fps, num_frames)
    indices = sample_frame_indices(len(items), num_frames)
    decoded = {i: load_image(items[i], max_pixels=max_pixels) for i in dict.fromkeys(indices)}
    return Video([decoded[i] for i in indices], indices, len(items), None, source)


# FFmpeg demuxers that render text as pictures (``tty`` opens .txt/.nfo files as ANSI art).
_TEXT_DEMUXERS = frozenset({"tty"})


def _import_av() -> Any:
    try:
        import av
    except ImportError:
        raise MediaError("reading video files needs PyAV: pip install 'nvila[video]'") from None
    return av


def _iter_frames(av: Any, path: str, max_pixels: int) -> Iterator[tuple[int, Any, float | None]]:
    """Yield ``(k, frame, stream fps)`` for every decodable frame; ``k`` counts decoded frames."""
    try:
        container = av.open(path)
    except (av.FFmpegError, OSError, UnicodeDecodeError) as e:
        raise MediaError(f"{path}: not a video file that FFmpeg can read ({_reason(e)})") from None
    try:
        if container.format.name in _TEXT_DEMUXERS:
            raise MediaError(f"{path}: is a text file, not a video")
        if not container.streams.video:
            raise MediaError(f"{path}: has no video stream (not a video file)")
        stream = container.streams.video[0]
        stream.thread_type = "AUTO"
        rate = stream.average_rate or stream.guessed_rate
        rate = float(rate) if rate else None
        ctx = stream.codec_context
        if ctx.width and ctx.height:
            _check_pixels((ctx.width, ctx.height), path, max_pixels)
        packets = container.demux(stream)
        k = 0
        while True:
            try:
                packet = next(packets)
            except StopIteration:
                break
            except av.FFmpegError as e:
                logger.warning("%s: demuxing stopped after %d frames (%s)", path, k, _reason(e))
                break
            try:
                decoded = packet.decode()
            except av.FFmpegError as e:
                logger.debug("%s: skipped an undecodable packet (%s)", path, _reason(e))
                continue
            for frame in decoded:
                _check_pixels((frame.width, frame.height), path, max_pixels)
                yield k, frame, rate
                k += 1
    finally:
        container.close()


def _decode_video_file(path: str, num_frames: int, fps: float, max_pixels: int) -> Video:
    av = _import_av()
    count, rate = 0, None
    for _, _, rate in _iter_frames(av, path, max_pixels):  # pass 1: count the decodable frames
        count += 1
    if count == 0:
        raise MediaError(f"{path}: no decodable video frames")
    if fps > 0 and rate:
        indices = sample_frame_indices_by_fps(count, rate, fps, num_frames)
    else:
        if fps > 0:
            logger.warning("%s: the stream has no frame rate; sampling %d frames evenly", path, num_frames)
        indices = sample_frame_indices(count, num_frames)
    wanted = set(indices)
    kept: dict[int, Image.Image] = {}
    # Pass 2: keep only the sampled frames, so a long video is never held in memory.
    with contextlib.closing(_iter_frames(av, path, max_pixels)) as frames:
        for k, frame, _ in frames:
            if k in wanted:
                kept[k] = frame.to_image().convert("RGB")
                if len(kept) == len(wanted):
                    break
    missing = sorted(wanted - kept.keys())
    if missing:
        logger.warning("%s: frames %s could not be decoded again and are skipped", path, missing)
        indices = [i for i in indices if i in kept]
    if not indices:
        raise MediaError(f"{path}: no decodable video frames")
    return Video([kept[i] for i in indices], indices, count, rate, path)


def load_video(src: Any, *, num_frames: int, fps: float = 0.0, max_pixels: int = DEFAULT_MAX_PIXELS) -> Video:
    """Sample frames from a video file, a frame directory or a list of images.

    A directory's frames are its regular, non-hidden files in sorted name order
    (``sorted(glob(dir/*))``); a list's frames are its items (anything :func:`load_image` accepts).
    Both are sampled evenly (``fps`` is ignored with a warning: they have no frame rate). A video file
    is decoded with PyAV: its decodable frames are counted, then sampled evenly over
    ``[0, count - 1]``, or at ``fps`` frames per second of the stream (at most ``num_frames``) when
    ``fps > 0``. A sampled index that repeats is decoded once.

    Args:
        src: A directory, a video file path (mp4, webm, mkv, avi, mov, gif, ...), or a list/tuple of
            images.
        num_frames: Frames to sample (the most frames when ``fps > 0``).
        fps: Sampling rate for video files; ``0`` samples ``num_frames`` evenly.
        max_pixels: Largest ``width * height`` of one frame.

    Returns:
        The sampled RGB frames and their source indices.

    Raises:
        MediaError: The source is missing, empty, not a video, has no decodable frames, has a frame
            over ``max_pixels``, is a remote URL, or PyAV is missing for a video file.
        ValueError: ``num_frames < 1``.
    """
    if num_frames < 1:
        raise ValueError(f"num_frames must be >= 1, got {num_frames}")
    if isinstance(src, (list, tuple)):
        if not src:
            raise MediaError("<frame list>: empty list of frames")
        return _video_from_images(src, f"<list of {len(src)} frames>", num_frames, fps, max_pixels)
    if isinstance(src, str) and _is_remote(src):
        raise MediaError(f"{src[:200]}: remote URLs are not fetched by the library; download the file "
                         f"(the server decides whether to fetch URLs)")
    if isinstance(src, (str, os.PathLike)):
        path = os.fsdecode(src)
        if os.path.isdir(path):
            files = [f for f in sorted(glob.glob(os.path.join(glob.escape(path), "*"))) if os.path.isfile(f)]
            if not files:
                raise MediaError(f"{path}: frame directory contains no files")
            return _video_from_images(files, path, num_frames, fps, max_pixels)
        _check_file(path)
        return _decode_video_file(path, num_frames, fps, max_pixels)
    raise MediaError(f"<{type(src).__name__}>: unsupported video source type; expected a video file, a frame "
                     f"directory or a list of images")
