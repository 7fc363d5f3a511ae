"""SynthVILA: seeded, procedurally generated image and video QA tasks (spec training.md §7.3).

Contract:

* ``generate(family, n, out_dir, seed, **size_options)`` writes ``n`` samples of one task family
  under ``out_dir``: media in ``out_dir/<family>/`` and the records in ``out_dir/<family>.jsonl``
  (returned). Media paths in the records are relative to ``out_dir``, the JSONL file's directory,
  which is the trainer's default media root (``nvila.train.data``).
* Records are LLaVA-style, as the trainer reads them::

      {"id": "fine_code-0000007", "image": "fine_code/0000007.png" | [two paths], "video": "dir",
       "conversations": [{"from": "human", "value": "<image>\\nWhat is the code in the white box?"},
                         {"from": "gpt", "value": "4719"}],
       "meta": {"family": "fine_code", "seed": 0, "index": 7, "scene": {...}}}

  One ``<image>`` marker per image (``<video>`` for the clip) leads the question; the trainer strips
  the markers and prepends the media. ``meta.scene`` is the generator's own scene description
  (shapes, code box, events) from which every answer is computed.
* Output is a pure function of ``(family, n, seed, size options)``: the same arguments give
  byte-identical JSONL and media. The image families (``fine_code`` and the ``coarse_*`` questions)
  draw scene ``i`` from ``(seed, i)`` alone, so for one seed they ask about the same images.
* Answers come from small closed vocabularies (``ANSWER_VOCAB``), so exact match is a fair metric;
  the localization family ``video_localize`` (``synthetic_localize``) answers ``"<start> <end>"`` in
  seconds instead, scored by IoU.
* Each family has its own eval split seed (``FAMILIES[name].eval_seed``), disjoint from the train
  seeds a recipe should use (small integers).

Design (fine detail): the code is drawn at ``glyph_scale`` canvas pixels per font pixel in a 3x5
bitmap font on a canvas ``>= 3x`` the tile size in both axes, so a single-tile resize blurs the
1-pixel strokes away while Dynamic-S2's native-resolution tiles keep them. Videos are ``frames``
PNG frames with short coloured flashes of 3-4 frames; uniform sampling of 32 of 64 frames (index
gaps <= 3) sees every flash, while 4 or 8 frames miss most.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

logger = logging.getLogger(__name__)

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30), "green": (30, 170, 40), "blue": (30, 60, 220),
    "yellow": (235, 205, 20), "purple": (150, 40, 190), "orange": (245, 130, 20),
}
SHAPES = ("square", "circle", "triangle")
LARGEST = (0.20, 0.26)  # the largest shape's side range, as fractions of the canvas's shorter side
CODE_ALPHABET = "0123456789"

# A 3x5 bitmap font: five rows of three pixels per glyph ("#" ink, "." paper).
FONT: dict[str, tuple[str, ...]] = {
    "0": ("###", "#.#", "#.#", "#.#", "###"), "1": (".#.", "##.", ".#.", ".#.", "###"),
    "2": ("###", "..#", "###", "#..", "###"), "3": ("###", "..#", "###", "..#", "###"),
    "4": ("#.#", "#.#", "###", "..#", "..#"), "5": ("###", "#..", "###", "..#", "###"),
    "6": ("###", "#..", "###", "#.#", "###"), "7": ("###", "..#", ".#.", ".#.", ".#."),
    "8": ("###", "#.#", "###", "#.#", "###"), "9": ("###", "#.#", "###", "..#", "###"),
}
GLYPH_W, GLYPH_H = 3, 5
INK, PAPER = 0, 255

QUESTIONS = {
    "fine_code": "What is the code in the white box?",
    "coarse_colour": "What colour is the largest shape?",
    "coarse_count": "How many coloured shapes are there?",
    "coarse_shape": "What shape is the largest shape?",
    "compare_count": "Which image has more coloured shapes?",
    "compare_colour": "Are the largest shapes in the two images the same colour?",
    "video_colour": "Which colour flashed?",
    "video_order": "In what order did the colours flash?",
    "video_count": "How many flashes were there?",
    "video_localize": "When does the square appear?",
}
# The closed answer vocabularies of the exact-match families (``video_localize`` answers with timestamps).
ANSWER_VOCAB: dict[str, list[str]] = {
    "fine_code": list(CODE_ALPHABET),  # an answer is a string of these characters
    "coarse_colour": list(COLOURS), "coarse_count": [str(k) for k in range(2, 7)], "coarse_shape": list(SHAPES),
    "compare_count": ["first", "second"], "compare_colour": ["yes", "no"],
    "video_colour": list(COLOURS), "video_order": list(COLOURS), "video_count": [str(k) for k in range(1, 5)],
}


# ------------------------------------------------------------------------------------------ font
def glyph_bitmap(ch: str) -> np.ndarray:
    """The (5, 3) boolean ink mask of one character of ``CODE_ALPHABET``."""
    return np.array([[c == "#" for c in row] for row in FONT[ch]], dtype=bool)


def code_size(length: int, glyph_scale: int, lines: int = 1) -> tuple[int, int]:
    """(width, height) in pixels of ``lines`` lines of ``length`` characters, one font pixel of gap
    between glyphs and between lines."""
    return (length * (GLYPH_W + 1) - 1) * glyph_scale, (lines * (GLYPH_H + 1) - 1) * glyph_scale


def render_code(canvas: np.ndarray, code: str, x: int, y: int, glyph_scale: int) -> None:
    """Draw ``code`` in ink with its top-left corner at ``(x, y)`` of an (H, W, 3) uint8 canvas."""
    for k, ch in enumerate(code):
        mask = np.kron(glyph_bitmap(ch), np.ones((glyph_scale, glyph_scale), dtype=bool))
        x0 = x + k * (GLYPH_W + 1) * glyph_scale
        canvas[y:y + mask.shape[0], x0:x0 + mask.shape[1]][mask] = INK


def code_rows(code: dict) -> list[tuple[str, int, int]]:
    """The drawn lines of a scene's code entry: ``(text, x, y)`` per line, top-left of its ink.

    A code with ``repeat`` ``[rx, ry]`` (a curriculum variant) draws each character ``rx`` times in
    a row and the row ``ry`` times, one font pixel apart; without it, the code is one line.
    """
    rx, ry = code.get("repeat", (1, 1))
    g = code["glyph_scale"]
    x, y = code["ink_xy"]
    line = "".join(ch * rx for ch in code["text"])
    return [(line, x, y + r * (GLYPH_H + 1) * g) for r in range(ry)]


# ---------------------------------------------------------------------------------------- scenes
def _shape_mask(kind: str, s: int) -> np.ndarray:
    """An (s, s) boolean mask of a square, a circle or an upward triangle."""
    yy, xx = np.mgrid[0:s, 0:s] + 0.5
    if kind == "square":
        return np.ones((s, s), dtype=bool)
    if kind == "circle":
        return (xx - s / 2) ** 2 + (yy - s / 2) ** 2 <= (s / 2) ** 2
    return np.abs(xx - s / 2) <= yy / 2  # triangle: apex at the top centre, base the bottom row


def _overlaps(box: tuple[int, int, int, int], boxes: list[tuple[int, int, int, int]], margin: int) -> bool:
    x, y, w, h = box
    return any(x < bx + bw + margin and bx < x + w + margin and y < by + bh + margin and by < y + h + margin
               for bx, by, bw, bh in boxes)


def _place(rng: np.random.Generator, w: int, h: int, W: int, H: int, taken: list, margin: int) -> tuple | None:
    for _ in range(200):
        box = (int(rng.integers(0, W - w + 1)), int(rng.integers(0, H - h + 1)), w, h)
        if not _overlaps(box, taken, margin):
            return box
    return None


def make_scene(rng: np.random.Generator, canvas: tuple[int, int], *, code_length: int = 4, glyph_scale: int = 1,
               clutter: int = 40, with_code: bool = True, code_at: tuple[int, int] | None = None,
               code_repeat: tuple[int, int] = (1, 1),
               min_shapes: int = 2, max_shapes: int = 6, largest_colour: str | None = None,
               largest: tuple[float, float] = LARGEST) -> dict:
    """A random scene description: grey clutter, coloured shapes, optionally a code box.

    One shape is clearly the largest (side >= 1.6x every other side, so also the largest area; on a
    small canvas, where the other shapes sit at the 4-px minimum, the largest is raised to keep it).
    Shapes, clutter and the code box do not overlap one another's bounding boxes (clutter may
    overlap clutter).

    Args:
        rng: the random source (consumed in a fixed order).
        canvas: (width, height) in pixels.
        code_length: characters in the code.
        glyph_scale: canvas pixels per font pixel.
        clutter: number of grey clutter rectangles.
        with_code: draw a white code box.
        code_at: the code box's top-left corner ``(x, y)``; None places it at random.
        code_repeat: ``(rx, ry)``: draw each character ``rx`` times in a row and the row ``ry``
            times (a curriculum variant where the glyphs fill a large box); ``(1, 1)`` is the code.
        min_shapes / max_shapes: shape count range (inclusive).
        largest_colour: force the largest shape's colour.
        largest: the range of the largest shape's side, as fractions of the canvas's shorter side
            (the other shapes' sides are 0.07-0.12 of it, at least 4 px).
    Returns:
        A JSON-able dict: ``canvas``, ``background``, ``clutter``, ``shapes`` (largest first) and
        ``code`` (``None`` or text and box).
    """
    W, H = canvas
    side = min(W, H)
    taken: list[tuple[int, int, int, int]] = []
    code = None
    if with_code:
        text = "".join(rng.choice(list(CODE_ALPHABET), size=code_length).tolist())
        rx, ry = code_repeat
        cw, ch = code_size(code_length * rx, glyph_scale, lines=ry)
        pad = 2 * glyph_scale
        bw, bh = cw + 2 * pad, ch + 2 * pad
        if code_at is None:
            box = _place(rng, bw, bh, W, H, taken, 0)
        else:
            box = (int(code_at[0]), int(code_at[1]), bw, bh)
            if not (0 <= box[0] <= W - bw and 0 <= box[1] <= H - bh):
                raise ValueError(f"a {bw}x{bh} code box at {tuple(code_at)} does not fit the {W}x{H} canvas")
        if box is None:
            raise ValueError(f"canvas {W}x{H} is too small for a {code_length}-character code")
        taken.append(box)
        code = {"text": text, "box": list(box), "ink_xy": [box[0] + pad, box[1] + pad], "glyph_scale": glyph_scale}
        if (rx, ry) != (1, 1):
            code["repeat"] = [rx, ry]
    n = int(rng.integers(min_shapes, max_shapes + 1))
    sizes = [max(4, int(side * rng.uniform(*largest)))] + [max(4, int(side * rng.uniform(0.07, 0.12)))
                                                              for _ in range(n - 1)]
    sizes[0] = max(sizes[0], -(-16 * max(sizes[1:], default=0) // 10))  # ceil(1.6 x the next largest)
    shapes = []
    for i, s in enumerate(sizes):
        kind = SHAPES[int(rng.integers(len(SHAPES)))]
        colour = list(COLOURS)[int(rng.integers(len(COLOURS)))]
        if i == 0 and largest_colour is not None:
            colour = largest_colour
        box = _place(rng, s, s, W, H, taken, max(2, side // 50))
        if box is None:
            continue  # no room left: the scene has fewer shapes (the answers use what was placed)
        taken.append(box)
        shapes.append({"shape": kind, "colour": colour, "box": list(box)})
    if len(shapes) < min_shapes:
        raise ValueError(f"canvas {W}x{H} is too small for {min_shapes} shapes")
    grey = int(rng.integers(200, 236))
    rects = []
    for _ in range(clutter):
        w, h = int(rng.integers(2, max(3, side // 8))), int(rng.integers(2, max(3, side // 8)))
        box = _place(rng, w, h, W, H, [*(s["box"] for s in shapes), *([code["box"]] if code else [])], 2)
        if box is not None:
            rects.append([*box, int(rng.integers(110, 190))])
    return {"canvas": [W, H], "background": grey, "clutter": rects, "shapes": shapes, "code": code}


def render_scene(scene: dict, noise: float = 0.0, rng: np.random.Generator | None = None) -> np.ndarray:
    """Rasterise a ``make_scene`` description to an (H, W, 3) uint8 array.

    Args:
        scene: the description.
        noise: standard deviation (grey levels) of Gaussian pixel noise over the canvas; 0 for none.
        rng: the noise source (required when ``noise > 0``).
    """
    W, H = scene["canvas"]
    img = np.full((H, W, 3), scene["background"], dtype=np.uint8)
    for x, y, w, h, g in scene["clutter"]:
        img[y:y + h, x:x + w] = g
    for s in scene["shapes"]:
        x, y, w, _ = s["box"]
        img[y:y + w, x:x + w][_shape_mask(s["shape"], w)] = COLOURS[s["colour"]]
    if scene["code"] is not None:
        x, y, w, h = scene["code"]["box"]
        img[y:y + h, x:x + w] = PAPER
        for line, x, y in code_rows(scene["code"]):
            render_code(img, line, x, y, scene["code"]["glyph_scale"])
    if noise > 0:
        img = np.clip(img + rng.normal(0.0, noise, img.shape), 0, 255).astype(np.uint8)
    return img


def scene_label_maps(scene: dict) -> dict[str, np.ndarray]:
    """Per-pixel labels of a ``make_scene`` description, for dense vision pre-training.

    Returns:
        (H, W) int64 maps: ``glyph`` is 1 + digit at the centre pixel of each code glyph and 0
        elsewhere; ``colour`` is 1 + the index in ``COLOURS`` on shape pixels, 0 elsewhere; ``shape``
        is 1 + the index in ``SHAPES`` on shape pixels, 0 elsewhere.
    """
    W, H = scene["canvas"]
    maps = {k: np.zeros((H, W), dtype=np.int64) for k in ("glyph", "colour", "shape")}
    for s in scene["shapes"]:
        x, y, w, _ = s["box"]
        mask = _shape_mask(s["shape"], w)
        maps["colour"][y:y + w, x:x + w][mask] = 1 + list(COLOURS).index(s["colour"])
        maps["shape"][y:y + w, x:x + w][mask] = 1 + SHAPES.index(s["shape"])
    code = scene["code"]
    if code is not None:
        g = code["glyph_scale"]
        for line, x0, y0 in code_rows(code):
            for k, ch in enumerate(line):
                maps["glyph"][y0 + 2 * g + g // 2, x0 + k * (GLYPH_W + 1) * g + g + g // 2] = 1 + int(ch)
    return maps


def scene_answer(family: str, scene: dict) -> str:
    """The answer of an image family's question about ``scene`` (largest shape first)."""
    answers = {"fine_code": lambda: scene["code"]["text"], "coarse_colour": lambda: scene["shapes"][0]["colour"],
               "coarse_count": lambda: str(len(scene["shapes"])), "coarse_shape": lambda: scene["shapes"][0]["shape"]}
    return answers[family]()


# ---------------------------------------------------------------------------------------- videos
def make_clip(rng: np.random.Generator, n_events: int, *, frames: int = 64, size: int = 32,
              min_gap: int = 8, distinct: bool = False, flash: tuple[int, int] = (3, 4)) -> dict:
    """A clip description: a static textured background and ``n_events`` short coloured flashes.

    Flashes last ``flash[0]``-``flash[1]`` frames, at least ``min_gap`` frames apart (start to
    previous end).

    Args:
        rng: the random source.
        n_events: number of flashes.
        frames: clip length in frames.
        size: frame width and height in pixels.
        min_gap: frames between flashes.
        distinct: give every flash a different colour.
        flash: shortest and longest flash, in frames.
    Returns:
        ``{"frames", "size", "background", "events": [{"colour", "start", "duration", "box"}]}``,
        events in time order.
    """
    durations = rng.integers(flash[0], flash[1] + 1, size=n_events).tolist()
    slack = frames - 2 - sum(durations) - min_gap * (n_events - 1)
    if slack < 0:
        raise ValueError(f"{n_events} flashes do not fit in {frames} frames")
    # Spread the slack over n_events + 1 gaps: sorted uniform cut points.
    cuts = np.sort(rng.integers(0, slack + 1, size=n_events))
    names = list(COLOURS)
    colours = (rng.permutation(len(names))[:n_events] if distinct else rng.integers(len(names), size=n_events)).tolist()
    events, t = [], 1
    for k in range(n_events):
        start = t + int(cuts[k]) + (min_gap if k else 0) - (int(cuts[k - 1]) if k else 0)
        s = int(rng.integers(size // 4, size // 2 + 1))
        box = [int(rng.integers(0, size - s + 1)), int(rng.integers(0, size - s + 1)), s, s]
        events.append({"colour": names[colours[k]], "start": start, "duration": durations[k], "box": box})
        t = start + durations[k]
    return {"frames": frames, "size": size, "background": int(rng.integers(1 << 30)), "events": events}


def render_clip(clip: dict, noise: float = 6.0) -> list[np.ndarray]:
    """Rasterise a ``make_clip`` description to ``frames`` (size, size, 3) uint8 arrays.

    The background is a grey checker texture with per-frame Gaussian noise (``noise`` grey levels);
    both come from the clip's ``background`` seed, so rendering is deterministic.
    """
    rng = np.random.default_rng(clip["background"])
    n = clip["size"]
    cell = max(2, n // 8)
    yy, xx = np.mgrid[0:n, 0:n] // cell
    base = np.where((yy + xx) % 2 == 0, 95, 125).astype(np.float64)
    out = []
    for f in range(clip["frames"]):
        frame = base + rng.normal(0.0, noise, base.shape) if noise > 0 else base
        frame = np.repeat(np.clip(frame, 0, 255).astype(np.uint8)[..., None], 3, axis=2)
        for e in clip["events"]:
            if e["start"] <= f < e["start"] + e["duration"]:
                x, y, w, h = e["box"]
                frame[y:y + h, x:x + w] = COLOURS[e["colour"]]
        out.append(frame)
    return out


def clip_label_maps(clip: dict, frame: int) -> dict[str, np.ndarray]:
    """Per-pixel labels of one frame of a ``make_clip`` description (as ``scene_label_maps``):
    flashes are squares, so ``colour`` and ``shape`` are set on their boxes; ``glyph`` is all 0."""
    n = clip["size"]
    maps = {k: np.zeros((n, n), dtype=np.int64) for k in ("glyph", "colour", "shape")}
    for e in clip["events"]:
        if e["start"] <= frame < e["start"] + e["duration"]:
            x, y, w, h = e["box"]
            maps["colour"][y:y + h, x:x + w] = 1 + list(COLOURS).index(e["colour"])
            maps["shape"][y:y + h, x:x + w] = 1 + SHAPES.index("square")
    return maps


def clip_answer(family: str, clip: dict) -> str:
    """The answer of a video family's question about ``clip``."""
    ev = clip["events"]
    return {"video_colour": lambda: ev[0]["colour"], "video_order": lambda: " ".join(e["colour"] for e in ev),
            "video_count": lambda: str(len(ev))}[family]()


# -------------------------------------------------------------------------------------- families
def _save_png(array: np.ndarray, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path, format="PNG", compress_level=1)


def _image_sample(family: str, seed: int, i: int, media: Path, rel: str, opts: dict) -> tuple[dict, list[str]]:
    rng = np.random.default_rng([seed, 0, i])  # shared by every image family: same seed, same images
    repeat = tuple(opts["code_repeat"])
    if repeat != (1, 1) and family != "fine_code":
        raise ValueError(f"code_repeat is a fine_code curriculum option; {family} asks about the shapes")
    # a repeated code fills most of the canvas: the shapes go where there is room, possibly nowhere
    scene = make_scene(rng, tuple(opts["canvas"]), code_length=opts["code_length"], glyph_scale=opts["glyph_scale"],
                       clutter=opts["clutter"], code_at=opts["code_at"], code_repeat=repeat,
                       min_shapes=2 if repeat == (1, 1) else 0)
    _save_png(render_scene(scene, opts["noise"], rng), media / f"{i:07d}.png")
    return {"image": f"{rel}/{i:07d}.png", "scene": scene}, [scene_answer(family, scene)]


def _compare_sample(family: str, seed: int, i: int, media: Path, rel: str, opts: dict) -> tuple[dict, list[str]]:
    if family == "compare_count" and opts["max_shapes"] < 2:
        raise ValueError(f"compare_count needs max_shapes >= 2 (the two images' counts differ), got {opts['max_shapes']}")
    rng = np.random.default_rng([seed, 1, i])
    kw = dict(with_code=False, clutter=opts["clutter"], min_shapes=1, max_shapes=opts["max_shapes"],
              largest=tuple(opts["largest"]))
    first = make_scene(rng, tuple(opts["canvas"]), **kw)
    if family == "compare_colour":
        same = bool(rng.random() < 0.5)
        names = [c for c in COLOURS if same == (c == first["shapes"][0]["colour"])]
        second = make_scene(rng, tuple(opts["canvas"]), largest_colour=names[int(rng.integers(len(names)))], **kw)
        answer = "yes" if same else "no"
    else:
        for _ in range(100):
            second = make_scene(rng, tuple(opts["canvas"]), **kw)
            if len(second["shapes"]) != len(first["shapes"]):
                break
        else:
            raise ValueError(f"canvas {opts['canvas']} is too small for scenes with different shape counts")
        answer = "first" if len(first["shapes"]) > len(second["shapes"]) else "second"
    paths = []
    for k, scene in enumerate((first, second)):
        _save_png(render_scene(scene, opts["noise"], rng), media / f"{i:07d}_{k}.png")
        paths.append(f"{rel}/{i:07d}_{k}.png")
    return {"image": paths, "scene": [first, second]}, [answer]


def _video_sample(family: str, seed: int, i: int, media: Path, rel: str, opts: dict) -> tuple[dict, list[str]]:
    rng = np.random.default_rng([seed, 2, i])
    n_events = {"video_colour": 1, "video_order": 3}.get(family) or int(rng.integers(1, 5))
    clip = make_clip(rng, n_events, frames=opts["frames"], size=opts["size"], distinct=family == "video_order",
                     flash=tuple(opts["flash"]), min_gap=opts["min_gap"])
    for f, frame in enumerate(render_clip(clip, opts["noise"])):
        _save_png(frame, media / f"{i:07d}" / f"{f:04d}.png")
    return {"video": f"{rel}/{i:07d}", "scene": clip}, [clip_answer(family, clip)]


def _localize_sample(*args) -> tuple[dict, list[str]]:
    from .synthetic_localize import localize_sample  # the family's own module, built on this one

    return localize_sample(*args)


@dataclass(frozen=True)
class Family:
    """One task family: its question, sample builder, default size options and eval seed."""

    name: str
    kind: str  # "image" | "multi_image" | "video" | "localization" (a video with a [start, end] answer)
    build: Callable[..., tuple[dict, list[str]]]
    defaults: dict = field(default_factory=dict)
    eval_seed: int = 0

    @property
    def question(self) -> str:
        return QUESTIONS[self.name]


_IMAGE = {"canvas": (1344, 1344), "code_length": 4, "glyph_scale": 1, "clutter": 40, "noise": 0.0, "code_at": None,
          "code_repeat": (1, 1)}
_COMPARE = {"canvas": (448, 448), "clutter": 10, "noise": 0.0, "max_shapes": 6, "largest": LARGEST}
_VIDEO = {"frames": 64, "size": 32, "noise": 6.0, "flash": (3, 4), "min_gap": 8}
# The bundled model's geometry (16 frames, 24 px): see synthetic_localize for the temporal resolution.
_LOCALIZE = {"frames": 16, "fps": 2.0, "size": 24, "noise": 6.0, "slot": 2, "lengths": (2, 4)}

_SPECS = [("fine_code", "image", _image_sample, _IMAGE), ("coarse_colour", "image", _image_sample, _IMAGE),
          ("coarse_count", "image", _image_sample, _IMAGE), ("coarse_shape", "image", _image_sample, _IMAGE),
          ("compare_count", "multi_image", _compare_sample, _COMPARE),
          ("compare_colour", "multi_image", _compare_sample, _COMPARE),
          ("video_colour", "video", _video_sample, _VIDEO), ("video_order", "video", _video_sample, _VIDEO),
          ("video_count", "video", _video_sample, _VIDEO),
          ("video_localize", "localization", _localize_sample, _LOCALIZE)]
# Eval seeds: one per family, well above the small integers recipes use for training splits.
FAMILIES: dict[str, Family] = {name: Family(name, kind, build, dict(defaults), eval_seed=10_007 + 101 * k)
                               for k, (name, kind, build, defaults) in enumerate(_SPECS)}


# Size presets: "paper" is the published geometry (448-px tiles, the family defaults); "small" is the
# bundled SynthVILA model's (24-px tiles, Dynamic-S2 over 24/72 px, 16 of 31 video frames). Comparison
# images are drawn at the tile size: a multi-image prompt gets one tile per image, and a larger image
# resized to one tile shrinks the small shapes to 2-3 px (the shape count was not learned from them).
# The code box sits at a fixed place inside the first high-res tile: the small model learns to read
# the code there, but not to find a box that moves (measured; ``code_at=None`` is the moving box).
# The colour comparison draws its largest shape at 45-55 % of the side (10-13 px): at the default
# range it is 7 px against the others' 4 px, while one projected token covers 8x8 px, and the
# comparison stayed near chance (0.60 at seed 777, RESULTS eighth round); at 10-13 px it was learned.
# A preset maps a media kind, then a family name (which wins), to size options.
SIZE_PRESETS: dict[str, dict[str, dict]] = {
    "paper": {},
    "small": {"image": {"canvas": (72, 72), "code_length": 3, "glyph_scale": 1, "clutter": 8, "noise": 8.0,
                        "code_at": (4, 4)},
              "multi_image": {"canvas": (24, 24), "clutter": 4, "noise": 8.0},
              "compare_colour": {"largest": (0.45, 0.55)},
              "video": {"frames": 31, "size": 24, "noise": 6.0, "flash": (2, 2), "min_gap": 7}},
}


def preset_options(family: str, preset: str) -> dict:
    """The size options of ``family`` under a ``SIZE_PRESETS`` name: its kind's, updated with its own;
    raises ``ValueError`` listing the valid presets."""
    if preset not in SIZE_PRESETS:
        raise ValueError(f"unknown size preset {preset!r}; valid: {', '.join(SIZE_PRESETS)}")
    sizes = SIZE_PRESETS[preset]
    return {**sizes.get(get_family(family).kind, {}), **sizes.get(family, {})}


def get_family(name: str) -> Family:
    """The registered family ``name``; raises ``ValueError`` listing the valid names."""
    if name not in FAMILIES:
        raise ValueError(f"unknown task family {name!r}; valid: {', '.join(FAMILIES)}")
    return FAMILIES[name]


def generate(family: str, n: int, out_dir: str | os.PathLike, seed: int, *, split: str | None = None,
             **size_options) -> Path:
    """Write ``n`` samples of ``family`` (media and a JSONL file) under ``out_dir``.

    Args:
        family: a key of ``FAMILIES``.
        n: number of samples.
        out_dir: destination directory (created); the family's media go to ``out_dir/<family>/``.
        seed: the split seed (``FAMILIES[family].eval_seed`` for the eval split).
        split: the name of the JSONL file and the media directory (default: the family's), so
            variants of one family can share ``out_dir``; records keep ``meta.family``.
        **size_options: overrides of the family's ``defaults``. Image families: ``canvas``
            ``(W, H)``, ``code_length``, ``glyph_scale``, ``clutter``, ``noise``, ``code_at`` (the
            code box's top-left corner, or None for a random place), ``code_repeat`` (``(rx, ry)``,
            fine_code only: each character drawn ``rx`` times and the row ``ry`` times); comparison:
            ``canvas``, ``clutter``, ``noise``, ``max_shapes`` (each image has 1 to it), ``largest``
            (the largest shape's side range, as fractions of the canvas side); video:
            ``frames``, ``size``, ``noise``, ``flash`` (shortest, longest) and ``min_gap`` in frames;
            localization: ``frames``, ``fps``, ``size``, ``noise``, ``slot`` (frames of the interval
            grid) and ``lengths`` (shortest, longest interval in slots).
    Returns:
        The JSONL path, ``out_dir/<split>.jsonl``.
    Raises:
        ValueError: an unknown family or size option, ``n < 1``, or sizes too small for the task.
    """
    fam = get_family(family)
    unknown = sorted(set(size_options) - set(fam.defaults))
    if unknown:
        raise ValueError(f"unknown size option {unknown[0]!r} for {family}; valid: {', '.join(fam.defaults)}")
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    opts = {**fam.defaults, **size_options}
    out = Path(out_dir)
    split = split or family
    media = out / split
    media.mkdir(parents=True, exist_ok=True)
    path = out / f"{split}.jsonl"
    markers = {"image": "<image>\n", "multi_image": "<image>\n<image>\n", "video": "<video>\n",
               "localization": "<video>\n"}[fam.kind]
    with path.open("w", encoding="utf-8") as f:
        for i in range(n):
            fields, (answer,) = fam.build(family, seed, i, media, split, opts)
            scene = fields.pop("scene")
            record = {"id": f"{split}-{i:07d}", **fields,
                      "conversations": [{"from": "human", "value": markers + fam.question},
                                        {"from": "gpt", "value": answer}],
                      "meta": {"family": family, "seed": seed, "index": i, "scene": scene}}
            f.write(json.dumps(record, sort_keys=True) + "\n")
    logger.info("wrote %d %s samples (seed %d) to %s", n, family, seed, path)
    return path


def generate_eval_split(family: str, n: int, out_dir: str | os.PathLike, **size_options) -> Path:
    """``generate`` with the family's own eval seed."""
    return generate(family, n, out_dir, get_family(family).eval_seed, **size_options)


def generate_eval_splits(families: list[str] | None, n: int, out_dir: str | os.PathLike, *,
                         preset: str = "small", seed: int | None = None) -> Path:
    """Held-out splits of ``families`` (all when None) at a ``SIZE_PRESETS`` size, each from its
    family's eval seed unless ``seed`` is given, merged into ``out_dir/eval.jsonl`` (returned)."""
    out = Path(out_dir)
    parts = [generate(name, n, out, get_family(name).eval_seed if seed is None else seed,
                      **preset_options(name, preset)) for name in (families or list(FAMILIES))]
    merged = out / "eval.jsonl"
    merged.write_text("".join(p.read_text(encoding="utf-8") for p in parts), encoding="utf-8")
    return merged


def corpus() -> list[str]:
    """The synthetic language as tokenizer training text: every exact-match question, and every answer word both
    alone (as it starts an assistant turn) and after its question. Codes are left out, so digits stay
    one byte-level token each."""
    # The exact-match families only: the localization answers are time tokens, and its question stays
    # byte-level, so a fresh tokenizer keeps the bundled one's merges (at vocab 400 the extra
    # question takes merges an answer word needs to stay one token).
    lines = [QUESTIONS[family] for family in ANSWER_VOCAB]
    for family, words in ANSWER_VOCAB.items():
        lines += words
        lines += [f"{QUESTIONS[family]} {w}" for w in words]
    return lines


def build_synth_tokenizer(vocab_size: int = 512):
    """A byte-level BPE tokenizer for the synthetic language, via ``nvila.tiny.build_tokenizer``.

    Every answer word (``ANSWER_VOCAB``) is one token at the start of an answer; a code is one token
    per digit.

    Args:
        vocab_size: target vocabulary size (at least 264: 256 bytes and the NVILA specials); the
            merges of this small language run out near 410.
    Returns:
        A transformers fast tokenizer with the NVILA special tokens and chat template.
    """
    from nvila.tiny import build_tokenizer

    return build_tokenizer(texts=corpus(), vocab_size=vocab_size)
