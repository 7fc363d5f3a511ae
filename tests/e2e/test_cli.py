"""End-to-end tests of the ``nvila`` command line on the tiny checkpoints.

Most tests call ``main([...])`` in-process (fast); one runs ``python -m nvila`` as a subprocess.
Token counts reported by the CLI are checked against what the processor itself reports.
"""

from __future__ import annotations

import json
import logging
import shutil
import struct
import subprocess
import sys
from pathlib import Path

import jsonschema
import pytest
from PIL import Image

from nvila import NVILAForConditionalGeneration, NVILAProcessor
from nvila.cli import main
from nvila_testing import CONFIGS, PERSON_SCHEMA

REPO = Path(__file__).resolve().parents[2]
ASSETS = REPO / "assets"
PUBLISHED = ("NVILA-8B", "NVILA-15B", "NVILA-Lite-2B", "NVILA-Lite-8B", "NVILA-8B-Video")
FAST = ["--max-new-tokens", "3"]


# ------------------------------------------------------------------------------------- helpers
def run(capsys, argv: list[str]) -> tuple[int, str, str]:
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def run_json(capsys, argv: list[str]) -> dict:
    code, out, err = run(capsys, [*argv, "--json"])
    assert code == 0, err
    assert len(out.strip().splitlines()) == 1
    return json.loads(out)


def processor_view(ckpt: Path, parts: list[dict], system: str | None = None, **options):
    """(prompt tokens, per-medium infos) as the processor reports them for the same prompt."""
    processor = NVILAProcessor.from_pretrained(ckpt, **options)
    messages = [{"role": "system", "content": system}] if system else []
    messages.append({"role": "user", "content": [*parts, {"type": "text", "text": "What is this?"}]})
    inputs, infos = processor.prepare([messages], add_generation_prompt=True)
    return inputs["input_ids"].shape[1], infos[0]


def check_report(report: dict, ckpt: Path, parts: list[dict], **options) -> None:
    prompt_tokens, infos = processor_view(ckpt, parts, **options)
    assert {"answer", "prompt_tokens", "new_tokens", "media", "timings", "model", "dtype", "device"} <= set(report)
    assert isinstance(report["answer"], str)
    assert 1 <= report["new_tokens"] <= 3
    assert report["prompt_tokens"] == prompt_tokens
    assert sum(m["tokens"] for m in report["media"]) == sum(i.num_tokens for i in infos)
    assert sum(m["visual_tokens"] for m in report["media"]) == sum(i.num_visual_tokens for i in infos)
    assert report["dtype"] == "float32" and report["device"] == "cpu"
    t = report["timings"]
    assert t["model_load_s"] > 0 and t["preprocess_s"] > 0 and t["time_to_first_token_s"] > 0


def assert_bad_input(code: int, out: str, err: str) -> None:
    assert code == 2, err
    assert out == ""
    assert "Traceback" not in err
    lines = err.splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("nvila: error: ")


@pytest.fixture(scope="module")
def media(tmp_path_factory) -> dict[str, Path]:
    """Small test images in several formats and modes, plus broken inputs."""
    root = tmp_path_factory.mktemp("media")
    base = Image.new("RGB", (96, 64))
    base.putdata([(x * 2, y * 3, (x + y) % 256) for y in range(64) for x in range(96)])
    out = {}
    for name, img, fmt in [("png", base, "PNG"), ("jpeg", base, "JPEG"), ("webp", base, "WEBP"),
                           ("rgba", base.convert("RGBA"), "PNG"), ("gray", base.convert("L"), "PNG")]:
        out[name] = root / f"{name}.{'png' if fmt == 'PNG' else fmt.lower()}"
        img.save(out[name], format=fmt)
    out["wide"] = root / "wide.png"
    base.resize((192, 64)).save(out["wide"])
    out["corrupt"] = root / "corrupt.png"
    out["corrupt"].write_bytes(b"\x89PNG\r\n\x1a\n" + b"not really a png" * 4)
    out["empty"] = root / "empty.png"
    out["empty"].write_bytes(b"")
    out["text"] = root / "notes.txt"
    out["text"].write_text("hello, I am not an image\n")
    # The bundled MP4 with its sample data (the mdat payload) zeroed: a video stream, no decodable frames.
    data = bytearray((ASSETS / "example.mp4").read_bytes())
    at = data.find(b"mdat")
    size = struct.unpack(">I", data[at - 4:at])[0]
    data[at + 4:at - 4 + size] = bytes(size - 8)
    out["no_frames"] = root / "no_frames.mp4"
    out["no_frames"].write_bytes(bytes(data))
    # A directory in the checkpoint layout whose config.json has an unsupported model_type.
    bad = root / "bad_model_type"
    for d in ("llm", "vision_tower", "mm_projector"):
        (bad / d).mkdir(parents=True)
    (bad / "config.json").write_text(json.dumps({"model_type": "llava_mistral"}))
    out["bad_model_type"] = bad
    out["not_ckpt"] = root / "not_a_checkpoint"
    out["not_ckpt"].mkdir()
    return out


# ---------------------------------------------------------------------------------------- infer
def test_infer_image_formats(capsys, tiny_checkpoints, media):
    """PNG, JPEG, WebP, RGBA and grayscale images, in one prompt (one model load)."""
    ckpt = tiny_checkpoints["nvila-video"]  # "resize": one tile per image, the fastest family
    paths = [str(media[f]) for f in ("png", "jpeg", "webp", "rgba", "gray")]
    report = run_json(capsys, ["infer", "--model", ckpt, "--media", *paths, "--text", "What is this?", *FAST])
    assert [(m["kind"], m["source"], m["tiles"], m["block_size"]) for m in report["media"]] == \
        [("image", p, 1, None) for p in paths]
    check_report(report, ckpt, [{"type": "image", "image": p} for p in paths])


@pytest.mark.parametrize("family", ["nvila", "nvila-lite", "nvila-video"])
def test_infer_human_output(capsys, tiny_checkpoints, family):
    code, out, err = run(capsys, ["infer", "--model", tiny_checkpoints[family], "--media", ASSETS / "example.png",
                                  "--text", "What is this?", *FAST])
    assert code == 0, err
    assert "Traceback" not in err
    lines = out.splitlines()
    header = next(i for i, line in enumerate(lines) if line.startswith("kind "))
    assert lines[header].split() == ["kind", "file", "tiles/frames", "block", "visual", "tokens", "tokens"]
    prompt_tokens, infos = processor_view(tiny_checkpoints[family], [{"type": "image", "image": str(ASSETS / "example.png")}])
    row = lines[header + 1].split()
    assert row[0] == "image" and int(row[-1]) == sum(i.num_tokens for i in infos)
    assert int(row[2]) == sum(i.num_tiles for i in infos)
    if family == "nvila":  # dynamic S2 on 1000x700: 1 + 4 tiles at the smaller scales, 3x4 at the largest
        assert row[2:4] == ["17", "3x4"] and infos[0].block_size == (3, 4)
    assert any(line.startswith(f"prompt: {prompt_tokens} tokens") for line in lines)
    for label in ("model load", "preprocessing", "first token", "decode", "new tokens"):
        assert any(line.strip().startswith(label) for line in lines), label


def test_infer_lite_image_is_one_row(capsys, tiny_checkpoints, media):
    ckpt = tiny_checkpoints["nvila-lite"]
    image = str(media["wide"])
    report = run_json(capsys, ["infer", "--model", ckpt, "--media", image, "--text", "What is this?",
                               "--max-tiles", "2", *FAST])
    [row] = report["media"]
    _, infos = processor_view(ckpt, [{"type": "image", "image": image}], max_tiles=2)
    assert len(infos) == row["tiles"] == 3  # 1x2 tiles + thumbnail, one medium each
    check_report(report, ckpt, [{"type": "image", "image": image}], max_tiles=2)


@pytest.mark.parametrize("family,source,frames", [
    ("nvila", "example.mp4", None),  # None: the config's num_video_frames (8)
    ("nvila", "frames", 4),
    ("nvila-video", "example.mp4", None),  # 16 frames, TSP pool 8 -> 2 pooled frames
    ("nvila-video", "frames", 8),
])
def test_infer_video(capsys, tiny_checkpoints, family, source, frames):
    ckpt, path = tiny_checkpoints[family], str(ASSETS / source)
    extra = ["--num-frames", str(frames)] if frames else []
    report = run_json(capsys, ["infer", "--model", ckpt, "--media", path, "--text", "What is this?", *extra, *FAST])
    [row] = report["media"]
    expected = frames or {"nvila": 8, "nvila-video": 16}[family]
    assert row["kind"] == "video" and row["frames"] == expected and len(row["frame_indices"]) == expected
    check_report(report, ckpt, [{"type": "video", "video": path}], num_video_frames=frames)


def test_infer_multi_media_and_system(capsys, tiny_checkpoints, media):
    ckpt = tiny_checkpoints["nvila"]
    paths = [str(media["png"]), str(media["jpeg"]), str(ASSETS / "frames")]
    report = run_json(capsys, ["infer", "--model", ckpt, "--media", *paths, "--text", "What is this?",
                               "--system", "Answer briefly.", "--num-frames", "4", *FAST])
    assert [m["kind"] for m in report["media"]] == ["image", "image", "video"]
    assert [m["source"] for m in report["media"]] == paths
    assert report["media"][0]["tiles"] == 1  # several images: each is resized to one tile
    assert report["media"][2]["frames"] == 4
    parts = [{"type": "image", "image": paths[0]}, {"type": "image", "image": paths[1]},
             {"type": "video", "video": paths[2]}]
    prompt_tokens, _ = processor_view(ckpt, parts, system="Answer briefly.", num_video_frames=4)
    assert report["prompt_tokens"] == prompt_tokens


def test_infer_text_only_and_sampling(capsys, tiny_checkpoints):
    argv = ["infer", "--model", tiny_checkpoints["nvila"], "--text", "What is this?", "--do-sample",
            "--temperature", "0.7", "--top-p", "0.9", "--top-k", "50", "--seed", "1", *FAST]
    first, second = run_json(capsys, argv), run_json(capsys, argv)
    assert first["media"] == []
    assert first["answer"] == second["answer"]  # seeded sampling is reproducible
    check_report(first, tiny_checkpoints["nvila"], [])


def test_infer_json_schema_answers_validate(capsys, tiny_checkpoints, tmp_path):
    """Random weights, sampled, guided by the schema: the answer parses and validates, and ends with
    "stop" (the engine and server tests cover greedy and more seeds)."""
    schema = tmp_path / "person.json"
    schema.write_text(json.dumps(PERSON_SCHEMA))
    report = run_json(capsys, ["infer", "--model", tiny_checkpoints["nvila-lite"], "--text", "A person as JSON.",
                               "--json-schema", schema, "--max-new-tokens", "400", "--do-sample", "--seed", "3"])
    jsonschema.validate(json.loads(report["answer"]), PERSON_SCHEMA)
    assert report["finish_reason"] == "stop"


def test_infer_json_mode_answer_is_an_object(capsys, tiny_checkpoints):
    report = run_json(capsys, ["infer", "--model", tiny_checkpoints["nvila-lite"], "--text", "JSON, please.",
                               "--json-mode", "--max-new-tokens", "24"])
    assert report["answer"].startswith("{")
    if report["finish_reason"] == "stop":  # else the token limit cut the object short
        assert isinstance(json.loads(report["answer"]), dict)


@pytest.mark.slow
def test_python_dash_m_entry_point(tiny_checkpoints):
    cmd = [sys.executable, "-m", "nvila", "infer", "--model", str(tiny_checkpoints["nvila-video"]),
           "--media", str(ASSETS / "example.png"), "--text", "What is this?", "--threads", "1", "--json", *FAST]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)
    assert report["media"][0]["visual_tokens"] == 256 and report["new_tokens"] >= 1


@pytest.mark.slow
def test_convert_then_infer_on_the_hf_copy(tiny_checkpoints, tmp_path):
    """``python -m nvila convert --to hf`` (progress bar on stderr, one JSON line on stdout), then
    ``nvila infer`` on the copy answers as on the original."""
    out = tmp_path / "hf"
    proc = subprocess.run([sys.executable, "-m", "nvila", "convert", "--to", "hf", str(tiny_checkpoints["nvila-lite"]),
                           str(out)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["layout"] == "hf" and "convert to hf" in proc.stderr
    answers = []
    for model in (tiny_checkpoints["nvila-lite"], out):
        cmd = [sys.executable, "-m", "nvila", "infer", "--model", str(model), "--media", str(ASSETS / "example.png"),
               "--text", "What is this?", "--threads", "1", "--json", *FAST]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr
        answers.append(json.loads(proc.stdout)["answer"])
    assert answers[0] == answers[1]


def test_convert_bad_input_is_one_line(capsys, tiny_checkpoints, tmp_path):
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("x")
    (tmp_path / "neither").mkdir()
    (tmp_path / "neither" / "config.json").write_text('{"model_type": "llama"}')
    assert_bad_input(*run(capsys, ["convert", "--to", "hf", tiny_checkpoints["nvila"], tmp_path / "full"]))
    assert_bad_input(*run(capsys, ["convert", "--to", "vila", tmp_path / "neither", tmp_path / "out"]))
    assert_bad_input(*run(capsys, ["convert", "--to", "gguf", tiny_checkpoints["nvila"], tmp_path / "out"]))


def test_hf_checkpoint_with_a_missing_shard_is_one_line(capsys, tiny_hf_checkpoints, tmp_path):
    hf = shutil.copytree(tiny_hf_checkpoints["nvila-lite"], tmp_path / "hf")
    sorted(hf.glob("model-*.safetensors"))[-1].unlink()
    assert_bad_input(*run(capsys, ["infer", "--model", hf, "--text", "hi", *FAST]))
    assert_bad_input(*run(capsys, ["convert", "--to", "vila", hf, tmp_path / "out"]))


# ------------------------------------------------------------------------------------ bad input
BAD_INFER = {
    "missing file": ["--media", "{media[root]}/missing.png"],
    "corrupt image": ["--media", "{media[corrupt]}"],
    "zero-byte file": ["--media", "{media[empty]}"],
    "text file as media": ["--media", "{media[text]}"],
    "oversized image": ["--media", "{assets}/example.png", "--max-pixels", "1000"],
    "video without frames": ["--media", "{media[no_frames]}"],
    "S2 max tiles below the last scale": ["--media", "{assets}/example.png", "--max-tiles", "4"],
    "num-frames 0": ["--num-frames", "0"],
    "max-tiles 0": ["--max-tiles", "0"],
    "fps 0": ["--fps", "0"],
    "num-frames with fps": ["--num-frames", "8", "--fps", "1"],
    "top-p above 1": ["--top-p", "1.5"],
    "negative temperature": ["--temperature", "-1"],
    "max-new-tokens 0": ["--max-new-tokens", "0"],
    "bad dtype": ["--dtype", "int8"],
    "bad device": ["--device", "nonsense"],
    "unknown flag": ["--frobnicate"],
    "json schema file missing": ["--json-schema", "{media[root]}/missing.json"],
    "json schema file not JSON": ["--json-schema", "{media[text]}"],
    "json mode and schema together": ["--json-mode", "--json-schema", "{media[text]}"],
}


@pytest.mark.parametrize("case", list(BAD_INFER))
def test_infer_bad_input(capsys, tiny_checkpoints, media, case):
    values = {"media": {**{k: str(v) for k, v in media.items()}, "root": str(media["png"].parent)}, "assets": str(ASSETS)}
    extra = [a.format(**values) for a in BAD_INFER[case]]
    assert_bad_input(*run(capsys, ["infer", "--model", tiny_checkpoints["nvila"], "--text", "hi", *extra, *FAST]))


@pytest.mark.parametrize("model", ["not_ckpt", "missing", "bad_model_type"])
def test_infer_bad_model(capsys, media, model):
    path = media[model] if model in media else media["png"].parent / "no_such_checkpoint"
    assert_bad_input(*run(capsys, ["infer", "--model", path, "--text", "hi", *FAST]))


def test_infer_tsp_frames_must_divide_the_pool(capsys, tiny_checkpoints):
    code, out, err = run(capsys, ["infer", "--model", tiny_checkpoints["nvila-video"], "--media",
                                  ASSETS / "example.mp4", "--text", "hi", "--num-frames", "12", *FAST])
    assert_bad_input(code, out, err)
    assert "divisible" in err


@pytest.mark.parametrize("argv", [[], ["infer"], ["frobnicate"], ["inspect"]])
def test_usage_errors(capsys, argv):
    assert_bad_input(*run(capsys, argv))


def test_help_exits_zero(capsys):
    code, out, _ = run(capsys, ["infer", "--help"])
    assert code == 0 and "--max-new-tokens" in out


def test_keyboard_interrupt(capsys, tiny_checkpoints, monkeypatch):
    def interrupt(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(NVILAProcessor, "from_pretrained", interrupt)
    code, out, err = run(capsys, ["infer", "--model", tiny_checkpoints["nvila"], "--text", "hi"])
    assert code == 130 and out == "" and err.splitlines() == ["nvila: interrupted"]


# -------------------------------------------------------------------------------------- inspect
@pytest.mark.parametrize("name", PUBLISHED)
def test_inspect_published_configs(capsys, name):
    report = run_json(capsys, ["inspect", CONFIGS / f"{name}.json"])
    params = report["parameters"]
    assert params["total"] == params["vision_tower"] + params["mm_projector"] + params["llm"]
    [image] = report["images"]
    assert (image["width"], image["height"]) == (1000, 700)
    assert image["tokens"] == image["visual_tokens"] + image["media"]  # one "\n" end token per medium
    assert report["video"]["frames"] == report["num_video_frames"]
    if name == "NVILA-8B":
        assert 8.0e9 <= params["total"] <= 8.2e9
        assert report["family"] == "NVILA" and report["s2_scales"] == [448, 896, 1344]
        assert image["visual_tokens"] == 3072 and image["tokens"] == 3073 and image["block_size"] == [3, 4]
    if name == "NVILA-8B-Video":
        assert report["video_encoder"] == {"kind": "tsp", "pool_sizes": [[8, 1, 1]]}


def test_inspect_human_output(capsys):
    code, out, err = run(capsys, ["inspect", CONFIGS / "NVILA-8B.json", "--image-size", "1000x700",
                                  "448x448", "--video-frames", "16"])
    assert code == 0, err
    assert "8.09 B" in out
    rows = {line.split()[1]: line.split() for line in out.splitlines() if line.strip().startswith("image ")}
    assert rows["1000x700"][-2:] == ["3072", "3073"]
    assert "448x448" in rows
    assert any(line.strip().startswith("video 16 frames") for line in out.splitlines())


@pytest.mark.parametrize("family", ["nvila", "nvila-lite", "nvila-video"])
def test_inspect_tiny_checkpoint_matches_the_model(capsys, tiny_checkpoints, family):
    ckpt = tiny_checkpoints[family]
    report = run_json(capsys, ["inspect", ckpt])
    model = NVILAForConditionalGeneration.from_pretrained(ckpt)
    assert report["parameters"] == model.num_parameters()
    assert report["llm"]["vocab_source"] == "tokenizer"
    _, infos = processor_view(ckpt, [{"type": "image", "image": str(ASSETS / "example.png")}])  # 1000x700
    [image] = report["images"]
    assert image["media"] == len(infos)
    assert image["visual_tokens"] == sum(i.num_visual_tokens for i in infos)
    assert image["tokens"] == sum(i.num_tokens for i in infos)
    _, [video] = processor_view(ckpt, [{"type": "video", "video": str(ASSETS / "example.mp4")}])
    assert (report["video"]["visual_tokens"], report["video"]["tokens"]) == (video.num_visual_tokens, video.num_tokens)


@pytest.mark.parametrize("argv", [
    ["{media[root]}/missing.json"],
    ["{media[text]}"],
    ["{media[bad_model_type]}/config.json"],
    ["{media[not_ckpt]}"],
    ["{configs}/NVILA-8B-Video.json", "--video-frames", "12"],
    ["{configs}/NVILA-8B.json", "--image-size", "1000x"],
    ["{configs}/NVILA-8B.json", "--image-size", "0x700"],
    ["{configs}/NVILA-8B.json", "--max-tiles", "4"],
    ["{configs}/NVILA-8B.json", "--video-frames", "0"],
])
def test_inspect_bad_input(capsys, media, argv):
    values = {"media": {**{k: str(v) for k, v in media.items()}, "root": str(media["png"].parent)},
              "configs": str(CONFIGS)}
    assert_bad_input(*run(capsys, ["inspect", *(a.format(**values) for a in argv)]))


def test_main_restores_logging(capsys):
    """In-process callers keep their logging: main() removes its stderr handler when it returns."""
    log = logging.getLogger("nvila")
    before = (list(log.handlers), log.level, log.propagate)
    for argv in (["inspect", CONFIGS / "NVILA-8B-Video.json"], ["-v", "inspect", "missing.json"]):
        run(capsys, argv)
        assert (list(log.handlers), log.level, log.propagate) == before
