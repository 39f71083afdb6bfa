"""A Flask app, unchanged, served by upgraderd as `app: "wsgi:flask_app:app"` (tests/e2e/test_asgi.py).

Answers name the generation that served them; /seq/... also echoes the path and
the client's port, which tests/support/keepalive.py checks.
"""

from __future__ import annotations

import os

from flask import Flask, jsonify, request

app = Flask(__name__)


@app.get("/")
def hello():  # type: ignore[no-untyped-def]
    """JSON hello world."""
    return jsonify(hello="world", generation=os.environ.get("UPGRADERD_GENERATION", "0"))


@app.get("/seq/<int:client>/<int:n>")
def seq(client: int, n: int) -> str:
    """Who answered, to which request and which client port."""
    return (f"generation={os.environ.get('UPGRADERD_GENERATION', '0')} slot={os.environ.get('UPGRADERD_SLOT', '0')} "
            f"pid={os.getpid()} server=flask peer={request.environ.get('REMOTE_PORT', '')} "
            f"path=/seq/{client}/{n}\n")
