"""Shared helpers for the training tests: tiny checkpoints and tiny synthetic LLaVA-style data in tmp dirs.

Not a conftest.py: `conftest` is a module name other test directories import from, so fixtures live
here and test modules import them by name.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from PIL import Image, ImageDraw

COLOURS = {"red": (220, 30, 30), "green": (30, 180, 60), "blue": (40, 60, 220), "yellow": (230, 210, 40)}
SHAPES = ("circle", "square")


def draw(path: Path, colour: str, shape: str, size: tuple[int, int] = (64, 48)) -> None:
    img = Image.new("RGB", size, (255, 255, 255))
    d = ImageDraw.Draw(img)
    box = (size[0] // 4, size[1] // 4, 3 * size[0] // 4, 3 * size[1] // 4)
    (d.ellipse if shape == "circle" else d.rectangle)(box, fill=COLOURS[colour])
    img.save(path)


def make_image_data(root: Path, n: int = 8, *, bad: int = 0, name: str = "shapes") -> Path:
    """``n`` image QA samples (+ ``bad`` broken ones) and a mixture YAML; returns the mixture path."""
    images = root / "images"
    images.mkdir(parents=True, exist_ok=True)
    records = []
    for i in range(n):
        colour, shape = list(COLOURS)[i % 4], SHAPES[(i // 4) % 2]
        draw(images / f"{i}.png", colour, shape)
        q = "<image>\nWhat is the colour of the shape?" if i % 2 else "Describe the image.\n<image>"
        a = f"The shape is {colour}." if i % 2 else f"A {colour} {shape} on a white background."
        turns = [{"from": "human", "value": q}, {"from": "gpt", "value": a}]
        if i % 3 == 0:
            turns += [{"from": "human", "value": "And the shape?"}, {"from": "gpt", "value": f"A {shape}."}]
        records.append({"id": i, "image": f"{i}.png", "conversations": turns})
    for j in range(bad):
        kind = j % 3
        if kind == 0:
            records.append({"image": "missing.png", "conversations": [{"from": "human", "value": "<image>hi"},
                                                                      {"from": "gpt", "value": "x"}]})
        elif kind == 1:
            (images / "corrupt.png").write_bytes(b"not a png")
            records.append({"image": "corrupt.png", "conversations": [{"from": "human", "value": "<image>hi"},
                                                                      {"from": "gpt", "value": "x"}]})
        else:
            records.append({"conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "  "}]})
    data = root / f"{name}.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    mixture = root / "mixture.yaml"
    mixture.write_text(f"datasets:\n  - name: {name}\n    path: {data.name}\n    media_root: images\n",
                       encoding="utf-8")
    return mixture


def make_video_data(root: Path, n: int = 1, frames: int = 4) -> Path:
    """``n`` video samples stored as frame directories, plus a text-only sample; returns the mixture."""
    records = []
    for i in range(n):
        clip = root / "videos" / f"clip{i}"
        clip.mkdir(parents=True, exist_ok=True)
        colour = list(COLOURS)[i % 4]
        for f in range(frames):
            draw(clip / f"{f:03d}.png", colour if f >= frames // 2 else "blue", SHAPES[f % 2], (48, 48))
        records.append({"video": f"clip{i}", "conversations": [
            {"from": "human", "value": "<video>\nWhich colour appears last?"},
            {"from": "gpt", "value": f"The last colour is {colour}."}]})
    records.append({"conversations": [{"from": "human", "value": "Name a colour."},
                                      {"from": "gpt", "value": "Red."}]})
    data = root / "videos.json"
    data.write_text(json.dumps(records), encoding="utf-8")
    mixture = root / "video_mixture.yaml"
    mixture.write_text("datasets:\n  - {name: clips, path: videos.json, media_root: videos, repeat: 1}\n",
                       encoding="utf-8")
    return mixture


@pytest.fixture(scope="session")
def tiny_ckpts(tmp_path_factory):
    """{family: path} tiny random checkpoints (nvila, nvila-lite, nvila-video) in the published layout."""
    from nvila.tiny import build_tiny_checkpoint, build_tokenizer

    root = tmp_path_factory.mktemp("tiny")
    tok = build_tokenizer()
    return {f: build_tiny_checkpoint(root / f, f, tokenizer=tok) for f in ("nvila", "nvila-lite", "nvila-video")}


@pytest.fixture(scope="session")
def image_mixture(tmp_path_factory):
    return make_image_data(tmp_path_factory.mktemp("data"), 8)


@pytest.fixture(scope="session")
def video_mixture(tmp_path_factory):
    return make_video_data(tmp_path_factory.mktemp("vdata"), n=1, frames=4)  # 1 clip + 1 text-only sample


def kill_when(proc, path: Path, lines: int, timeout: float = 120.0, *, group: bool = False) -> None:
    """SIGKILL ``proc`` (its whole process group with ``group``: torchrun and its ranks) once ``path``
    holds ``lines`` lines; fails if the process ends first."""
    import os
    import signal
    import time

    deadline = time.time() + timeout
    while time.time() < deadline and proc.poll() is None:
        if path.is_file() and len(path.read_text().splitlines()) >= lines:
            break
        time.sleep(0.02)
    assert proc.poll() is None, "the run ended before it could be killed"
    if group:
        os.killpg(proc.pid, signal.SIGKILL)
    else:
        os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
