"""The bundled SynthVILA checkpoint as the default model, and the demo built on it.

These tests hold for any checkpoint in the bundled directory (trained or not): they check that the
model is found, runs and is reported, never that its answers are right. ``make demo`` is covered by
running ``python -m nvila.demo`` as a subprocess; the committed demo examples must equal what the
generator writes.
"""

from __future__ import annotations

import fnmatch
import json
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import nvila
import nvila.bundled
from nvila.bundled import BundledModelError, default_model_path, examples_path
from nvila.checkpoint import CheckpointError
from nvila.cli import main
from nvila.demo import load_examples, make_assets

REPO = Path(__file__).resolve().parents[2]
ASSETS = examples_path()


@pytest.fixture(autouse=True)
def _restore_threads():
    """``--threads 1`` calls torch.set_num_threads in this process; undo it for later tests."""
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def no_bundled_model(monkeypatch, tmp_path):
    """An install whose bundled directory lost its files (the other package data stays)."""
    files = nvila.bundled.resources.files
    monkeypatch.setattr(nvila.bundled.resources, "files",
                        lambda package: tmp_path if package == "nvila.bundled" else files(package))


def _example(family: str) -> dict:
    return next(e for e in load_examples(ASSETS) if e["family"] == family)


# --------------------------------------------------------------------------- default model path
def test_default_model_path_is_the_packaged_checkpoint():
    path = default_model_path()
    assert path == Path(nvila.__file__).resolve().parent / "bundled" / "synthvila"
    for name in ("config.json", "llm/model.safetensors", "llm/tokenizer.json", "vision_tower/model.safetensors",
                 "mm_projector/model.safetensors"):
        assert (path / name).is_file(), name


def test_missing_bundled_model_is_a_clear_error(no_bundled_model, tmp_path):
    with pytest.raises(BundledModelError, match="bundled synthvila model is missing .*--model PATH") as e:
        default_model_path()
    assert isinstance(e.value, CheckpointError) and isinstance(e.value, ValueError)


def test_bundled_model_inside_an_archive_is_a_clear_error(monkeypatch, tmp_path):
    archive = tmp_path / "nvila.zip"
    with zipfile.ZipFile(archive, "w") as z:
        z.writestr("nvila/bundled/synthvila/config.json", "{}")
    files = nvila.bundled.resources.files
    monkeypatch.setattr(nvila.bundled.resources, "files", lambda package: zipfile.Path(archive, "nvila/bundled/")
                        if package == "nvila.bundled" else files(package))
    with pytest.raises(BundledModelError, match="inside an archive"):
        default_model_path()


@pytest.mark.parametrize("argv", [["infer", "--text", "hi"], ["eval", "--task", "fine_code"], ["serve"]])
def test_cli_without_model_and_without_bundled_model(capsys, no_bundled_model, argv):
    code = main(argv)
    out, err = capsys.readouterr()
    assert code == 2 and out == ""
    assert len(err.splitlines()) == 1 and err.startswith("nvila: error: the bundled synthvila model is missing")


def test_package_data_ships_every_data_file():
    """pyproject's package-data globs cover every non-Python file under src/nvila (a wheel carries them)."""
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    pyproject = tomllib.loads((REPO / "pyproject.toml").read_text())
    src = REPO / "src"
    patterns = [(package, pat) for package, pats in pyproject["tool"]["setuptools"]["package-data"].items()
                for pat in pats]
    files = [p for p in (src / "nvila").rglob("*")
             if p.is_file() and p.suffix not in (".py", ".pyc") and "__pycache__" not in p.parts]
    assert any(p.name == "model.safetensors" for p in files) and any(p.suffix == ".yaml" for p in files)

    def shipped(path: Path) -> bool:
        for package, pat in patterns:
            root = src.joinpath(*package.split("."))
            if root in path.parents:
                rel = path.relative_to(root).as_posix()
                if fnmatch.fnmatch(rel, pat) and rel.count("/") == pat.count("/"):
                    return True
        return False

    assert [p.relative_to(src).as_posix() for p in files if not shipped(p)] == []


# ------------------------------------------------------------------------------------------- CLI
@pytest.mark.parametrize("command", ["infer", "serve", "eval"])
def test_help_names_the_default_model(capsys, command):
    assert main([command, "--help"]) == 0
    assert "default: the bundled SynthVILA model" in " ".join(capsys.readouterr().out.split())


def test_infer_defaults_to_the_bundled_model(capsys):
    ex = _example("fine_code")
    argv = ["infer", "--media", str(ASSETS / ex["media"][0]), "--text", ex["question"], "--max-new-tokens", "4",
            "--threads", "1"]
    assert main([*argv, "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["model"] == str(default_model_path())
    assert isinstance(report["answer"], str) and 1 <= report["new_tokens"] <= 4
    [row] = report["media"]
    assert row["kind"] == "image" and row["visual_tokens"] > 0 and row["tiles"] > 1  # dynamic S2 on 72x72
    code = main(argv)
    out, err = capsys.readouterr()
    assert code == 0, err
    lines = out.splitlines()
    assert lines[0] == report["answer"]  # the human report opens with the answer
    assert any(line.startswith("image ") and line.split()[-1] == str(row["tokens"]) for line in lines)


def test_eval_defaults_to_the_bundled_model(capsys):
    argv = ["eval", "--task", "fine_code", "--limit", "1", "--threads", "1", "--no-progress", "--json"]
    code = main(argv)
    out, err = capsys.readouterr()
    assert code == 0, err
    result = json.loads(out)
    assert result["model"] == str(default_model_path()) and result["n"] == 1
    # The demo's fine_code example is sample 0 of the same eval split.
    assert result["samples"][0]["answer"] == _example("fine_code")["answer"]


# ------------------------------------------------------------------------------------------ demo
def test_demo_assets_match_the_generator(tmp_path):
    """The committed examples are exactly what ``python -m nvila.demo --make-assets`` writes."""
    fresh = make_assets(tmp_path)
    assert json.loads(fresh.read_text()) == json.loads((ASSETS / "examples.json").read_text())
    listing = sorted(p.relative_to(tmp_path).as_posix() for p in tmp_path.rglob("*") if p.is_file())
    assert listing == sorted(p.relative_to(ASSETS).as_posix() for p in ASSETS.rglob("*") if p.is_file())
    for rel in listing:
        if rel.endswith(".png"):
            assert np.array_equal(np.asarray(Image.open(tmp_path / rel)), np.asarray(Image.open(ASSETS / rel))), rel
    examples = load_examples(ASSETS)
    kinds = {e["family"]: (e["kind"], len(e["media"])) for e in examples}
    assert kinds["fine_code"] == ("image", 1) and kinds["compare_count"] == ("image", 2)
    [video] = [e for e in examples if e["kind"] == "video"]
    assert len(list((ASSETS / video["media"][0]).glob("*.png"))) == 31


@pytest.mark.slow
def test_demo_runs_end_to_end():
    proc = subprocess.run([sys.executable, "-m", "nvila.demo", "--threads", "1", "--device", "cpu"],
                          capture_output=True, text=True, timeout=120, cwd=REPO)
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    assert str(default_model_path()) in out.splitlines()[0]
    examples = load_examples(ASSETS)
    blocks = out.split("\n\n")[1:-1]  # header, one block per example, summary
    assert len(blocks) == len(examples)
    for ex, block in zip(examples, blocks):
        lines = [line.strip() for line in block.splitlines()]
        assert f"question  {ex['question']}" in lines
        assert f"correct   {ex['answer']}" in lines
        answer = next(line for line in lines if line.startswith("answer "))
        assert answer.endswith("✓") or answer.endswith("✗")
        header = lines.index(next(line for line in lines if line.startswith("kind ")))
        assert lines[header].split() == ["kind", "file", "tiles/frames", "block", "visual", "tokens", "tokens"]
        rows = lines[header + 1:header + 1 + len(ex["media"])]
        assert [r.split()[:2] for r in rows] == [[ex["kind"], m] for m in ex["media"]]
        assert all(int(r.split()[-2]) > 0 for r in rows)  # visual tokens per medium
        assert any(line.startswith("timings ") and "first token" in line for line in lines)
    summary = out.strip().splitlines()[-1]
    n_right = sum(next(line for line in b.splitlines() if "answer " in line).endswith("✓") for b in blocks)
    assert summary.startswith(f"{n_right} of {len(examples)} correct") and "nvila eval" in summary


def test_demo_missing_examples(capsys, tmp_path):
    from nvila.demo import main as demo_main

    assert demo_main(["--assets", str(tmp_path), "--threads", "1"]) == 2
    assert "nvila demo: error:" in capsys.readouterr().err
