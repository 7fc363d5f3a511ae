"""nvila's own CPU kernels (``cpu_kernels.cpp``): built with torch's C++ extension JIT at first use.

``load_cpu_kernels()`` compiles the source with ``torch.utils.cpp_extension.load`` (it needs ``ninja`` and a
C++ compiler; 10-15 s on 2 cores) the first time a process needs it, and loads it; it registers the ops
``torch.ops.nvila.w4a16_linear_f32``, ``w4a16_linear_f32_avx512`` (AVX-512 code in the same library,
called only where ``cpu_supports_avx512``), ``w4a16_linear_dyn16``, ``w4a16_linear_dyn8``,
``w4a16_linear_dequant``, ``w4a16_dequantize``, ``w8a8_linear_dyn8`` and ``w8a8_linear_vnni`` (AVX-512
VNNI code, called only where ``cpu_supports_avx512_vnni``; the contracts are in the C++ file) and returns
True.

The build is cached once per machine, in ``TORCH_EXTENSIONS_DIR`` (default ``~/.cache/torch_extensions``),
under ``nvila_cpu_kernels_<key>``: the key hashes the source, the compiler, the flags, the Python version
and the torch installation, so checkouts or wheels with the same source share one build, and another
torch gets its own. The source is copied there, so the build does not depend on where the package
lives. Later processes only load the library (~50 ms). Builders take an OS lock (released if the process
dies) before torch's own lock file, which torch would otherwise wait on forever when a build was killed.

On a machine that cannot build or run them (not x86-64 with AVX2 + FMA, no compiler or ninja, a failed
build) it returns False after logging one note (INFO for a CPU without AVX2, where torch's kernel is the
expected choice; WARNING otherwise), and the callers keep torch's own kernels. The result is cached for
the process, so a failed build is tried once per process, not per layer or call. Nothing here runs at
import, and nothing here knows about modules or checkpoints.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import logging
import os
import platform
import shutil
import sys
import time
import warnings
from importlib import resources
from pathlib import Path

import torch

logger = logging.getLogger(__name__)

_NAME = "nvila_cpu_kernels"
_CFLAGS = ["-O3", "-mavx2", "-mfma", "-fopenmp"]  # OpenMP: at::parallel_for runs on torch's own thread pool
_LDFLAGS = ["-fopenmp"]


def cpu_supports_avx2() -> bool:
    """x86-64 and torch's dispatch capability is AVX2 or AVX512 (torch requires FMA for both).

    The capability follows ``ATEN_CPU_CAPABILITY``: ``default`` turns nvila's kernel off too.
    """
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return False
    return torch.backends.cpu.get_cpu_capability() in ("AVX2", "AVX512")


def cpu_supports_avx512() -> bool:
    """x86-64 and torch's dispatch capability is AVX512 (AVX-512 F, BW, DQ and VL; ``ATEN_CPU_CAPABILITY``
    lowers it): where ``w4a16_linear_f32_avx512`` may run."""
    return cpu_supports_avx2() and torch.backends.cpu.get_cpu_capability() == "AVX512"


def cpu_supports_avx512_vnni() -> bool:
    """``cpu_supports_avx512`` and AVX-512 VNNI: where ``w8a8_linear_vnni`` may run."""
    return cpu_supports_avx512() and getattr(torch.cpu, "_is_vnni_supported", lambda: False)()


def build_directory(source: bytes, compiler: str) -> Path:
    """Where the build for this source, compiler, flags, Python and torch lives (see the module doc)."""
    key = hashlib.sha256(source)
    key.update(repr((shutil.which(compiler) or compiler, _CFLAGS, _LDFLAGS, sys.version_info[:2],
                     torch.__version__, os.path.dirname(torch.__file__))).encode())
    from torch.utils import cpp_extension

    root = os.environ.get("TORCH_EXTENSIONS_DIR") or cpp_extension.get_default_build_root()
    return Path(root) / f"{_NAME}_{key.hexdigest()[:16]}"


@contextlib.contextmanager
def _build_lock(directory: Path):
    """Hold an OS file lock on the build directory; remove torch's lock file, then left only by a killed build."""
    try:
        import fcntl
    except ImportError:  # not POSIX: torch's lock file alone
        yield
        return
    with open(directory / "nvila.lock", "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)  # released by the OS when the holder exits, however it exits
        try:
            (directory / "lock").unlink(missing_ok=True)  # every builder holds our lock while it holds torch's
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _first_error_line(e: Exception) -> str:
    lines = [line.strip() for line in str(e).splitlines() if line.strip()] or [type(e).__name__]
    return next((line for line in lines if "error" in line.lower() and "error building" not in line.lower()),
                lines[0])[:200]


@functools.cache
def load_cpu_kernels() -> bool:
    """Build (first time on this machine) and load the AVX2 kernels; True when ``torch.ops.nvila`` has
    them. Cached: one attempt, and at most one log note, per process."""
    if not cpu_supports_avx2():
        logger.info("nvila's CPU kernels need an x86-64 CPU with AVX2 and FMA (torch capability here: %s); "
                    "using torch's kernels", torch.backends.cpu.get_cpu_capability())
        return False
    from torch.utils import cpp_extension

    compiler = os.environ.get("CXX", "c++")  # what torch's build uses
    missing = [tool for tool, found in ((compiler, shutil.which(compiler)),
                                        ("ninja", cpp_extension.is_ninja_available())) if not found]
    if missing:
        logger.warning("nvila's AVX2 CPU kernels need %s to build; using torch's kernels instead",
                       " and ".join(missing))
        return False
    start, caught = time.perf_counter(), []
    try:
        source = resources.files("nvila.quant").joinpath("cpu_kernels.cpp").read_bytes()
        directory = build_directory(source, compiler)
        directory.mkdir(parents=True, exist_ok=True)
        staged = directory / "cpu_kernels.cpp"
        # torch warns about its compiler checks; those go to the log, not to stderr
        with _build_lock(directory), warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            if not staged.is_file() or staged.read_bytes() != source:  # the key covers the source: written once
                tmp = directory / f".cpu_kernels.cpp.{os.getpid()}"
                tmp.write_bytes(source)
                os.replace(tmp, staged)
            cpp_extension.load(name=_NAME, sources=[str(staged)], build_directory=str(directory),
                               extra_cflags=_CFLAGS, extra_ldflags=_LDFLAGS, is_python_module=False,
                               verbose=False)
    except Exception as e:  # a failed build: torch's kernels remain
        logger.warning("could not build nvila's AVX2 CPU kernels (%s); using torch's kernels instead",
                       _first_error_line(e))
        return False
    finally:
        for w in caught:
            logger.info("while building nvila's CPU kernels: %s", w.message)
    logger.debug("nvila's CPU kernels loaded from %s in %.1f s", directory, time.perf_counter() - start)
    for op in ("w4a16_linear_f32", "w4a16_linear_f32_avx512", "w4a16_linear_dyn16", "w4a16_linear_dyn8",
               "w4a16_linear_dequant"):
        torch.library.register_fake(f"nvila::{op}")(_linear_fake)
    torch.library.register_fake("nvila::w4a16_dequantize")(_dequantize_fake)
    for op in ("w8a8_linear_dyn8", "w8a8_linear_vnni"):
        torch.library.register_fake(f"nvila::{op}")(_w8a8_fake)
    return True


def _linear_fake(x, qweight, scales, zeros, group_size, bias):
    return x.new_empty(x.shape[0], qweight.shape[0])


def _dequantize_fake(qweight, scales, zeros, group_size):
    return scales.new_empty(qweight.shape[0], qweight.shape[1] * 2)


def _w8a8_fake(x, qweight, scales, bias):
    return x.new_empty(x.shape[0], qweight.shape[0])
