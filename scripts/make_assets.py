#!/usr/bin/env python3
"""Generate the bundled demo/test media in ``assets/`` (deterministic, synthetic).

Outputs (all committed to the repo):

* ``assets/example.png``  -- 1000x700 RGB picture: gradient, shapes, a few words of text.
* ``assets/example.mp4``  -- 48 frames, 320x240, 12 fps (4 s), H.264 (libx264, yuv420p)
  when this PyAV build can encode it, otherwise MPEG-4 part 2. A disc moves left to right
  while changing colour, a square grows, and the background hue drifts.
* ``assets/frames/frame_000.png`` .. ``frame_011.png`` -- 12 frames, 160x120, every 4th
  frame of the same clip, for the frame-directory input path.

Usage: ``.venv/bin/python scripts/make_assets.py [--out DIR]`` (needs pillow, numpy, av).
The script re-reads the video with PyAV and checks the frame count and size.
"""

from __future__ import annotations

import argparse
import colorsys
import math
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

REPO = Path(__file__).resolve().parent.parent

VIDEO_FRAMES = 48
VIDEO_SIZE = (320, 240)  # (W, H)
VIDEO_FPS = 12
DIR_FRAMES = 12
DIR_SIZE = (160, 120)


def _font(size: int) -> ImageFont.ImageFont:
    """PIL's bundled default font (scalable when FreeType is available)."""
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1: fixed-size bitmap font
        return ImageFont.load_default()


def _rgb(h: float, s: float, v: float) -> tuple[int, int, int]:
    r, g, b = colorsys.hsv_to_rgb(h % 1.0, s, v)
    return int(round(r * 255)), int(round(g * 255)), int(round(b * 255))


# --------------------------------------------------------------------------- picture
def make_picture(width: int = 1000, height: int = 700) -> Image.Image:
    # Diagonal blue -> orange gradient background.
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    t = (x / (width - 1) * 0.6 + y / (height - 1) * 0.4)[..., None]
    a = np.array([30, 60, 140], np.float32)
    b = np.array([245, 170, 60], np.float32)
    arr = (a * (1 - t) + b * t).round().astype(np.uint8)
    img = Image.fromarray(arr, "RGB")
    d = ImageDraw.Draw(img)

    # A few shapes.
    d.rectangle((60, 80, 330, 300), fill=(220, 40, 40), outline=(255, 255, 255), width=6)
    d.ellipse((400, 120, 620, 340), fill=(40, 170, 70), outline=(0, 0, 0), width=5)
    d.polygon([(760, 320), (900, 90), (960, 330)], fill=(250, 220, 30), outline=(0, 0, 0))
    d.line((60, 380, 940, 380), fill=(255, 255, 255), width=8)
    for i in range(8):  # a row of small squares in varying hues
        x0 = 80 + i * 110
        d.rectangle((x0, 430, x0 + 70, 500), fill=_rgb(i / 8, 0.8, 0.95))
    d.pieslice((700, 520, 860, 680), start=30, end=330, fill=(150, 60, 200))

    # Text (PIL's default font).
    d.text((60, 530), "NVILA example", font=_font(56), fill=(255, 255, 255))
    d.text((60, 610), "red square, green circle, yellow triangle", font=_font(28),
           fill=(10, 10, 10))
    d.text((510, 230), "42", font=_font(64), fill=(255, 255, 255), anchor="mm")
    return img


# --------------------------------------------------------------------------- video
def video_frame(i: int, n: int = VIDEO_FRAMES, size: tuple[int, int] = VIDEO_SIZE) -> np.ndarray:
    """Frame ``i`` of the synthetic clip as an HxWx3 uint8 array."""
    w, h = size
    s = w / 320.0  # geometry is specified for 320x240 and scaled
    t = i / max(n - 1, 1)
    bg = np.empty((h, w, 3), np.uint8)
    bg[:] = _rgb(0.6 + 0.15 * t, 0.35, 0.35)  # background hue drifts
    img = Image.fromarray(bg, "RGB")
    d = ImageDraw.Draw(img)
    # Static ground stripe.
    d.rectangle((0, int(200 * s), w, h), fill=(60, 60, 60))
    # Disc moving left -> right along a small arc, changing colour red -> blue.
    cx = (30 + 260 * t) * s
    cy = (110 - 50 * math.sin(math.pi * t)) * s
    r = 26 * s
    d.ellipse((cx - r, cy - r, cx + r, cy + r), fill=_rgb(0.66 * t, 0.9, 1.0))
    # Square in the corner that grows, then a bar that fills (a clock).
    q = (10 + 30 * t) * s
    d.rectangle((w - 20 * s - q, 20 * s, w - 20 * s, 20 * s + q), fill=(240, 240, 240))
    d.rectangle((10 * s, 210 * s, (10 + 300 * t) * s, 225 * s), fill=(250, 200, 40))
    return np.asarray(img)


def _pick_codec() -> str:
    import av

    for name in ("libx264", "h264", "mpeg4"):
        if name in av.codecs_available:
            try:
                av.codec.Codec(name, "w")
                return name
            except Exception:  # not an encoder in this build
                continue
    raise SystemExit("no usable video encoder (libx264/h264/mpeg4) in this PyAV build")


def write_video(path: Path) -> str:
    import av

    codec = _pick_codec()
    w, h = VIDEO_SIZE
    # bitexact: keep library version strings out of the file so reruns give identical bytes.
    with av.open(str(path), "w", options={"fflags": "+bitexact"}) as out:
        stream = out.add_stream(codec, rate=VIDEO_FPS)
        stream.width, stream.height, stream.pix_fmt = w, h, "yuv420p"
        if codec in ("libx264", "h264"):
            stream.options = {"crf": "23", "preset": "medium", "threads": "1"}
        else:
            stream.options = {"q:v": "4", "threads": "1"}
            stream.bit_rate = 400_000
        for i in range(VIDEO_FRAMES):
            frame = av.VideoFrame.from_ndarray(video_frame(i), format="rgb24")
            for pkt in stream.encode(frame):
                out.mux(pkt)
        for pkt in stream.encode():
            out.mux(pkt)
    return codec


def verify_video(path: Path) -> tuple[int, float, str]:
    import av

    with av.open(str(path)) as inp:
        vs = inp.streams.video[0]
        n = 0
        for fr in inp.decode(vs):
            assert (fr.width, fr.height) == VIDEO_SIZE, (fr.width, fr.height)
            n += 1
        rate = float(vs.average_rate or vs.base_rate or 0)
        name = vs.codec_context.name
    if n != VIDEO_FRAMES:
        raise SystemExit(f"{path}: decoded {n} frames, expected {VIDEO_FRAMES}")
    return n, rate, name


# --------------------------------------------------------------------------- main
def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=REPO / "assets", help="output directory")
    args = ap.parse_args()
    out: Path = args.out
    (out / "frames").mkdir(parents=True, exist_ok=True)

    png = out / "example.png"
    make_picture().save(png, optimize=True)

    mp4 = out / "example.mp4"
    codec = write_video(mp4)
    n, rate, name = verify_video(mp4)

    for old in (out / "frames").glob("frame_*.png"):
        old.unlink()
    step = VIDEO_FRAMES // DIR_FRAMES
    for k in range(DIR_FRAMES):
        arr = video_frame(k * step, size=DIR_SIZE)
        Image.fromarray(arr, "RGB").save(out / "frames" / f"frame_{k:03d}.png", optimize=True)

    def kb(p: Path) -> str:
        return f"{p.stat().st_size / 1024:.1f} KB"

    print(f"{png}: 1000x700, {kb(png)}")
    print(f"{mp4}: {n} frames {VIDEO_SIZE[0]}x{VIDEO_SIZE[1]} @ {rate:g} fps, "
          f"codec {name} (encoder {codec}), {kb(mp4)}")
    total = sum(p.stat().st_size for p in (out / "frames").glob("frame_*.png")) / 1024
    print(f"{out / 'frames'}: {DIR_FRAMES} frames {DIR_SIZE[0]}x{DIR_SIZE[1]}, {total:.1f} KB total")


if __name__ == "__main__":
    main()
