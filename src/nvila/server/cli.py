"""``nvila serve``: load a checkpoint into the engine and serve it over HTTP with uvicorn.

Contract (the ``nvila`` CLI's): ``add_arguments(parser)`` declares the flags and ``run(args)``
returns the exit code; bad input raises ``ValueError`` / ``OSError`` for the caller to report.
Without ``--model`` the entry point (``nvila.cli.main``, ``python -m nvila.server``) passes the
bundled SynthVILA checkpoint (``nvila.bundled``).
Once the socket is bound, one ready line goes to stderr::

    nvila serve: ready on http://127.0.0.1:8000 (model NAME; media: data: URLs; API key off)

then one INFO log line per finished request (logged live, also under the ``nvila`` command line,
which otherwise holds its logs until a command ends). SIGINT / SIGTERM shut down gracefully: uvicorn stops
accepting, running responses get ``--shutdown-timeout`` seconds, then the engine is shut down.
SIGTERM then exits 0; SIGINT surfaces as ``KeyboardInterrupt``. FastAPI, uvicorn and torch are
imported only when the command runs.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import logging.handlers
import os
import signal
import sys
import threading
from collections.abc import Iterator

from ..argtypes import positive_int
from .limits import ServerLimits

HELP = "serve a checkpoint over an OpenAI-compatible HTTP API, with a web demo page"
DTYPES = ("float32", "bfloat16", "float16")
MAX_PIXELS = 25_000_000  # a 5000x5000 image decodes to 75 MB of RGB; the library's own default is 100 MP


def _port(text: str) -> int:
    if not text.isdigit() or int(text) > 65535:
        raise argparse.ArgumentTypeError(f"expected a port number 0..65535, got {text!r}")
    return int(text)


def add_arguments(p: argparse.ArgumentParser) -> None:
    """Declare the ``serve`` flags on ``p``."""
    d = ServerLimits()
    p.add_argument("--model", metavar="PATH",
                   help="checkpoint directory (vila or hf layout) or a Hugging Face Hub id ORG/NAME[@REVISION] "
                        "(default: the bundled SynthVILA model)")
    net = p.add_argument_group("network")
    net.add_argument("--host", default="127.0.0.1", help="address to bind (default: %(default)s; 0.0.0.0 exposes it)")
    net.add_argument("--port", type=_port, default=8000, help="port (default: %(default)s; 0 picks a free one)")
    net.add_argument("--api-key", metavar="KEY",
                     help="require 'Authorization: Bearer KEY' on /v1 routes (default: the NVILA_API_KEY "
                          "environment variable, else no key)")
    net.add_argument("--allow-local-media", action="store_true",
                     help="accept local paths and file:// URLs as media (they read this machine's disk)")
    net.add_argument("--allow-remote-media", action="store_true",
                     help="fetch http(s):// media URLs (the server makes outbound requests)")
    net.add_argument("--shutdown-timeout", type=float, default=10.0, metavar="S",
                     help="seconds running responses get on shutdown before they are cancelled (default: %(default)s)")
    lim = p.add_argument_group("limits (violations are 4xx errors)")
    lim.add_argument("--max-body-mb", type=float, default=d.max_body_bytes / 2**20, metavar="MB",
                     help="largest request body, media included as data URLs (413; default: %(default)g)")
    lim.add_argument("--max-tokens", type=positive_int, default=d.max_tokens, metavar="N",
                     help="cap on a request's max_tokens (400 above it); the default for requests that "
                          "give none (default: %(default)s)")
    lim.add_argument("--max-media", type=positive_int, default=d.max_media, metavar="N",
                     help="most images + videos per request (default: %(default)s)")
    lim.add_argument("--max-pixels", type=positive_int, default=MAX_PIXELS, metavar="N",
                     help="reject images and video frames with more than N pixels, checked from the header before "
                          "decoding (400; default: %(default)s)")
    lim.add_argument("--max-video-frames", type=positive_int, metavar="N",
                     help="most frames a request may ask for with num_video_frames (default: the checkpoint's "
                          "num_video_frames)")
    eng = p.add_argument_group("engine")
    eng.add_argument("--max-batch-size", type=positive_int, default=8, metavar="N",
                     help="most requests decoded together (default: %(default)s)")
    eng.add_argument("--max-seq-len", type=positive_int, default=4096, metavar="N",
                     help="KV-cache length per request: prompt + answer (default: %(default)s)")
    eng.add_argument("--vision-cache-size", type=int, default=64, metavar="N",
                     help="media whose vision features are kept for follow-up turns (default: %(default)s)")
    eng.add_argument("--prefix-cache-mib", type=float, default=512.0, metavar="MIB",
                     help="memory for the KV of finished requests, reused by requests that start the same way "
                          "(follow-up turns, shared system prompts); 0 turns it off (default: %(default)s)")
    eng.add_argument("--no-cuda-graphs", dest="cuda_graphs", action="store_false",
                     help="on CUDA, launch each decode step's kernels one by one instead of replaying CUDA graphs")
    eng.add_argument("--threads", type=positive_int, metavar="N", help="CPU threads for torch")
    eng.add_argument("--dtype", choices=DTYPES, default="float32", help="weights dtype (default: %(default)s)")
    eng.add_argument("--device", metavar="DEV", help="torch device (default: cuda if available, else cpu)")


def run(args: argparse.Namespace) -> int:
    """Load the engine and serve until interrupted; returns the exit code."""
    import torch
    import uvicorn

    from ..config import NVILAConfig
    from ..engine import Engine, EngineConfig
    from .app import create_app

    api_key = args.api_key or os.environ.get("NVILA_API_KEY") or None
    ckpt_frames = NVILAConfig.from_pretrained(args.model).num_video_frames
    if args.max_video_frames is not None and args.max_video_frames < ckpt_frames:
        raise ValueError(f"--max-video-frames {args.max_video_frames} is below the checkpoint's own "
                         f"num_video_frames {ckpt_frames}, which requests that do not ask get")
    if args.max_body_mb <= 0:
        raise ValueError(f"--max-body-mb must be > 0, got {args.max_body_mb}")
    limits = ServerLimits(max_body_bytes=int(args.max_body_mb * 2**20), max_tokens=args.max_tokens,
                          max_media=args.max_media, max_video_frames=args.max_video_frames or ckpt_frames)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    config = EngineConfig(max_batch_size=args.max_batch_size, max_seq_len=args.max_seq_len, threads=args.threads,
                          vision_cache_size=args.vision_cache_size, prefix_cache_mib=args.prefix_cache_mib,
                          cuda_graphs=args.cuda_graphs)
    engine = Engine.from_pretrained(args.model, dtype=getattr(torch, args.dtype), device=device, config=config,
                                    max_pixels=args.max_pixels)
    try:
        app = create_app(engine, api_key=api_key, allow_local_media=args.allow_local_media,
                         allow_remote_media=args.allow_remote_media, limits=limits)
    except BaseException:
        engine.shutdown(wait=True)
        raise
    # log_config=None: uvicorn's dictConfig would close every existing handler, ours included; its
    # warnings and errors reach stderr through logging's last-resort handler instead.
    uv_config = uvicorn.Config(app, host=args.host, port=args.port, log_config=None, log_level="warning",
                               access_log=False, timeout_graceful_shutdown=args.shutdown_timeout, lifespan="on")
    media = ["data: URLs"] + ["local paths"] * args.allow_local_media + ["http(s) URLs"] * args.allow_remote_media
    note = f"model {engine.model_id}; media: {', '.join(media)}; API key {'required' if api_key else 'off'}"
    main_thread = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, lambda *_: None) if main_thread else None
    try:
        with _live_logs():
            started = _serve(uv_config, note)  # uvicorn re-raises the signal it stopped on: SIGTERM lands above
    finally:
        if main_thread:
            signal.signal(signal.SIGTERM, previous)
    sys.stderr.write("nvila serve: stopped\n")
    return 0 if started else 1


@contextlib.contextmanager
def _live_logs() -> Iterator[None]:
    """Log as the server goes, with the per-request lines (INFO) of ``nvila.server`` included.

    The ``nvila`` command line holds records in memory handlers until a command ends; a server
    never ends, so those handlers are flushed and swapped for their targets while it runs.
    """
    root, server = logging.getLogger("nvila"), logging.getLogger("nvila.server")
    held = [h for h in root.handlers if isinstance(h, logging.handlers.MemoryHandler) and h.target is not None]
    for h in held:
        h.flush()
        root.removeHandler(h)
        root.addHandler(h.target)
    level = server.level
    if server.getEffectiveLevel() > logging.INFO:
        server.setLevel(logging.INFO)
    try:
        yield
    finally:
        server.setLevel(level)
        for h in held:
            root.removeHandler(h.target)
            root.addHandler(h)


def _serve(config, note: str) -> bool:
    """Run uvicorn until it stops, writing the ready line once the socket is bound; returns whether it started."""
    import uvicorn

    class Server(uvicorn.Server):
        async def startup(self, sockets=None):
            await super().startup(sockets)
            if self.started:
                host, port = self.servers[0].sockets[0].getsockname()[:2]
                host = f"[{host}]" if ":" in host else host
                sys.stderr.write(f"nvila serve: ready on http://{host}:{port} ({note})\n")
                sys.stderr.flush()

    server = Server(config)
    try:
        server.run()
    except SystemExit:  # uvicorn exits when it cannot start (e.g. the port is taken; it logged why)
        if server.started:
            raise
        raise OSError(f"cannot serve on {config.host}:{config.port}") from None
    return server.started
