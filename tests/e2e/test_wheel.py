"""The wheel as a user gets it: built from this tree, installed into a fresh venv outside the repo, and
every entry point run from a directory that is not the repo (``nvila --help``, ``infer`` on the
bundled model, ``serve`` with one request, ``finetune --dry-run``, ``python -m nvila.demo``).

Slow (a venv with torch and the extras, ~2-4 min here): ``make test-slow`` and CI run it. torch is
installed the way the Makefile does (``torch==TORCH_VERSION``, which pip takes from the local CPU
wheel), so pip never resolves a CUDA build; everything else comes from the package index.
"""

from __future__ import annotations

import json
import os
import queue
import re
import shutil
import subprocess
import sys
import threading
import urllib.request
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[2]
TORCH = torch.__version__.split("+")[0]

pytestmark = pytest.mark.slow


def _run(argv: list, cwd: Path, timeout: float = 900) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    proc = subprocess.run([str(a) for a in argv], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"{argv} exited {proc.returncode}:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> tuple[Path, Path]:
    """(venv bin directory, a working directory outside the repo) with the wheel installed [serve,train]."""
    root = tmp_path_factory.mktemp("wheel")
    src = root / "src-copy"  # build from a copy: a build writes build/ and *.egg-info next to its sources
    shutil.copytree(REPO / "src", src / "src", ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / name, src / name)
    _run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w", root / "dist", src],
         cwd=root)
    [wheel] = (root / "dist").glob("nvila-*.whl")
    _run([sys.executable, "-m", "venv", root / "venv"], cwd=root)
    bin_dir = root / "venv" / "bin"
    _run([bin_dir / "python", "-m", "pip", "install", "-q", f"torch=={TORCH}"], cwd=root)
    _run([bin_dir / "python", "-m", "pip", "install", "-q", f"{wheel}[serve,train]"], cwd=root)
    work = root / "work"
    work.mkdir()
    return bin_dir, work


def test_the_installed_package_is_the_wheel_not_the_repo(installed):
    bin_dir, work = installed
    out = _run([bin_dir / "python", "-c", "import nvila; print(nvila.__file__)"], cwd=work).stdout.strip()
    assert Path(out).is_relative_to(bin_dir.parent) and not Path(out).is_relative_to(REPO), out
    help_text = _run([bin_dir / "nvila", "--help"], cwd=work).stdout
    assert all(cmd in help_text for cmd in ("infer", "serve", "finetune", "quantize"))


def test_infer_on_the_bundled_model(installed):
    bin_dir, work = installed
    python = bin_dir / "python"
    image = _run([python, "-c", "from nvila.bundled import examples_path; print(examples_path())"],
                 cwd=work).stdout.strip()
    image = next(Path(image).glob("fine_code/*.png"))
    proc = _run([bin_dir / "nvila", "infer", "--media", image, "--text", "What is written?", "--max-new-tokens", "4",
                 "--json", "--threads", "2"], cwd=work)
    result = json.loads(proc.stdout)
    assert result["new_tokens"] >= 1 and result["media"][0]["visual_tokens"] > 0
    assert proc.stderr == ""  # no library warnings for a user at the default log level


def test_finetune_dry_run_uses_the_shipped_recipe(installed):
    bin_dir, work = installed
    model = _run([bin_dir / "python", "-c", "from nvila.bundled import default_model_path as p; print(p())"],
                 cwd=work).stdout.strip()
    proc = _run([bin_dir / "nvila", "finetune", "--dry-run", f"model.path={model}"], cwd=work)
    assert all(w in proc.stdout for w in ("vision", "projector", "llm", "fits in 24 GiB"))


def test_demo_runs(installed):
    bin_dir, work = installed
    proc = _run([bin_dir / "python", "-m", "nvila.demo", "--threads", "2"], cwd=work)
    assert re.search(r"^\d of 5 correct", proc.stdout.strip().splitlines()[-1]), proc.stdout


def test_serve_answers_one_request(installed):
    bin_dir, work = installed
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    proc = subprocess.Popen([bin_dir / "nvila", "serve", "--port", "0", "--threads", "2"], cwd=work, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    lines: queue.Queue[str] = queue.Queue()
    threading.Thread(target=lambda: [lines.put(ln) for ln in proc.stderr] and lines.put(""), daemon=True).start()
    try:
        seen = []
        while not seen or "ready on" not in seen[-1]:
            seen.append(lines.get(timeout=180))
            assert seen[-1], "nvila serve exited before it was ready:\n" + "".join(seen)
        url = re.search(r"ready on (http://[\d.]+:\d+)", seen[-1]).group(1)
        body = {"model": "nvila", "max_tokens": 4, "messages": [{"role": "user", "content": "Hello"}]}
        request = urllib.request.Request(f"{url}/v1/chat/completions", data=json.dumps(body).encode(),
                                         headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=120) as response:
            answer = json.loads(response.read())
        assert answer["object"] == "chat.completion" and answer["usage"]["completion_tokens"] >= 1
    finally:
        proc.terminate()
        proc.wait(timeout=60)
