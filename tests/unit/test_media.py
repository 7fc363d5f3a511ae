"""Media decoding: image formats and sources, frame sampling, video files, and every MediaError case."""

from __future__ import annotations

import base64
import io
import struct
import warnings
import wave
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from nvila.media import (
    DEFAULT_MAX_PIXELS,
    MediaError,
    Video,
    load_image,
    load_video,
    sample_frame_indices,
    sample_frame_indices_by_fps,
)

av = pytest.importorskip("av")


def _rgb(w: int = 16, h: int = 12) -> np.ndarray:
    """A deterministic (h, w, 3) uint8 gradient."""
    y, x = np.mgrid[0:h, 0:w]
    return np.stack([x * 255 // max(w - 1, 1), y * 255 // max(h - 1, 1), (x + y) % 256], -1).astype(np.uint8)


def _png_bytes(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def _png_header_only(width: int, height: int) -> bytes:
    """A PNG whose header claims ``width x height`` but carries no pixel data."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b"")


def _write_mp4(path: Path, n: int = 30, rate: int = 30) -> None:
    """``n`` 64x48 frames; frame k is a flat grey of level 8k."""
    codec = "mpeg4" if "mpeg4" in av.codecs_available else "libx264"
    with av.open(str(path), "w") as container:
        stream = container.add_stream(codec, rate=rate)
        stream.width, stream.height, stream.pix_fmt = 64, 48, "yuv420p"
        for k in range(n):
            frame = av.VideoFrame.from_ndarray(np.full((48, 64, 3), 8 * k, np.uint8), format="rgb24")
            container.mux(stream.encode(frame))
        container.mux(stream.encode())


# ------------------------------------------------------------------------------------ images
@pytest.mark.parametrize("fmt, suffix", [("PNG", "png"), ("WEBP", "webp")])
def test_lossless_formats_roundtrip(tmp_path, fmt, suffix):
    arr = _rgb()
    path = tmp_path / f"x.{suffix}"
    Image.fromarray(arr).save(path, format=fmt, **({"lossless": True} if fmt == "WEBP" else {}))
    out = load_image(path)
    assert out.mode == "RGB" and out.size == (16, 12)
    np.testing.assert_array_equal(np.asarray(out), arr)
    assert np.array_equal(np.asarray(load_image(str(path))), arr)


def test_jpeg(tmp_path):
    arr = _rgb(32, 24)
    Image.fromarray(arr).save(tmp_path / "x.jpg", quality=95)
    out = load_image(tmp_path / "x.jpg")
    assert out.mode == "RGB" and out.size == (32, 24)
    assert np.abs(np.asarray(out).astype(int) - arr).mean() < 8


def test_rgba_alpha_is_dropped_not_composited(tmp_path):
    rgba = np.zeros((4, 4, 4), np.uint8)
    rgba[..., 0] = 200
    rgba[..., 3] = 0  # fully transparent: compositing on white would give (255, 255, 255)
    Image.fromarray(rgba).save(tmp_path / "a.png")
    assert load_image(tmp_path / "a.png").getpixel((1, 1)) == (200, 0, 0)
    assert load_image(rgba).getpixel((1, 1)) == (200, 0, 0)


def test_grayscale_palette_and_16bit(tmp_path):
    Image.new("L", (5, 5), 77).save(tmp_path / "l.png")
    assert load_image(tmp_path / "l.png").getpixel((0, 0)) == (77, 77, 77)

    pal = Image.new("P", (5, 5), 1)
    pal.putpalette([0, 0, 0, 10, 20, 30] + [0] * 762)
    pal.save(tmp_path / "p.png")
    assert load_image(tmp_path / "p.png").getpixel((2, 2)) == (10, 20, 30)

    deep = np.full((6, 6), 40000, np.uint16)
    Image.fromarray(deep).save(tmp_path / "d.png")
    with Image.open(tmp_path / "d.png") as im:
        assert im.mode.startswith("I")
        expected = im.convert("RGB").getpixel((0, 0))  # Pillow clips 16-bit values, as the reference does
    assert load_image(tmp_path / "d.png").getpixel((0, 0)) == expected


def test_bytes_data_url_and_pil_sources():
    image = Image.fromarray(_rgb())
    raw = _png_bytes(image)
    for src in (raw, bytearray(raw), "data:image/png;base64," + base64.b64encode(raw).decode()):
        np.testing.assert_array_equal(np.asarray(load_image(src)), _rgb())
    gray = Image.new("L", (3, 3), 9)
    out = load_image(gray)
    assert out.mode == "RGB" and out is not gray and out.getpixel((0, 0)) == (9, 9, 9)


@pytest.mark.parametrize("shape", [(6, 7), (6, 7, 3), (6, 7, 4)])
def test_numpy_sources(shape):
    arr = np.arange(np.prod(shape), dtype=np.uint8).reshape(shape)
    out = load_image(arr)
    assert out.mode == "RGB" and out.size == (7, 6)
    expected = np.repeat(arr[..., None], 3, -1) if arr.ndim == 2 else arr[..., :3]
    np.testing.assert_array_equal(np.asarray(out), expected)


# ------------------------------------------------------------------------------------ image errors
def test_image_errors_name_the_input(tmp_path):
    (tmp_path / "empty.png").write_bytes(b"")
    (tmp_path / "notes.txt").write_text("not an image\n")
    corrupt = _png_bytes(Image.fromarray(_rgb(64, 64)))
    (tmp_path / "broken.png").write_bytes(corrupt[: len(corrupt) // 2])
    cases = {
        tmp_path / "missing.png": "no such file",
        tmp_path / "empty.png": "empty file",
        tmp_path / "notes.txt": "not an image",
        tmp_path / "broken.png": "corrupt",
        tmp_path: "is a directory",
    }
    for path, what in cases.items():
        with pytest.raises(MediaError, match=what) as info:
            load_image(path)
        message = str(info.value)
        assert str(path) in message and "\n" not in message
        assert info.value.__cause__ is None
        assert info.value.__context__ is None or info.value.__suppress_context__


def test_audio_file_is_not_an_image(tmp_path):
    with wave.open(str(tmp_path / "a.wav"), "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(8000)
        w.writeframes(b"\0\0" * 800)
    with pytest.raises(MediaError, match="a.wav: not an image"):
        load_image(tmp_path / "a.wav")


@pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")
def test_pixel_limit_checked_before_decoding(tmp_path):
    Image.new("RGB", (100, 100)).save(tmp_path / "big.png")
    with pytest.raises(MediaError, match=r"big.png: 100x100 = 10000 pixels is over the limit of 9999"):
        load_image(tmp_path / "big.png", max_pixels=9999)
    assert load_image(tmp_path / "big.png", max_pixels=10000).size == (100, 100)
    # The header alone claims 12000x9000 (no pixel data): rejected without decoding anything.
    with pytest.raises(MediaError, match="over the limit"):
        load_image(_png_header_only(12000, 9000), max_pixels=DEFAULT_MAX_PIXELS)
    with pytest.raises(MediaError, match="over the limit"):
        load_image(np.zeros((10, 10), np.uint8), max_pixels=99)


def test_pillow_decompression_bomb_becomes_media_error():
    # 20000² pixels is past Pillow's own hard limit (2 x Image.MAX_IMAGE_PIXELS), which fires in open().
    with pytest.raises(MediaError, match="decompression-bomb guard"):
        load_image(_png_header_only(20000, 20000), max_pixels=10**12)
    # Pillow's warning (past Image.MAX_IMAGE_PIXELS), when warnings are errors, is a MediaError too.
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        with pytest.raises(MediaError, match="decompression-bomb guard"):
            load_image(_png_header_only(12000, 9000), max_pixels=10**12)


@pytest.mark.parametrize(
    "src, what",
    [
        ("https://example.com/cat.png", "remote URLs are not fetched"),
        ("data:image/png;base64", "no ','"),
        ("data:text/plain;base64,aGk=", "not image"),
        ("data:image/png,rawdata", "only base64"),
        ("data:image/png;base64,@@@", "not valid base64"),
        ("data:image/png;base64,aGVsbG8=", "not an image"),
        (b"", "empty input"),
        (np.zeros((4, 4), np.float32), "uint8"),
        (np.zeros((4, 4, 2), np.uint8), "HxW"),
        (12345, "unsupported image source"),
    ],
)
def test_bad_sources(src, what):
    with pytest.raises(MediaError, match=what):
        load_image(src)


# ------------------------------------------------------------------------------------ sampling
@pytest.mark.parametrize("n, k", [(37, 8), (37, 16), (10, 4), (5, 9), (1, 3), (100, 1)])
def test_sample_frame_indices_is_numpy_round_linspace(n, k):
    assert sample_frame_indices(n, k) == np.round(np.linspace(0, n - 1, k)).astype(int).tolist()


def test_sample_frame_indices_rounds_half_to_even():
    # linspace(0, 9, 7) hits 1.5, 4.5 and 7.5: half-to-even gives 2, 4, 8 (not 2, 5, 8).
    assert sample_frame_indices(10, 7) == [0, 2, 3, 4, 6, 8, 9]
    assert sample_frame_indices(3, 5) == [0, 0, 1, 2, 2]
    with pytest.raises(ValueError):
        sample_frame_indices(0, 4)


def test_sample_frame_indices_by_fps():
    assert sample_frame_indices_by_fps(30, 30.0, 4.0, 100) == [0, 7, 15, 22]
    assert sample_frame_indices_by_fps(30, 30.0, 4.0, 2) == [0, 7]
    assert sample_frame_indices_by_fps(10, 2.0, 1.0, 100) == [0, 2, 4, 6, 8]
    assert sample_frame_indices_by_fps(3, 1.0, 10.0, 100)[-1] == 2  # clipped to the last frame


# ------------------------------------------------------------------------------------ videos
def _frame_dir(tmp_path: Path, n: int) -> Path:
    d = tmp_path / "frames"
    d.mkdir()
    for k in range(n):
        Image.new("L", (8, 6), k).save(d / f"f_{k:03d}.png")
    (d / ".hidden.png").write_bytes(b"junk")  # glob("*") skips hidden files
    (d / "sub").mkdir()  # not a regular file
    return d


@pytest.mark.parametrize("k", [8, 16])
def test_frame_directory(tmp_path, k):
    video = load_video(_frame_dir(tmp_path, 37), num_frames=k)
    expected = np.round(np.linspace(0, 36, k)).astype(int).tolist()
    assert isinstance(video, Video)
    assert video.indices == expected and video.num_source_frames == 37 and video.source_fps is None
    assert [f.getpixel((0, 0)) for f in video.frames] == [(i, i, i) for i in expected]
    assert all(f.mode == "RGB" for f in video.frames)


def test_frame_list_repeats_duplicates_and_ignores_fps(tmp_path, caplog):
    items = [np.full((4, 4), 10 * k, np.uint8) for k in range(3)]
    video = load_video(items, num_frames=5, fps=2.0)
    assert video.indices == [0, 0, 1, 2, 2]
    assert video.frames[0] is video.frames[1]
    assert [f.getpixel((0, 0))[0] for f in video.frames] == [0, 0, 10, 20, 20]
    assert "fps=2.0 is ignored" in caplog.text


def test_mp4_count_based(tmp_path):
    _write_mp4(tmp_path / "v.mp4")
    video = load_video(tmp_path / "v.mp4", num_frames=8)
    assert video.num_source_frames == 30 and video.source_fps == pytest.approx(30.0)
    assert video.indices == np.round(np.linspace(0, 29, 8)).astype(int).tolist()
    assert len(video.frames) == 8 and all(f.mode == "RGB" and f.size == (64, 48) for f in video.frames)
    levels = [np.asarray(f).mean() for f in video.frames]
    assert all(abs(m - 8 * i) < 6 for m, i in zip(levels, video.indices))


def test_mp4_fps_based(tmp_path):
    _write_mp4(tmp_path / "v.mp4")
    video = load_video(tmp_path / "v.mp4", num_frames=100, fps=4.0)
    assert video.indices == [0, 7, 15, 22]
    assert load_video(tmp_path / "v.mp4", num_frames=2, fps=4.0).indices == [0, 7]


def test_video_pixel_limit_applies_per_frame(tmp_path):
    _write_mp4(tmp_path / "v.mp4", n=3)
    with pytest.raises(MediaError, match="over the limit"):
        load_video(tmp_path / "v.mp4", num_frames=2, max_pixels=64 * 48 - 1)
    with pytest.raises(MediaError, match="over the limit"):
        load_video(_frame_dir(tmp_path, 3), num_frames=2, max_pixels=47)


def test_video_errors_name_the_input(tmp_path):
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty.mp4").write_bytes(b"")
    (tmp_path / "notes.txt").write_text("not a video\n" * 50)
    (tmp_path / "notes.bin").write_bytes(bytes(range(256)) * 4)
    with wave.open(str(tmp_path / "a.wav"), "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(8000)
        w.writeframes(b"\0\0" * 800)
    cases = {
        tmp_path / "missing.mp4": "no such file",
        tmp_path / "empty": "contains no files",
        tmp_path / "empty.mp4": "empty file",
        tmp_path / "notes.txt": "not a video",  # FFmpeg's tty demuxer would render it as ANSI art
        tmp_path / "notes.bin": "not a video file that FFmpeg can read",
        tmp_path / "a.wav": "no video stream",
    }
    for path, what in cases.items():
        with pytest.raises(MediaError, match=what) as info:
            load_video(path, num_frames=4)
        assert str(path) in str(info.value) and "\n" not in str(info.value)
    with pytest.raises(MediaError, match="empty list"):
        load_video([], num_frames=4)
    with pytest.raises(MediaError, match="remote URLs"):
        load_video("http://example.com/v.mp4", num_frames=4)
    with pytest.raises(ValueError, match="num_frames"):
        load_video(tmp_path / "empty", num_frames=0)


def test_corrupt_frame_in_directory_names_the_frame(tmp_path):
    d = _frame_dir(tmp_path, 4)
    (d / "f_003.png").write_bytes(b"\x89PNG\r\n\x1a\nbroken")
    with pytest.raises(MediaError, match="f_003.png"):
        load_video(d, num_frames=4)


def _damage_mdat(src: Path, dst: Path, fill: int | None) -> None:
    """Copy an MP4 (moov written last) with its frame data zeroed (``fill=0``) or partly inverted."""
    data = bytearray(src.read_bytes())
    start, end = data.find(b"mdat") + 4, data.find(b"moov") - 4
    assert 0 < start < end
    if fill is None:
        third = start + (end - start) // 3
        data[third:third + 200] = bytes(b ^ 0xFF for b in data[third:third + 200])
    else:
        data[start:end] = bytes([fill]) * (end - start)
    dst.write_bytes(bytes(data))


def test_video_without_decodable_frames(tmp_path):
    _write_mp4(tmp_path / "v.mp4", n=10)
    _damage_mdat(tmp_path / "v.mp4", tmp_path / "blank.mp4", fill=0)
    with pytest.raises(MediaError, match="blank.mp4: no decodable video frames"):
        load_video(tmp_path / "blank.mp4", num_frames=2)


def test_video_with_damaged_frames_still_loads(tmp_path):
    _write_mp4(tmp_path / "v.mp4", n=30)
    _damage_mdat(tmp_path / "v.mp4", tmp_path / "damaged.mp4", fill=None)
    video = load_video(tmp_path / "damaged.mp4", num_frames=8)
    assert 0 < video.num_source_frames <= 30
    assert len(video.frames) == len(video.indices) == 8
    assert video.indices == sample_frame_indices(video.num_source_frames, 8)
