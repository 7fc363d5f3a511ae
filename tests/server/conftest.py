"""Server test fixtures (the helpers live in server_testing.py): a fake engine for in-process tests, and a live ``nvila serve`` on a tiny checkpoint.

``FakeEngine`` implements the engine contract (``submit`` -> handle; sync/async iteration of
``TokenEvent``s; ``cancel``; ``shutdown``) without a model: it decodes media with ``nvila.media``
(so bad media raise the real ``MediaError``) and answers ``"You said: <last user text>"`` one word per
event. ``live_server`` runs ``python -m nvila.server`` on a tiny NVILA-Lite checkpoint on 127.0.0.1.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import pytest
from server_testing import FakeEngine, LiveServer


def pytest_configure(config):
    config.addinivalue_line("markers", "browser: drives the web demo in headless Chromium (runs in CI)")


@pytest.fixture
def fake_engine() -> FakeEngine:
    return FakeEngine()


@pytest.fixture
def media_tmp(tmp_path, monkeypatch) -> Path:
    """A private temp directory for the server's media files (tempfile.gettempdir() points at it)."""
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    return tmp_path


# --------------------------------------------------------------------------------- live server
@pytest.fixture(scope="session")
def tiny_lite(tmp_path_factory) -> Path:
    from nvila.tiny import build_tiny_checkpoint

    return build_tiny_checkpoint(tmp_path_factory.mktemp("serve") / "nvila-lite-tiny", "nvila-lite")


@pytest.fixture(scope="session")
def live_server(tiny_lite):
    """A real server on a free port of 127.0.0.1: tiny NVILA-Lite, batch 8, 2 MiB bodies, 64-token cap."""
    server = LiveServer(["--model", str(tiny_lite), "--port", "0", "--max-batch-size", "8", "--max-seq-len", "2048",
                         "--max-body-mb", "2", "--max-tokens", "64", "--threads", "2"],
                        env={"MALLOC_ARENA_MAX": "2"})
    yield server
    server.stop()
