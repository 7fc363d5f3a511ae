"""The OpenAI-compatible server: ``create_app(engine, ...)`` and ``ServerLimits`` (app.py), the
``nvila serve`` command (cli.py), and the web demo page (static/).

``create_app`` and ``ServerLimits`` are imported on first use, so that ``nvila.server.cli`` can be
registered in the ``nvila`` command line without the ``[serve]`` extra (FastAPI, uvicorn) installed.
"""

__all__ = ["ServerLimits", "create_app"]


def __getattr__(name: str):
    if name == "create_app":
        from .app import create_app

        return create_app
    if name == "ServerLimits":
        from .limits import ServerLimits

        return ServerLimits
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
