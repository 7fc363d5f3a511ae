"""Stage 0 for models trained from scratch: dense per-patch pre-training of the vision tower.

A VLM trained jointly from random init sits on a chance plateau (spec training.md §7.5): nothing
tells the tower which few pixels matter. Stage 0 gives every patch token its own labels, which
synthetic data provides for free (``nvila.data.synthetic.scene_label_maps``): the digit whose glyph
centre lies in the patch, and the colour and shape under it. A linear head per label kind reads the
tower's selected features; the heads are thrown away afterwards. This is the small-scale stand-in
for starting NVILA from a pretrained SigLIP.

Contract: ``patch_labels`` maps canvas-pixel label maps to the patch grid of one tile;
``DenseHeads`` turns (N, g*g, C) tower features into per-kind logits; ``dense_loss`` is their mean
cross-entropy (label -100 is ignored). Nothing here knows file formats or the LLM.
"""

from __future__ import annotations

import json
import logging
import math
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import Tensor, nn

from nvila.data.synthetic import COLOURS, SHAPES

logger = logging.getLogger(__name__)

# label kind -> number of classes (0 is "none")
LABEL_KINDS: dict[str, int] = {"glyph": 11, "colour": 1 + len(COLOURS), "shape": 1 + len(SHAPES)}
IGNORE = -100


def patch_labels(maps: dict[str, np.ndarray], box: tuple[int, int, int, int], grid: int, *,
                 glyphs: bool = True, min_cover: float = 0.25) -> dict[str, np.ndarray]:
    """Labels of the ``grid x grid`` patches of one tile cut from a labelled canvas.

    Args:
        maps: (H, W) per-pixel label maps of the canvas (``glyph``, ``colour``, ``shape``).
        box: the tile's region on the canvas, ``(x0, y0, x1, y1)``; its sides must be multiples of
            ``grid`` (a patch covers ``(x1 - x0) / grid`` canvas pixels across).
        grid: patches per tile side.
        glyphs: supervise glyphs (False for downsampled tiles, where they are illegible: IGNORE).
        min_cover: fraction of a patch a shape must cover to label it.
    Returns:
        ``{kind: (grid*grid,) int64}``, row-major over the patch grid.
    """
    x0, y0, x1, y1 = box
    ch, cw = (y1 - y0) // grid, (x1 - x0) // grid
    if ch * grid != y1 - y0 or cw * grid != x1 - x0:
        raise ValueError(f"tile box {box} is not a multiple of the {grid}x{grid} patch grid")
    out = {}
    for kind, n in LABEL_KINDS.items():
        cells = maps[kind][y0:y1, x0:x1].reshape(grid, ch, grid, cw).transpose(0, 2, 1, 3).reshape(grid * grid, -1)
        if kind == "glyph":
            out[kind] = cells.max(axis=1) if glyphs else np.full(grid * grid, IGNORE, dtype=np.int64)
            continue
        counts = np.stack([(cells == c).mean(axis=1) for c in range(1, n)], axis=1)  # (P, n-1)
        best = counts.argmax(axis=1)
        out[kind] = np.where(counts.max(axis=1) >= min_cover, best + 1, 0).astype(np.int64)
    return out


class DenseHeads(nn.Module):
    """One linear classifier per label kind over (N, P, C) patch features."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.heads = nn.ModuleDict({k: nn.Linear(width, n) for k, n in LABEL_KINDS.items()})

    def forward(self, feats: Tensor) -> dict[str, Tensor]:
        """(N, P, C) -> {kind: (N, P, classes)} logits."""
        return {k: head(feats) for k, head in self.heads.items()}


def dense_loss(logits: dict[str, Tensor], labels: dict[str, Tensor]) -> Tensor:
    """Mean over label kinds of the token-mean cross-entropy (IGNORE labels skipped)."""
    losses = [nn.functional.cross_entropy(logits[k].flatten(0, 1), labels[k].flatten(), ignore_index=IGNORE)
              for k in LABEL_KINDS if bool((labels[k] != IGNORE).any())]
    return torch.stack(losses).mean()


@torch.no_grad()
def dense_accuracy(logits: dict[str, Tensor], labels: dict[str, Tensor]) -> dict[str, float]:
    """Per kind: accuracy on the labelled patches that are not "none" (the informative ones), and
    ``<kind>_all`` over every labelled patch."""
    out = {}
    for k in LABEL_KINDS:
        pred, y = logits[k].argmax(-1), labels[k]
        real = y > 0
        if bool(real.any()):
            out[k] = float((pred[real] == y[real]).float().mean())
        valid = y != IGNORE
        if bool(valid.any()):
            out[f"{k}_all"] = float((pred[valid] == y[valid]).float().mean())
    return out


# ------------------------------------------------------------------------------------- the stage
def scene_tiles(scene: dict, image: np.ndarray, config) -> tuple[Tensor, dict[str, np.ndarray]]:
    """The tiles the model sees for one synthetic image, with their patch labels.

    Under Dynamic-S2 these are the square resizes of every scale but the last (glyphs ignored: a
    downsampled glyph is illegible) and the native tiles of the last scale; otherwise the single
    resized tile. Canvas sides must be multiples of the last scale's tile grid.

    Returns:
        ((N, 3, S, S) pixels, {kind: (N, g*g)} labels).
    """
    from nvila.data.synthetic import scene_label_maps
    from nvila.tiling import dynamic_s2_tiles, to_pixels

    maps = scene_label_maps(scene)
    tile, grid = config.vision.image_size, config.vision.grid
    H, W = image.shape[:2]
    pil = Image.fromarray(image)
    if config.image_aspect_ratio == "dynamic_s2":
        tiles, (rows, cols) = dynamic_s2_tiles(pil, config.s2_scales, config.max_tiles)
        if (rows * tile, cols * tile) != (H, W):
            raise ValueError(f"canvas {W}x{H} is not the last S2 scale's {cols}x{rows} grid of {tile}-px tiles")
        boxes = [((0, 0, W, H), False)] * (len(tiles) - rows * cols)  # whole-image scales
        boxes += [((c * tile, r * tile, (c + 1) * tile, (r + 1) * tile), True) for r in range(rows) for c in range(cols)]
    else:
        tiles, boxes = [pil], [((0, 0, W, H), W == tile and H == tile)]
    labels = [patch_labels(maps, box, grid, glyphs=legible) for box, legible in boxes]
    pixels = to_pixels(tiles, tile, config.image_mean, config.image_std)
    return pixels, {k: np.stack([lab[k] for lab in labels]) for k in LABEL_KINDS}


def synthetic_batch(rng: np.random.Generator, config, scenes: int, frames: int, preset: str = "small"
                    ) -> tuple[Tensor, dict[str, Tensor]]:
    """``scenes`` random images (every tile) and ``frames`` random video frames, with patch labels."""
    from nvila.data.synthetic import (clip_label_maps, make_clip, make_scene, preset_options, render_clip,
                                      render_scene)
    from nvila.tiling import to_pixels

    img, vid = preset_options("fine_code", preset), preset_options("video_count", preset)
    pix, labs = [], {k: [] for k in LABEL_KINDS}
    for _ in range(scenes):
        # the code box at random places (not at the preset's code_at), so every patch position learns glyphs
        scene = make_scene(rng, tuple(img["canvas"]), code_length=img["code_length"], glyph_scale=img["glyph_scale"],
                           clutter=img["clutter"])
        p, lab = scene_tiles(scene, render_scene(scene, img["noise"], rng), config)
        pix.append(p)
        for k in LABEL_KINDS:
            labs[k].append(lab[k])
    tile, grid = config.vision.image_size, config.vision.grid
    for _ in range(frames):
        clip = make_clip(rng, int(rng.integers(1, 4)), frames=vid["frames"], size=vid["size"],
                         flash=tuple(vid["flash"]), min_gap=vid["min_gap"])
        e = clip["events"][int(rng.integers(len(clip["events"])))]
        f = e["start"] + int(rng.integers(e["duration"]))
        frame = Image.fromarray(render_clip(clip, vid["noise"])[f])
        pix.append(to_pixels([frame], tile, config.image_mean, config.image_std))
        n = vid["size"]
        lab = patch_labels(clip_label_maps(clip, f), (0, 0, n, n), grid, glyphs=False)
        for k in LABEL_KINDS:
            labs[k].append(lab[k][None])
    return torch.cat(pix), {k: torch.from_numpy(np.concatenate(v)) for k, v in labs.items()}


def pretrain_vision(model_path, out_dir, *, steps: int, scenes: int = 8, frames: int = 8, lr: float = 1e-3,
                    seed: int = 0, preset: str = "small", device: str | torch.device = "cpu",
                    eval_every: int = 250, progress: bool = True, log_path=None) -> dict[str, float]:
    """Stage 0b: dense per-patch pre-training of a checkpoint's vision tower; saves the whole model.

    AdamW (no weight decay), 5 % warm-up then cosine, gradient clipping 1.0. Every ``eval_every``
    steps (and at the end) the per-patch accuracies on a fixed held-out batch are logged, and
    appended as JSON lines to ``log_path`` when given.

    Args:
        model_path: a checkpoint in the published layout (the tower's geometry comes from it).
        out_dir: where the checkpoint with the pre-trained tower is written.
        steps: optimizer steps.
        scenes / frames: synthetic images (all their tiles) and video frames per step.
        lr: peak learning rate.
        seed: data and head initialisation seed.
        preset: the SynthVILA size preset the data is drawn at.
    Returns:
        The final held-out accuracies (``dense_accuracy``).
    """
    from tqdm import tqdm

    from nvila.checkpoint import load_tokenizer, save_pretrained
    from nvila.model import NVILAForConditionalGeneration

    torch.manual_seed(seed)
    model = NVILAForConditionalGeneration.from_pretrained(model_path, device=device)
    tower = model.vision_tower.train()
    heads = DenseHeads(model.config.vision.hidden_size).to(device)
    params = [*tower.parameters(), *heads.parameters()]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    warm = max(1, steps // 20)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warm) * 0.5 * (1 + math.cos(math.pi * min(s, steps) / steps)))
    rng = np.random.default_rng([seed, 0])
    held_x, held_y = synthetic_batch(np.random.default_rng([seed, 1]), model.config, 32, 32, preset)

    def held_out() -> dict[str, float]:
        tower.eval()
        with torch.no_grad():
            acc = dense_accuracy(heads(tower(held_x.to(device))), {k: v.to(device) for k, v in held_y.items()})
        tower.train()
        return acc

    acc: dict[str, float] = {}
    t0 = time.perf_counter()
    for step in tqdm(range(steps), desc="stage 0b vision", disable=not progress, dynamic_ncols=True):
        x, y = synthetic_batch(rng, model.config, scenes, frames, preset)
        loss = dense_loss(heads(tower(x.to(device))), {k: v.to(device) for k, v in y.items()})
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        if (step + 1) % eval_every == 0 or step + 1 == steps:
            acc = held_out()
            record = {"step": step + 1, "loss": float(loss.detach()), "elapsed_s": time.perf_counter() - t0, **acc}
            logger.info("stage 0b step %d: %s", step + 1, record)
            if log_path is not None:
                with open(log_path, "a", encoding="utf-8") as f:
                    f.write(json.dumps(record) + "\n")
    model.eval()
    save_pretrained(model, load_tokenizer(Path(model_path) / "llm"), out_dir,
                    metadata={"nvila_weights": "synthvila-stage0b"})
    return acc
