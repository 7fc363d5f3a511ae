"""``openmp.release_pool`` frees the calling thread's GNU OpenMP workers, and the engine calls it in
the thread that builds it and after every submit's preprocessing (on the CPU)."""

from __future__ import annotations

import os
import threading
import time

import pytest
import torch

from nvila import NVILAForConditionalGeneration, NVILAProcessor
from nvila.engine import Engine, EngineConfig, GenerationRequest, openmp
from nvila.engine import engine as engine_module


def _threads() -> int:
    return len(os.listdir("/proc/self/task"))


def _settle(timeout: float = 5.0) -> None:
    """Wait until the process's thread count holds still for 0.1 s (threads of earlier tests ending)."""
    deadline = time.monotonic() + timeout
    last = _threads()
    while time.monotonic() < deadline:
        time.sleep(0.1)
        now = _threads()
        if now == last:
            return
        last = now


def _in_thread(fn):
    """Run ``fn`` in a new thread (so that its OpenMP pool is its own) and return what it returns."""
    out: list = []

    def target():
        try:
            out.append(fn())
        except BaseException as e:  # re-raised in the test's thread
            out.append(e)

    t = threading.Thread(target=target)
    t.start()
    t.join()
    if isinstance(out[0], BaseException):
        raise out[0]
    return out[0]


@pytest.mark.skipif(not os.path.isdir("/proc/self/task"), reason="needs Linux /proc to count threads")
def test_release_pool_frees_this_threads_workers_and_they_come_back():
    if not openmp._libgomps():
        pytest.skip(f"torch here does not run on GNU OpenMP: {torch.__config__.parallel_info().splitlines()[3]}")
    x = torch.arange(2**22, dtype=torch.float32)

    def run():
        torch.set_num_threads(2)
        before = _threads()
        first = x.sum()  # opens a 2-thread region: this thread's pool gets one worker
        with_pool = _threads()
        asked = openmp.release_pool()
        released = _threads()
        again = x.sum()
        return before, with_pool, asked, released, _threads(), first, again

    # The thread count is the process's: threads of earlier tests (an engine's scheduler, other pools)
    # may still be ending, so the pattern must show in one of three tries, each after the count settles.
    for _ in range(3):
        _settle()
        before, with_pool, asked, released, rebuilt, first, again = _in_thread(run)
        if (with_pool, released, rebuilt) == (before + 1, before, before + 1):
            break
    assert asked >= 1
    assert with_pool == before + 1
    assert released == before
    assert rebuilt == with_pool
    assert torch.equal(first, again)
    assert openmp.release_pool() == asked  # a thread without a pool: a no-op


def test_the_engine_releases_the_builders_the_submitters_and_its_idle_schedulers_pools(tiny_checkpoints,
                                                                                      monkeypatch):
    calls: list[str] = []
    monkeypatch.setattr(engine_module, "release_pool", lambda: calls.append(threading.current_thread().name))
    path = tiny_checkpoints["nvila-lite"]
    engine = Engine(NVILAForConditionalGeneration.from_pretrained(path), NVILAProcessor.from_pretrained(path),
                    EngineConfig(max_batch_size=1))
    try:
        assert calls[0] == threading.current_thread().name  # the builder, before the scheduler starts
        submitter = _in_thread(lambda: (engine.submit(GenerationRequest(
            messages=[{"role": "user", "content": "Hi"}], max_tokens=2)).text(), threading.current_thread().name)[1])
        assert submitter in calls
        idle_before = calls.count("nvila-engine")
        engine.submit(GenerationRequest(messages=[{"role": "user", "content": "Hi"}], max_tokens=2)).text()
        for _ in range(200):  # the scheduler releases once it has nothing left to run
            if calls.count("nvila-engine") > idle_before:
                break
            threading.Event().wait(0.01)
        assert calls.count("nvila-engine") > idle_before
        before = len(calls)
        with pytest.raises(ValueError):  # preprocessing that fails releases too
            engine.submit(GenerationRequest(messages=[{"role": "user", "content": [{"type": "image"}]}]))
        assert threading.current_thread().name in calls[before:]
    finally:
        engine.shutdown()
