"""``personajudge serve``: an OpenAI-compatible HTTP server over the engine (the ``serve`` extra).

FastAPI, uvicorn and prometheus-client are imported only here, so the rest of
the package (and ``personajudge plugins``) works without the extra.
"""

from .app import APIError, Server, create_app, map_error

__all__ = ["APIError", "Server", "create_app", "map_error"]
