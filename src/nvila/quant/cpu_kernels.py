"""nvila's own CPU kernels (``w4a16_cpu.cpp``): built with torch's C++ extension JIT at first use.

``load_w4a16_cpu()`` compiles the source once per machine with ``torch.utils.cpp_extension.load`` (it
needs ``ninja`` and a C++ compiler, and takes about a minute) into torch's extension cache
(``TORCH_EXTENSIONS_DIR``, default ``~/.cache/torch_extensions``); later processes only load the cached
library. It registers the ops ``torch.ops.nvila.w4a16_linear_f32``, ``w4a16_linear_dyn16``,
``w4a16_linear_dyn8``, ``w4a16_linear_dequant`` and ``w4a16_dequantize`` (their contracts are in the C++ file) and returns True. On a machine that cannot build
or run them (not x86-64 with AVX2 + FMA, no compiler or ninja, a failed build) it returns False after logging
one warning, and the callers keep torch's own kernels. Nothing here knows about modules or checkpoints.
"""

from __future__ import annotations

import functools
import logging
import os
import platform
import shutil
from importlib import resources

import torch

logger = logging.getLogger(__name__)

_CFLAGS = ["-O3", "-mavx2", "-mfma", "-fopenmp"]  # OpenMP: at::parallel_for runs on torch's own thread pool


def cpu_supports_avx2() -> bool:
    """x86-64 and torch's dispatch capability includes AVX2 (which torch pairs with FMA)."""
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return False
    return torch.backends.cpu.get_cpu_capability() in ("AVX2", "AVX512")


@functools.cache
def load_w4a16_cpu() -> bool:
    """Build (first time) and load the AVX2 W4A16 kernels; True when ``torch.ops.nvila`` has them."""
    if not cpu_supports_avx2():
        logger.info("the AVX2 W4A16 kernel needs an x86-64 CPU with AVX2 (torch capability here: %s)",
                    torch.backends.cpu.get_cpu_capability())
        return False
    from torch.utils import cpp_extension

    compiler = os.environ.get("CXX", "c++")
    missing = [tool for tool, found in ((compiler, shutil.which(compiler)), ("ninja", cpp_extension.is_ninja_available()))
               if not found]
    if missing:
        logger.warning("nvila's AVX2 W4A16 kernel needs %s to build; using torch's int4 kernel instead",
                       " and ".join(missing))
        return False
    try:
        with resources.as_file(resources.files("nvila.quant") / "w4a16_cpu.cpp") as source:
            cpp_extension.load(name="nvila_w4a16_cpu", sources=[str(source)], extra_cflags=_CFLAGS,
                               extra_ldflags=["-fopenmp"], is_python_module=False, verbose=False)
    except Exception as e:  # a failed build: torch's kernels remain
        reason = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
        logger.warning("could not build nvila's AVX2 W4A16 kernel (%s); using torch's int4 kernel instead", reason)
        return False
    for op in ("w4a16_linear_f32", "w4a16_linear_dyn16", "w4a16_linear_dyn8", "w4a16_linear_dequant"):
        torch.library.register_fake(f"nvila::{op}")(_linear_fake)
    torch.library.register_fake("nvila::w4a16_dequantize")(_dequantize_fake)
    return True


def _linear_fake(x, qweight, scales, zeros, group_size, bias):
    return x.new_empty(x.shape[0], qweight.shape[0])


def _dequantize_fake(qweight, scales, zeros, group_size):
    return scales.new_empty(qweight.shape[0], qweight.shape[1] * 2)
