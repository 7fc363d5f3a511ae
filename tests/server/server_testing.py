"""Server test helpers (imported by the server tests and their conftest): a fake engine for in-process tests, and a live ``nvila serve`` on a tiny checkpoint.

``FakeEngine`` implements the engine contract (``submit`` -> handle; sync/async iteration of
``TokenEvent``s; ``cancel``; ``shutdown``) without a model: it decodes media with ``nvila.media``
(so bad media raise the real ``MediaError``) and answers ``"You said: <last user text>"`` one word per
event. ``live_server`` runs ``python -m nvila.server`` on a tiny NVILA-Lite checkpoint on 127.0.0.1.
"""

from __future__ import annotations

import asyncio
import os
import queue
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path


from nvila.engine.api import GenerationRequest, RequestMetrics, TokenEvent
from nvila.media import MediaError, load_image
from nvila.processor import MediumInfo

REPO = Path(__file__).resolve().parents[2]
ASSETS = REPO / "assets"


class FakeHandle:
    def __init__(self, rid: str, words: list[str], request: GenerationRequest, media: list[MediumInfo], delay: float):
        self.id, self.media, self.request, self.delay = rid, media, request, delay
        self.metrics = RequestMetrics(prompt_tokens=10 + sum(m.num_tokens for m in media),
                                      visual_tokens=[m.num_visual_tokens for m in media], ttft_s=0.01)
        self.cancelled = threading.Event()
        self.events = self._script(words)

    def _script(self, words: list[str]) -> list[TokenEvent]:
        out, text = [], ""
        limit = self.request.max_tokens or len(words)
        for i, w in enumerate(words[:limit]):
            piece = w if i == 0 else " " + w
            stop = next((s for s in self.request.stop if s in text + piece), None)
            if stop is not None:
                out.append(TokenEvent(self.id, i, (text + piece).split(stop)[0][len(text):], "stop"))
                return out
            text += piece
            out.append(TokenEvent(self.id, i, piece))
        reason = "length" if len(words) > limit else "stop"
        out.append(TokenEvent(self.id, None, "", reason))
        return out

    def cancel(self) -> None:
        self.cancelled.set()

    def _step(self, i: int) -> TokenEvent:
        if self.cancelled.is_set():
            return TokenEvent(self.id, None, "", "abort")
        ev = self.events[i]
        self.metrics.completion_tokens += ev.token_id is not None
        return ev

    def __iter__(self):
        for i in range(len(self.events)):
            time.sleep(self.delay)
            ev = self._step(i)
            yield ev
            if ev.finish_reason:
                return

    async def __aiter__(self):
        for i in range(len(self.events)):
            await asyncio.sleep(self.delay)
            ev = self._step(i)
            yield ev
            if ev.finish_reason:
                return


@dataclass
class FakeEngine:
    """The engine contract without a model; records what it was given."""

    model_id: str = "fake-nvila"
    context_length: int = 4096
    delay: float = 0.0  # seconds per event
    fail_with: str | None = None  # finish every request with this error
    requests: list[GenerationRequest] = field(default_factory=list)
    handles: list[FakeHandle] = field(default_factory=list)
    seen_files: list[tuple[str, bytes]] = field(default_factory=list)  # video temp files at submit time
    shut_down: bool = False

    def submit(self, request: GenerationRequest) -> FakeHandle:
        if self.shut_down:
            raise RuntimeError("the engine is shut down")
        media, text = [], ""
        for m in request.messages:
            if m["role"] not in ("system", "user", "assistant"):
                raise ValueError(f"unknown role {m['role']!r}")
            for part in m["content"] if isinstance(m["content"], list) else []:
                if part["type"] == "image":
                    image = load_image(part["image"])
                    media.append(MediumInfo("image", "image", 2 + image.width % 7, image.width % 7, 1))
                elif part["type"] == "video":
                    path = part["video"]
                    if not os.path.isfile(path):
                        raise MediaError(f"{path}: no such file")
                    data = Path(path).read_bytes()
                    if b"ftyp" not in data[:64]:
                        raise MediaError(f"{path}: not a video file that FFmpeg can read")
                    self.seen_files.append((path, data))
                    media.append(MediumInfo("video", path, 40, 32, 8))
            if m["role"] == "user":
                text = m["content"] if isinstance(m["content"], str) else " ".join(
                    p["text"] for p in m["content"] if p["type"] == "text")
        if "TOO LONG" in text:
            raise ValueError(f"the prompt has 5000 tokens; the context holds {self.context_length}")
        unknown = set(request.options) - {"num_video_frames"}
        if unknown:
            raise TypeError(f"unknown processor options {sorted(unknown)}")
        words = f"You said: {text}".split()
        handle = FakeHandle(f"req-{len(self.handles)}", words, request, media, self.delay)
        if self.fail_with:
            handle.events = [TokenEvent(handle.id, 0, "Partial"), TokenEvent(handle.id, None, "", "error",
                                                                           error=self.fail_with)]
        self.requests.append(request)
        self.handles.append(handle)
        return handle

    def shutdown(self, wait: bool = True) -> None:
        self.shut_down = True


class LiveServer:
    """A ``python -m nvila.server`` subprocess; ``lines`` collects its stderr."""

    def __init__(self, args: list[str], timeout: float = 120.0, env: dict[str, str] | None = None):
        self.tmpdir = Path(tempfile.mkdtemp(prefix="nvila-serve-test-"))  # the server's TMPDIR: its temp files
        env = {"TMPDIR": str(self.tmpdir), **(env or {})}
        self.proc = subprocess.Popen([sys.executable, "-m", "nvila.server", *args], stdout=subprocess.DEVNULL,
                                     stderr=subprocess.PIPE, text=True, cwd=REPO, env={**os.environ, **env})
        self.lines: list[str] = []
        self._ready: queue.Queue[str] = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()
        try:
            line = self._ready.get(timeout=timeout)
        except queue.Empty:
            self.stop()
            raise RuntimeError("the server did not become ready:\n" + "".join(self.lines)) from None
        match = re.search(r"ready on (http://[\d.]+:\d+)", line)
        if match is None:
            self.stop()
            raise RuntimeError("the server exited before it was ready:\n" + "".join(self.lines))
        self.url = match.group(1)

    def _read(self) -> None:
        for line in self.proc.stderr:
            self.lines.append(line)
            if "ready on" in line:
                self._ready.put(line)
        self._ready.put("")  # exited

    def rss_bytes(self) -> int:
        status = Path(f"/proc/{self.proc.pid}/status").read_text()
        return int(re.search(r"VmRSS:\s+(\d+) kB", status).group(1)) * 1024

    def stop(self, sig: int = 15, timeout: float = 30.0) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        try:
            return self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            raise
        finally:
            shutil.rmtree(self.tmpdir, ignore_errors=True)
