"""Calibration data: text blocks for the LLM, preprocessed tiles for the vision tower, and input capture.

Text: a JSONL file, one object per line with a ``"text"`` string (other keys are ignored). The texts
are tokenized, joined with the end-of-sequence token and cut into ``n_samples`` blocks of
``seq_len`` tokens; fewer tokens than that is an error (``CalibrationError``), never a silent
shrink. The bundled default (``calib_default.jsonl``) holds documentation prose from CPython's
standard library docstrings, gathered locally.

Images: files or directories of images go through the checkpoint's own tiling (the same tiles
inference would see), plus random 448-pixel crops at a random zoom, until ``n_tiles`` tiles are
collected. Without images, smooth random colour fields are used and a warning is logged.

``InputCapture`` records, for each watched module, the per-channel max |x| and mean |x| of its input
over all calibration tokens, and keeps a fixed random subset of input rows for the AWQ searches.
"""

from __future__ import annotations

import json
import logging
import os
from importlib import resources
from pathlib import Path

import torch
from torch import Tensor, nn

logger = logging.getLogger(__name__)

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff"}


class CalibrationError(ValueError):
    """Calibration data is missing, unreadable or too short for the requested amount."""


# --------------------------------------------------------------------------------------------- text
def default_calibration_file() -> Path:
    """The bundled calibration JSONL."""
    return Path(str(resources.files("nvila.quant") / "calib_default.jsonl"))


def read_texts(path: str | os.PathLike) -> list[str]:
    """The ``"text"`` fields of a JSONL file."""
    path = Path(path)
    if not path.is_file():
        raise CalibrationError(f"{path}: no such calibration file")
    texts = []
    with open(path, encoding="utf-8") as f:
        for i, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise CalibrationError(f"{path}:{i}: not valid JSON ({e.msg})") from None
            if not isinstance(row, dict) or not isinstance(row.get("text"), str):
                raise CalibrationError(f"{path}:{i}: expected an object with a \"text\" string")
            texts.append(row["text"])
    return texts


def text_blocks(texts: list[str], tokenizer, n_samples: int, seq_len: int) -> Tensor:
    """Tokenize, join with EOS and cut into (n_samples, seq_len) token ids.

    Raises:
        CalibrationError: if the texts hold fewer than ``n_samples * seq_len`` tokens.
    """
    sep = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    ids: list[int] = []
    need = n_samples * seq_len
    for text in texts:
        ids += tokenizer(text, add_special_tokens=False).input_ids + sep
        if len(ids) >= need:
            break
    if len(ids) < need:
        raise CalibrationError(f"calibration text is too short: {len(ids)} tokens, but {n_samples} samples x "
                               f"{seq_len} tokens = {need} are needed (give more text, or fewer samples or "
                               f"a shorter sequence length)")
    return torch.tensor(ids[:need]).reshape(n_samples, seq_len)


# ------------------------------------------------------------------------------------------- images
def _image_paths(paths: list[str | os.PathLike]) -> list[Path]:
    out = []
    for p in map(Path, paths):
        if p.is_dir():
            out += sorted(q for q in p.iterdir() if q.suffix.lower() in IMAGE_SUFFIXES)
        elif p.is_file():
            out.append(p)
        else:
            raise CalibrationError(f"{p}: no such calibration image or directory")
    if not out:
        raise CalibrationError(f"no images found in {', '.join(map(str, paths))}")
    return out


def _random_field(size: int, generator: torch.Generator):
    """A smooth random RGB image (PIL) of ``size`` x ``size`` pixels."""
    from PIL import Image

    coarse = torch.rand(1, 3, 6, 6, generator=generator)
    img = nn.functional.interpolate(coarse, size=(size, size), mode="bicubic", align_corners=False)[0]
    img = img + 0.05 * torch.randn(img.shape, generator=generator)
    arr = (img.clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0).numpy()
    return Image.fromarray(arr)


def calibration_tiles(config, images: list[str | os.PathLike] | None, n_tiles: int, seed: int = 0) -> Tensor:
    """(n_tiles, 3, S, S) normalised tiles for the vision tower of ``config`` (an ``NVILAConfig``).

    Args:
        config: the checkpoint config (tile size, tiling mode, normalisation).
        images: image files or directories; None for random colour fields.
        n_tiles: how many tiles.
        seed: crop/zoom randomness.
    """
    from .. import tiling
    from ..media import load_image

    tile = config.vision.image_size
    g = torch.Generator().manual_seed(seed)
    if not images:
        logger.warning("no calibration images given: calibrating the vision tower on random colour fields "
                       "(pass --calib-images for real statistics)")
        pils = [_random_field(tile, g) for _ in range(n_tiles)]
        return tiling.to_pixels(pils, tile, config.image_mean, config.image_std)
    pils = []
    paths = _image_paths(images)
    fill = tuple(int(255 * m) for m in config.image_mean)
    for i in range(n_tiles):
        image = load_image(str(paths[i % len(paths)])).convert("RGB")
        if i < len(paths):  # first pass: the tiles inference would see
            tiles, _ = tiling.preprocess_image(image, config.image_aspect_ratio, tile=tile, scales=config.s2_scales,
                                               min_tiles=config.min_tiles, max_tiles=config.max_tiles,
                                               single=True, fill=fill)
            pils += tiles
        else:  # later passes: random crops at a random zoom
            zoom = 1.0 + float(torch.rand((), generator=g)) * 2.0
            w, h = image.size
            scale = zoom * tile / min(w, h)
            image = image.resize((max(tile, round(w * scale)), max(tile, round(h * scale))))
            x = int(torch.randint(0, image.size[0] - tile + 1, (), generator=g))
            y = int(torch.randint(0, image.size[1] - tile + 1, (), generator=g))
            pils.append(image.crop((x, y, x + tile, y + tile)))
    return tiling.to_pixels(pils[:n_tiles], tile, config.image_mean, config.image_std)


# ------------------------------------------------------------------------------------ input capture
class InputCapture:
    """Forward pre-hooks collecting input statistics of named modules.

    Per module name: ``amax[name]`` (K,) max |x| per input channel over all tokens seen,
    ``mean(name)`` (K,) mean |x| per channel, and ``rows(name, n)`` a random subset of input rows
    (up to ``keep_per_call`` rows are kept from every call, so memory stays bounded).
    """

    def __init__(self, modules: dict[str, nn.Module], keep_per_call: int = 0, seed: int = 0):
        self.amax: dict[str, Tensor] = {}
        self._sum: dict[str, Tensor] = {}
        self._count: dict[str, int] = {}
        self._rows: dict[str, list[Tensor]] = {}
        self.keep_per_call = keep_per_call
        self._gen = torch.Generator().manual_seed(seed)
        self._handles = [m.register_forward_pre_hook(self._hook(name)) for name, m in modules.items()]

    def _hook(self, name: str):
        def hook(_module, args):
            x = args[0].detach().float().reshape(-1, args[0].shape[-1])  # (T, K)
            a = x.abs()
            amax, s = a.amax(dim=0), a.sum(dim=0)
            if name in self.amax:
                self.amax[name] = torch.maximum(self.amax[name], amax)
                self._sum[name] += s
            else:
                self.amax[name], self._sum[name], self._count[name], self._rows[name] = amax, s, 0, []
            self._count[name] += x.shape[0]
            if self.keep_per_call:
                idx = torch.randperm(x.shape[0], generator=self._gen)[: self.keep_per_call].to(x.device)
                self._rows[name].append(x[idx])
        return hook

    def mean(self, name: str) -> Tensor:
        return self._sum[name] / self._count[name]

    def rows(self, name: str, n: int) -> Tensor:
        """(<= n, K): a random subset of the kept rows."""
        rows = torch.cat(self._rows[name])
        if rows.shape[0] <= n:
            return rows
        idx = torch.randperm(rows.shape[0], generator=self._gen)[:n].to(rows.device)
        return rows[idx]

    def close(self) -> None:
        for h in self._handles:
            h.remove()
