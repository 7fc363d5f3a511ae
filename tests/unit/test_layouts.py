"""The checkpoint layouts (nvila.layouts) and ``nvila convert``: detection, key maps, config
translation, bit-identical round trips, an -hf checkpoint written without our writer, bad input."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from golden_checkpoints import CHAT_TEMPLATE
from nvila import NVILAForConditionalGeneration, NVILAProcessor
from nvila.bundled import default_model_path
from nvila.checkpoint import CheckpointError, check_layout
from nvila.config import NVILAConfig
from nvila.convert import convert_checkpoint
from nvila.layouts import LAYOUTS, detect, layout_of, split_hf_key


def _tensors(root: Path) -> dict[tuple[str, str], tuple[str, list[int], bytes]]:
    """{(component, module key): (dtype, shape, raw bytes)} of every weight of a checkpoint."""
    out = {}
    for shard in detect(root).shards(root):
        with safe_open(shard.path, framework="pt") as f:
            for key in f.keys():
                t = f.get_tensor(key)
                out[shard.keys[key]] = (str(t.dtype), list(t.shape), t.contiguous().view(torch.uint8).numpy().tobytes())
    return out


# ------------------------------------------------------------------------------------ detection
def test_detection_reads_the_config_not_the_path(tiny_checkpoints, tiny_hf_checkpoints):
    assert detect(tiny_checkpoints["nvila"]).name == "vila"
    assert detect(tiny_hf_checkpoints["nvila"]).name == "hf"
    assert layout_of({"model_type": "nvila_lite", "text_config": {}, "vision_config": {}}, "x").name == "hf"
    assert layout_of({"model_type": "llava_llama"}, "x").name == "vila"


def test_a_directory_in_neither_layout_is_one_line_naming_the_layouts(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama"}))
    with pytest.raises(CheckpointError, match="no known checkpoint layout; known layouts: vila: .*; hf: ") as e:
        check_layout(tmp_path)
    assert "\n" not in str(e.value)
    (tmp_path / "config.json").unlink()
    with pytest.raises(CheckpointError, match=r"no config.json\); known layouts: vila"):
        check_layout(tmp_path)


def test_hf_key_map():
    assert split_hf_key("llm.model.embed_tokens.weight", "f") == ("llm", "model.embed_tokens.weight")
    assert split_hf_key("vision_tower.vision_model.post_layernorm.bias", "f") == (
        "vision_tower", "vision_model.post_layernorm.bias")
    assert split_hf_key("mm_projector.layers.1.weight", "f") == ("mm_projector", "layers.1.weight")
    assert LAYOUTS["hf"].publish_key("mm_projector", "layers.7.bias") == "mm_projector.layers.7.bias"
    assert LAYOUTS["vila"].publish_key("llm", "lm_head.weight") == "lm_head.weight"
    with pytest.raises(CheckpointError, match="belongs to no component"):
        split_hf_key("model.layers.0.mlp.up_proj.weight", "f")


@pytest.mark.parametrize("variant", ["nvila", "nvila-lite", "nvila-video"])
def test_hf_config_round_trip(tiny_checkpoints, variant):
    cfg = NVILAConfig.from_pretrained(tiny_checkpoints[variant])
    files = cfg.to_hf(image_token_id=1, video_token_id=2)
    assert "mm_hidden_size" not in files["config.json"]
    assert NVILAConfig.from_hf(files["config.json"], files["processor_config.json"], None, cfg.mm_hidden_size) == cfg


# ------------------------------------------------------------------------------------ round trip
@pytest.mark.parametrize("variant", ["nvila", *(pytest.param(v, marks=pytest.mark.slow) for v in ("nvila-lite",
                                                                                                    "nvila-video"))])
def test_vila_hf_vila_round_trip_is_bit_identical(tiny_checkpoints, tiny_hf_checkpoints, variant, tmp_path):
    back = convert_checkpoint(tiny_hf_checkpoints[variant], tmp_path / "back", "vila")
    original = _tensors(tiny_checkpoints[variant])
    assert _tensors(tiny_hf_checkpoints[variant]) == original
    assert _tensors(back) == original
    hf = tiny_hf_checkpoints[variant]
    index = json.loads((hf / "model.safetensors.index.json").read_text())
    assert {Path(f).name for f in index["weight_map"].values()} == {p.name for p in hf.glob("model-*.safetensors")}
    assert (hf / "chat_template.jinja").is_file() and (hf / "generation_config.json").is_file()
    assert NVILAConfig.from_pretrained(back) == NVILAConfig.from_pretrained(tiny_checkpoints[variant])


def test_bundled_round_trip_and_logits(tmp_path):
    src = default_model_path()
    hf = convert_checkpoint(src, tmp_path / "hf", "hf")
    back = convert_checkpoint(hf, tmp_path / "back", "vila")
    assert _tensors(hf) == _tensors(back) == _tensors(src)
    a, b = NVILAForConditionalGeneration.from_pretrained(src), NVILAForConditionalGeneration.from_pretrained(hf)
    ids = torch.tensor([[t for t in range(8, 40) if t not in (a.ids.image, a.ids.video)]])
    assert torch.equal(a(ids).logits, b(ids).logits)


# ------------------------------------------------------------------------- -hf not written by us
def _foreign_hf(vila: Path, out: Path, model_type: str) -> Path:
    """An -hf checkpoint assembled from the documented facts only: root config with text_config /
    vision_config / media token ids and no nvila fields, prefixed keys in two shards with an index,
    the golden tokenizer files and chat_template.jinja at the root."""
    out.mkdir()
    for src in (vila / "llm").iterdir():
        if src.suffix != ".safetensors" and src.name != "config.json":
            shutil.copyfile(src, out / src.name)
    tok_config = json.loads((out / "tokenizer_config.json").read_text())
    tok_config.pop("chat_template", None)
    (out / "tokenizer_config.json").write_text(json.dumps(tok_config))
    (out / "chat_template.jinja").write_text(CHAT_TEMPLATE)
    added = {t["content"]: t["id"] for t in json.loads((out / "tokenizer.json").read_text())["added_tokens"]}
    cfg = {"model_type": model_type, "architectures": ["X"],
           "text_config": json.loads((vila / "llm" / "config.json").read_text()),
           "vision_config": json.loads((vila / "vision_tower" / "config.json").read_text()),
           "image_token_id": added["<image>"], "video_token_id": added["<vila/video>"]}
    (out / "config.json").write_text(json.dumps(cfg))
    state = {}
    for component in ("llm", "vision_tower", "mm_projector"):
        with safe_open(vila / component / "model.safetensors", framework="pt") as f:
            state |= {f"{component}.{k}": f.get_tensor(k) for k in f.keys()}
    keys = sorted(state)
    halves = {"model-00001-of-00002.safetensors": keys[::2], "model-00002-of-00002.safetensors": keys[1::2]}
    for name, part in halves.items():
        save_file({k: state[k] for k in part}, out / name, metadata={"format": "pt"})
    index = {"metadata": {"total_size": 0}, "weight_map": {k: n for n, part in halves.items() for k in part}}
    (out / "model.safetensors.index.json").write_text(json.dumps(index))
    return out


@pytest.mark.parametrize("variant,model_type", [
    ("nvila", "nvila"), pytest.param("nvila-lite", "nvila_lite", marks=pytest.mark.slow)])
def test_foreign_hf_checkpoint_loads_and_matches(tiny_checkpoints, tmp_path, variant, model_type):
    vila = tiny_checkpoints[variant]
    hf = _foreign_hf(vila, tmp_path / "hf", model_type)
    assert NVILAConfig.from_pretrained(hf) == NVILAConfig.from_pretrained(vila)  # tiling derived from the weights
    a, b = NVILAForConditionalGeneration.from_pretrained(vila), NVILAForConditionalGeneration.from_pretrained(hf)
    assert a.ids == b.ids  # media, stop and newline ids: the same tokenizer and template
    ids = torch.tensor([[151644, 872, 198, 14990, 151645, 198, 151644, 77091, 198]])  # "<|im_start|>user\nhello..."
    with torch.no_grad():
        assert torch.equal(a(ids).logits, b(ids).logits)


def test_foreign_hf_with_wrong_media_ids_is_refused(tiny_checkpoints, tmp_path):
    hf = _foreign_hf(tiny_checkpoints["nvila"], tmp_path / "hf", "nvila")
    cfg = json.loads((hf / "config.json").read_text())
    (hf / "config.json").write_text(json.dumps({**cfg, "image_token_id": 5}))
    with pytest.raises(CheckpointError, match="config.json image_token_id 5 is not the tokenizer's id of <image>"):
        NVILAProcessor.from_pretrained(hf)


# ------------------------------------------------------------------------------------- bad input
def test_missing_shard_is_one_line(tiny_hf_checkpoints, tmp_path):
    hf = shutil.copytree(tiny_hf_checkpoints["nvila-lite"], tmp_path / "hf")
    next(iter(sorted(hf.glob("model-*.safetensors")))).unlink()
    with pytest.raises(CheckpointError, match="listed in the shard index but missing") as e:
        NVILAForConditionalGeneration.from_pretrained(hf)
    assert "\n" not in str(e.value)


def test_convert_refuses_a_non_empty_output_and_the_same_layout(tiny_checkpoints, tiny_hf_checkpoints, tmp_path):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("x")
    with pytest.raises(CheckpointError, match="the output directory is not empty"):
        convert_checkpoint(tiny_checkpoints["nvila"], tmp_path / "out", "hf")
    with pytest.raises(CheckpointError, match="already in the hf layout"):
        convert_checkpoint(tiny_hf_checkpoints["nvila"], tmp_path / "new", "hf")
    with pytest.raises(CheckpointError, match="unknown layout 'gguf'; valid: vila, hf"):
        convert_checkpoint(tiny_checkpoints["nvila"], tmp_path / "new", "gguf")
    assert (tmp_path / "out" / "keep.txt").exists() and not (tmp_path / "new").exists()


def test_convert_refuses_a_quantized_checkpoint(tiny_checkpoints, tmp_path):
    ckpt = shutil.copytree(tiny_checkpoints["nvila-lite"], tmp_path / "q")
    file = ckpt / "mm_projector" / "model.safetensors"
    with safe_open(file, framework="pt") as f:
        state = {k: f.get_tensor(k) for k in f.keys()}
    save_file(state, file, metadata={"format": "pt", "nvila_quant": json.dumps({"version": 1, "modules": {}})})
    with pytest.raises(CheckpointError, match="a quantized checkpoint; the hf layout cannot hold"):
        convert_checkpoint(ckpt, tmp_path / "out", "hf")
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out.*"))


def test_fsdp_reader_reads_both_layouts(tmp_path):
    """The FSDP2 trainer's row-sliced reader finds every weight of an hf copy, equal to the vila one."""
    from nvila.train.fsdp import PublishedReader

    src = default_model_path()
    hf = convert_checkpoint(src, tmp_path / "hf", "hf")
    model = NVILAForConditionalGeneration.from_pretrained(src)
    readers = [PublishedReader(root, model.ids.vocab_size) for root in (src, hf)]
    for name, t in model.state_dict().items():
        a, b = (r.rows(name, 0, None, t.shape) for r in readers)
        assert torch.equal(a, b), name
    for r in readers:
        r.check_all_used(model.config.llm.tie_word_embeddings)
