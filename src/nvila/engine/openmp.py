"""Keep the scheduler thread's OpenMP workers fast: free the OpenMP pools other threads hold.

GNU OpenMP (libgomp, the runtime torch's Linux wheels use) gives every thread that opens a parallel
region a pool of workers of its own, kept until that thread exits. Between regions the idle workers
spin a while before they sleep, so the next region starts without waking them through the kernel;
but only while the process's libgomp threads number no more than its CPUs. Past that they spin
about a hundred times and sleep, and each region pays for the wake-up. A decode step opens a few
hundred regions, and the thread that loaded the model (and any thread that ran the processor) holds
a pool of its own: at 2 threads on 2 CPUs the scheduler thread decoded 9.3 tok/s where the same
steps on the main thread made 13.3 (benchmarks/RESULTS.md, issue 23).

``release_pool()`` frees the calling thread's pool through OpenMP 5's ``omp_pause_resource_all``;
libgomp builds it again at that thread's next parallel region. The engine calls it in the thread
that builds it, after each ``submit``'s preprocessing, and in its scheduler thread whenever that
goes idle (another engine in the process may be decoding). Other OpenMP runtimes (LLVM's libomp,
Intel's libiomp5) share one pool per process and pause it for every thread, so they are left alone.
"""

from __future__ import annotations

import ctypes
import functools
import logging

logger = logging.getLogger(__name__)

OMP_PAUSE_SOFT = 1


@functools.cache
def _libgomps() -> tuple[ctypes.CDLL, ...]:
    """The GNU OpenMP libraries mapped into this process (torch's own copy, and any other), that
    have ``omp_pause_resource_all``; () where there is none or no /proc (not Linux)."""
    try:
        with open("/proc/self/maps") as f:
            paths = sorted({line.split()[-1] for line in f if "/libgomp" in line})
    except OSError:
        return ()
    libs = []
    for path in paths:
        try:
            lib = ctypes.CDLL(path)
            pause = lib.omp_pause_resource_all
        except (OSError, AttributeError):  # an older libgomp (before OpenMP 5) or one that cannot be opened
            continue
        pause.argtypes, pause.restype = [ctypes.c_int], ctypes.c_int
        libs.append(lib)
    logger.debug("GNU OpenMP runtimes with omp_pause_resource_all: %s", paths if libs else "none")
    return tuple(libs)


def release_pool() -> int:
    """Free the calling thread's GNU OpenMP worker pool(s); returns how many runtimes were asked.

    Safe at any time outside a parallel region (Python code always is); a thread without a pool is a
    no-op. The pool comes back, at the cost of starting its workers, at the thread's next region.
    """
    libs = _libgomps()
    for lib in libs:
        lib.omp_pause_resource_all(OMP_PAUSE_SOFT)
    return len(libs)
