"""The quantization handler: a full-precision NVILA model (or checkpoint) -> its quantized counterpart.

``quantize_model`` works in memory, component by component and layer by layer: calibration inputs
run through one float layer at a time; hooks record each group's input statistics; the layer is
smoothed/scaled, quantized and swapped for runtime modules; the float layer's output (the scales
preserve its function) feeds the next layer. ``quantize_checkpoint`` adds the file side: it checks
everything that can be checked before any work (schemes, an already-quantized input, calibration
length, the output path), then writes the published layout with the ``nvila_quant`` metadata
(``format.py``) atomically, so a failure never leaves a partial output directory.

Defaults: vision tower and projector SmoothQuant W8A8 (α = 0.5); LLM AWQ W4A16 (group 128) or
SmoothQuant W8A8; ``lm_head`` and embeddings full precision unless ``lm_head="w8a8"`` (which unties a
tied ``lm_head`` and folds its smoothing into the final RMSNorm).
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from ..checkpoint import CheckpointError, check_layout, save_pretrained
from ..layouts import detect
from .awq import awq_quantize
from .calib import InputCapture, calibration_tiles, default_calibration_file, read_texts, text_blocks
from .format import component_metadata, read_quant_metadata
from .groups import Group, projector_groups, qwen2_groups, siglip_groups
from .smoothquant import DEFAULT_ALPHA, smooth_and_quantize

logger = logging.getLogger(__name__)

# Component -> schemes it accepts ("none" leaves it in full precision).
CHOICES: dict[str, tuple[str, ...]] = {
    "vision": ("none", "w8a8"),
    "projector": ("none", "w8a8"),
    "llm": ("none", "w8a8", "w4a16"),
    "lm_head": ("none", "w8a8"),
}


@dataclass(frozen=True)
class QuantPlan:
    """What to quantize, and how."""

    vision: str = "none"
    projector: str = "none"
    llm: str = "none"
    lm_head: str = "none"
    alpha: float = DEFAULT_ALPHA
    group_size: int = 128

    def __post_init__(self) -> None:
        for part, valid in CHOICES.items():
            if getattr(self, part) not in valid:
                raise ValueError(f"unknown {part} quantization scheme {getattr(self, part)!r}; valid: {', '.join(valid)}")
        if not 0.0 <= self.alpha <= 1.0:
            raise ValueError(f"alpha must be in [0, 1], got {self.alpha}")
        if self.group_size not in (32, 64, 128, 256):
            raise ValueError(f"group_size must be 32, 64, 128 or 256, got {self.group_size}")
        if all(getattr(self, part) == "none" for part in CHOICES):
            raise ValueError("nothing to quantize: every component is 'none'")

    @property
    def needs_text(self) -> bool:
        return self.llm != "none" or self.lm_head != "none"

    @property
    def needs_tiles(self) -> bool:
        return self.vision != "none" or self.projector != "none"


@dataclass
class Calibration:
    """Calibration inputs: token blocks (S, L) for the LLM and tiles (N, 3, T, T) for the vision tower."""

    tokens: Tensor | None = None
    tiles: Tensor | None = None
    search_tokens: int = 1024  # rows per group kept for the AWQ searches
    batch: int = 8  # samples (or tiles) per forward call


# ------------------------------------------------------------------------------------ layer runner
def _run_layers(layers, h: Tensor, call: Callable[[nn.Module, Tensor], Tensor],
                groups: Callable[[nn.Module], list[Group]] | None,
                process: Callable[[nn.Module, list[Group], InputCapture], None] | None,
                calib: Calibration, desc: str) -> Tensor:
    """Feed ``h`` (S, L, H) through ``layers`` one at a time; ``process`` each layer after its pass."""
    starts = range(0, h.shape[0], calib.batch)
    keep = math.ceil(calib.search_tokens / len(starts))
    for layer in tqdm(layers, desc=desc, unit="layer", disable=None):
        cap = None
        if process is not None:
            layer_groups = groups(layer)
            cap = InputCapture({g.linears[0]: layer.get_submodule(g.linears[0]) for g in layer_groups}, keep)
        with torch.no_grad():
            h = torch.cat([call(layer, h[i:i + calib.batch]) for i in starts])
        if cap is not None:
            cap.close()
            process(layer, layer_groups, cap)
    return h


def _smooth(alpha: float):
    def process(layer: nn.Module, groups: list[Group], cap: InputCapture) -> None:
        smooth_and_quantize(layer, groups, cap.amax, alpha)
    return process


def _awq(group_size: int, search_tokens: int):
    def process(layer: nn.Module, groups: list[Group], cap: InputCapture) -> None:
        keys = [g.linears[0] for g in groups]
        chosen = awq_quantize(layer, groups, {k: cap.rows(k, search_tokens) for k in keys},
                              {k: cap.mean(k) for k in keys}, group_size)
        logger.debug("awq exponents: %s", chosen)
    return process


# ------------------------------------------------------------------------------------- components
def _quantize_vision(model, plan: QuantPlan, calib: Calibration) -> Tensor:
    """Quantize the tower (if asked) and return the float features of the tiles: (N, T, C)."""
    tower = model.vision_tower
    emb = tower.vision_model.embeddings
    tiles = calib.tiles.to(model.device, tower.dtype)
    with torch.no_grad():
        h = emb.patch_embedding(tiles).flatten(2).transpose(1, 2) + emb.position_embedding.weight  # (N, g*g, C)
    layers = tower.vision_model.encoder.layers[: tower.config.num_layers_used]
    process = _smooth(plan.alpha) if plan.vision == "w8a8" else None
    h = _run_layers(layers, h, lambda layer, x: layer(x, None), siglip_groups, process, calib, "vision tower")
    return h[:, 1:] if tower.config.select_feature == "patch" else h


def _quantize_projector(model, plan: QuantPlan, feats: Tensor) -> None:
    projector = model.mm_projector
    if model.config.is_dynamic_s2:  # single-tile path: the tile's channels repeated once per scale
        feats = feats.repeat(1, 1, len(model.config.s2_scales))
    groups = projector_groups(projector)
    cap = InputCapture({g.linears[0]: projector.get_submodule(g.linears[0]) for g in groups})
    with torch.no_grad():
        projector(feats)
    cap.close()
    smooth_and_quantize(projector, groups, cap.amax, plan.alpha)


def _quantize_llm(model, plan: QuantPlan, calib: Calibration) -> None:
    llm = model.llm
    tokens = calib.tokens.to(model.device)
    with torch.no_grad():
        h = llm.model.embed_tokens(tokens)  # (S, L, H)
        pos = torch.arange(tokens.shape[1], device=tokens.device)[None]  # (1, L)
        rope = llm.model.rotary_emb(h, pos)  # cos, sin: (1, L, head_dim)

    def call(layer, x):  # attention_mask None: causal attention over whole blocks
        return layer(x, attention_mask=None, position_ids=pos, position_embeddings=rope)

    process = None
    if plan.llm == "w8a8":
        process = _smooth(plan.alpha)
    elif plan.llm == "w4a16":
        process = _awq(plan.group_size, calib.search_tokens)
    h = _run_layers(llm.model.layers, h, call, qwen2_groups, process, calib, "language model")
    if plan.lm_head == "w8a8":
        if llm.config.tie_word_embeddings:  # a quantized head cannot share the embedding matrix
            llm.lm_head.weight = nn.Parameter(llm.lm_head.weight.detach().clone())
            llm.config.tie_word_embeddings = False
            model.config.llm.tie_word_embeddings = False
        with torch.no_grad():
            amax = llm.model.norm(h).abs().flatten(0, 1).amax(dim=0)  # (H,)
        smooth_and_quantize(llm, [Group(("lm_head",), "model.norm")], {"lm_head": amax}, plan.alpha)


def quantize_model(model, plan: QuantPlan, calib: Calibration) -> None:
    """Quantize an ``NVILAForConditionalGeneration`` in place, following ``plan``.

    Args:
        model: a full-precision float32 model (any device).
        plan: per-component schemes.
        calib: calibration inputs (``tiles`` needed for vision/projector, ``tokens`` for the LLM).
    Raises:
        ValueError: if the model already holds quantized modules or the needed calibration is absent.
    """
    from .linear import QuantLinear

    if any(isinstance(m, QuantLinear) for m in model.modules()):
        raise ValueError("the model is already quantized; quantize its full-precision checkpoint instead")
    if plan.needs_tiles and calib.tiles is None:
        raise ValueError("vision/projector quantization needs calibration tiles")
    if plan.needs_text and calib.tokens is None:
        raise ValueError("LLM quantization needs calibration tokens")
    if plan.needs_tiles:
        feats = _quantize_vision(model, plan, calib)
        if plan.projector == "w8a8":
            _quantize_projector(model, plan, feats)
    if plan.needs_text:
        _quantize_llm(model, plan, calib)
    model.eval()


def quantize_checkpoint(model_path: str | os.PathLike, out_dir: str | os.PathLike, plan: QuantPlan, *,
                        calib_file: str | os.PathLike | None = None, calib_images: list | None = None,
                        n_samples: int = 128, seq_len: int = 512, n_tiles: int = 8, search_tokens: int = 1024,
                        device: str | torch.device = "cpu", seed: int = 0) -> Path:
    """Quantize a full-precision checkpoint (vila or hf layout) into ``out_dir`` (vila layout + ``nvila_quant``
    metadata; quantized checkpoints exist in the vila layout only).

    Args:
        model_path: the input checkpoint.
        out_dir: destination; written atomically (an existing directory is replaced, as by
            ``save_pretrained``), and never the input itself.
        plan: per-component schemes.
        calib_file: calibration JSONL (default: the bundled ``calib_default.jsonl``).
        calib_images: images or directories for the vision tower (default: random colour fields).
        n_samples: calibration text blocks.
        seq_len: tokens per block.
        n_tiles: calibration tiles.
        search_tokens: rows per group used by the AWQ searches.
        device: where the model runs while quantizing.
        seed: calibration sampling seed.
    Returns:
        The output path.
    Raises:
        CheckpointError: bad input or output checkpoint paths, or an already-quantized input.
        CalibrationError: unreadable or too-short calibration data.
    """
    from ..model import NVILAForConditionalGeneration

    root = check_layout(model_path)
    out = Path(out_dir)
    if out.resolve() == root.resolve():
        raise CheckpointError(f"{out}: the output must differ from the input checkpoint")
    if read_quant_metadata(root):
        raise CheckpointError(f"{root}: already quantized (its weights carry nvila_quant metadata); "
                              f"quantize the full-precision checkpoint instead")
    tok = detect(root).load_tokenizer(root)
    calib = Calibration(search_tokens=search_tokens)
    if plan.needs_text:
        texts = read_texts(calib_file or default_calibration_file())
        calib.tokens = text_blocks(texts, tok, n_samples, seq_len)
    model = NVILAForConditionalGeneration.from_pretrained(root, dtype=torch.float32, device=device)
    if plan.needs_tiles:
        calib.tiles = calibration_tiles(model.config, calib_images, n_tiles, seed)
    torch.manual_seed(seed)
    quantize_model(model, plan, calib)
    meta = {name: component_metadata(getattr(model, name)) for name in ("llm", "vision_tower", "mm_projector")}
    return save_pretrained(model, tok, out, metadata={"nvila_quant_plan": repr(plan)}, component_metadata=meta)
