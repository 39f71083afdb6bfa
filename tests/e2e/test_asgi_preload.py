"""A warm standby for an `asgi:` app preloads the ASGI stack and `workers.preload`, never stale code.

The standby of an `asgi:` config imports upgraderd's ASGI server and its
libraries, the modules of `workers.preload`, and what the previous template
imported from the standard library and site-packages (never the app's own
modules), before the HUP. A HUP with
those files unchanged is served by the standby (a warm template); a deploy
that rewrote a preloaded module makes the standby exec a fresh template
(logged with the module), and the new generation answers with the new code.
"""

from __future__ import annotations

import http.client
import re
import textwrap
from pathlib import Path

import pytest

from tests.support.scrape import scrape, value
from tests.support.upgraderd_proc import Daemon, free_port, wait_until

pytestmark = pytest.mark.e2e

APP = '''
import decimal   # the standard library: recorded by the template, imported by the next standby
import os
import deplib

async def app(scope, receive, send):
    if scope["type"] == "lifespan":
        while (await receive())["type"] != "lifespan.shutdown":
            await send({"type": "lifespan.startup.complete"})
        await send({"type": "lifespan.shutdown.complete"})
        return
    body = f"{deplib.VERSION} {os.environ.get('UPGRADERD_GENERATION')}".encode()
    await send({"type": "http.response.start", "status": 200, "headers": [(b"content-length", b"%d" % len(body))]})
    await send({"type": "http.response.body", "body": body})
'''


def ask(port: int) -> str:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        conn.request("GET", "/")
        return conn.getresponse().read().decode()
    finally:
        conn.close()


def serving_pids(d: Daemon) -> set[int]:
    """Return the worker pids of the ACTIVE generations, from the status file."""
    return {w["pid"] for g in (d.status() or {})["generations"] if g["state"] == "ACTIVE"
            for w in g["workers"] if w["pid"] is not None}


def reload_to(d: Daemon, generation: int) -> None:
    """Reload, and wait until the previous generation's workers have exited. In `reuseport`
    mode a slot's socket is the same for both generations, so an old worker accepts until it
    has read its drain signal, which can come a few ms after `reload done` (CI: a connection
    made right after `reload done: generation 2 ACTIVE` was answered by generation 1)."""
    old = serving_pids(d)
    assert old
    d.reload_to(generation)
    wait_until(lambda: not d.workers() & old, 20, f"generation {generation - 1}'s workers {sorted(old)} gone")


def test_standby_preloads_and_is_replaced_when_a_preloaded_module_changed(tmp_path):
    (tmp_path / "deplib.py").write_text("VERSION = 'lib-1'\n")
    (tmp_path / "webapp.py").write_text(textwrap.dedent(APP))
    port = free_port()
    cfg = {"listeners": [{"name": "web", "host": "127.0.0.1", "port": port}],
           "workers": {"count": 1, "app": "asgi:webapp:app", "cwd": str(tmp_path), "warm": True,
                       "preload": ["deplib"], "env": {"PYTHONDONTWRITEBYTECODE": "1"}},
           "metrics": {"listen": f"127.0.0.1:{free_port()}"}}
    with Daemon(tmp_path, cfg).start() as d:
        found = d.wait_log(r"upgraderd template (\d+): standby preloaded asgi, deplib \(\d+ modules\)")
        pid = int(found[0].group(1))
        assert pid in d.workers()
        d.wait_log(rf"upgraderd template {pid}: standby imported [1-9]\d* modules the previous template had")
        maps = Path(f"/proc/{pid}/maps").read_text()
        assert "httptools" in maps   # the ASGI stack's C extension is in the standby already
        assert "_decimal" in maps    # the app's import of decimal (a C extension), from the record
        channels = dict(v.split("=", 1) for v in Path(f"/proc/{pid}/environ").read_text().split("\0") if "=" in v)
        recorded = (Path(channels["UPGRADERD_HANDOFF_DIR"]) / "template-modules").read_text().split()
        assert "decimal" in recorded and "webapp" not in recorded and "deplib" not in recorded

        reload_to(d, 2)    # nothing changed on disk: the standby takes the generation
        assert re.search(r"generation 2: template pid \d+ started \(warm standby\)", d.log())
        assert "exec'ing a fresh template" not in d.log()
        assert ask(port) == "lib-1 2"

        d.wait_log(r"standby preloaded asgi, deplib", count=2)
        (tmp_path / "deplib.py").write_text("VERSION = 'lib-two'\n")   # a deploy rewrites a preloaded module
        reload_to(d, 3)
        assert re.search(r"module deplib \(.*deplib\.py\) changed on disk since the standby imported it; "
                         r"exec'ing a fresh template", d.log())
        assert ask(port) == "lib-two 3"
        samples = scrape(cfg)
        assert value(samples, "upgraderd_templates_started_total", kind="warm") == 2
