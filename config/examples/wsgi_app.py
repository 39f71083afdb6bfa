"""A small WSGI app for the gunicorn example (config/examples/gunicorn.yaml).

Every answer names the generation, slot and pid that served it, so a client
can see a reload take effect, and echoes the client's port and the request path.
upgraderd passes UPGRADERD_GENERATION and UPGRADERD_SLOT to the gunicorn master,
and its forked workers inherit them.
"""

from __future__ import annotations

import os
from typing import Callable, Iterable

VERSION = os.environ.get("APP_VERSION", "1")
SERVER = os.environ.get("APP_SERVER", "gunicorn")   # `upgraderd` when served as `app: wsgi:wsgi_app:app`


def app(environ: dict[str, object], start_response: Callable[..., object]) -> Iterable[bytes]:
    """Answer every request with 200 and who served it."""
    body = (f"generation={os.environ.get('UPGRADERD_GENERATION', '?')} "
            f"slot={os.environ.get('UPGRADERD_SLOT', '?')} pid={os.getpid()} "
            f"server={SERVER} version={VERSION} peer={environ.get('REMOTE_PORT', '')} "
            f"path={environ.get('PATH_INFO', '')}\n").encode()
    start_response("200 OK", [("Content-Type", "text/plain"), ("Content-Length", str(len(body)))])
    return [body]
