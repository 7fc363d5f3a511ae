"""The JIT build of nvila's W4A16 CPU kernel (``nvila.quant.cpu_kernels``), for real, in fresh processes.

Slow (one build of ``cpu_kernels.cpp``, 10-15 s on 2 cores, into a temporary ``TORCH_EXTENSIONS_DIR``):
``make test-slow`` and CI run it. The default tier builds at most once per machine, into the user's cache.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from nvila.quant import cpu_kernels

pytestmark = pytest.mark.slow

SRC = Path(__file__).resolve().parents[2] / "src"
PROBE = ("import time; from nvila.quant import cpu_kernels; t = time.perf_counter(); "
         "print(cpu_kernels.load_cpu_kernels(), round(time.perf_counter() - t, 2))")


def _load(src: Path, extensions: Path) -> tuple[bool, float]:
    env = {**os.environ, "PYTHONPATH": str(src), "TORCH_EXTENSIONS_DIR": str(extensions)}
    env.pop("CXX", None)
    proc = subprocess.run([sys.executable, "-c", PROBE], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0 and proc.stderr == "", proc.stderr  # the build writes nothing on stderr
    loaded, seconds = proc.stdout.split()
    return loaded == "True", float(seconds)


def test_built_once_then_loaded_from_the_cache_by_any_copy_of_the_package(tmp_path):
    from torch.utils import cpp_extension

    if not cpu_kernels.cpu_supports_avx2():
        pytest.skip("not an x86-64 CPU with AVX2 and FMA: nvila's kernel is never built here")
    if not (shutil.which("c++") and cpp_extension.is_ninja_available()):
        pytest.skip("no C++ compiler (c++) or ninja: nvila's kernel cannot be built here (W4A16 uses int4pack)")
    extensions = tmp_path / "torch_extensions"
    assert _load(SRC, extensions)[0]
    [build] = extensions.iterdir()
    [library] = build.glob("*.so")
    built = library.stat().st_mtime_ns

    # another copy of the package (a wheel, another checkout), and a lock file left by a killed build
    copy = tmp_path / "copy"
    shutil.copytree(SRC / "nvila", copy / "nvila", ignore=shutil.ignore_patterns("__pycache__", "bundled"))
    (build / "lock").touch()
    loaded, seconds = _load(copy, extensions)
    assert loaded and seconds < 3, seconds  # a build takes 10-15 s
    assert [p.name for p in extensions.iterdir()] == [build.name] and library.stat().st_mtime_ns == built
