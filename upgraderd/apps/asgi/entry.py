"""Load an `asgi:` or `wsgi:` app in the template; run one worker of it after the fork.

The import happens in the template, before any fork, so the app's modules
(FastAPI, Django, ...) are shared by every worker of the generation. Nothing
here may start a thread or an event loop: the template forks afterwards.
"""

from __future__ import annotations

import importlib
from typing import Any, Callable

from upgraderd.apps.asgi import server, settings


def load(spec: str) -> Callable[[], int]:
    """Import the app `kind:package.module:name`; return what runs one worker of it."""
    kind, _, rest = spec.partition(":")
    modname, _, attr = rest.partition(":")
    app: Any = importlib.import_module(modname)
    for part in attr.split("."):
        app = getattr(app, part)
    if not callable(app):
        raise TypeError(f"{spec}: {attr} is not callable")
    import httptools  # noqa: F401  (before the fork: its pages are shared)
    for optional in ("uvloop", "upgraderd.apps.asgi.websocket"):
        try:
            # The WebSocket side too: wsproto's import builds a 64 KiB XOR table, which each of
            # the workers of a cold template paid after the fork, before READY=1 (tens of ms each).
            importlib.import_module(optional)
        except ImportError:
            pass
    if kind == "wsgi":
        from upgraderd.apps.asgi.wsgi import WsgiApp
        app = WsgiApp(app)

    def run() -> int:
        return server.main(app, settings.from_environment())
    return run
