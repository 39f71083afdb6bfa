"""Request metrics of the asgi: worker at the master's /metrics (apps/asgi/reqmetrics.py).

Known requests with known statuses, over keep-alive and refused ones, must
show up as exact counts by status class, as the duration histogram's count,
and open WebSockets as the gauge; after a reload the counts stay (the
master keeps a reaped worker's counters).
"""

from __future__ import annotations

import http.client
import socket
import textwrap

import pytest
from websockets.sync.client import connect

from tests.support.scrape import scrape, value
from tests.support.upgraderd_proc import Daemon, free_port, wait_until

pytestmark = pytest.mark.e2e

APP = '''
async def app(scope, receive, send):
    if scope["type"] == "lifespan":
        while (await receive())["type"] != "lifespan.shutdown":
            await send({"type": "lifespan.startup.complete"})
        await send({"type": "lifespan.shutdown.complete"})
        return
    if scope["type"] == "websocket":
        await receive()
        await send({"type": "websocket.accept"})
        while (await receive())["type"] != "websocket.disconnect":
            pass
        return
    status = scope["query_string"].decode()
    if status == "raise":
        raise RuntimeError("a failing endpoint")
    await send({"type": "http.response.start", "status": int(status), "headers": [(b"content-length", b"2")]})
    await send({"type": "http.response.body", "body": b"ok"})
'''
# status -> requests: answered by the app, and 500s for the app raising
ASKED = {"200": 7, "204": 2, "301": 1, "404": 3, "raise": 2}
MALFORMED = 2   # refused with 400 by the server, without the app
EXPECTED = {"1xx": 0, "2xx": 9, "3xx": 1, "4xx": 3 + MALFORMED, "5xx": 2}


def test_requests_by_status_class_duration_and_open_websockets(tmp_path):
    (tmp_path / "statusapp.py").write_text(textwrap.dedent(APP))
    port = free_port()
    cfg = {"listeners": [{"name": "web", "host": "127.0.0.1", "port": port}],
           "workers": {"count": 2, "app": "asgi:statusapp:app", "cwd": str(tmp_path)},
           "metrics": {"listen": f"127.0.0.1:{free_port()}"}}
    with Daemon(tmp_path, cfg).start() as d:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
        for query, n in ASKED.items():
            for _ in range(n):
                conn.request("GET", f"/?{query}")
                resp = conn.getresponse()
                resp.read()
                assert resp.status == (500 if query == "raise" else int(query))
                if resp.will_close:
                    conn.close()
                    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
        conn.close()
        for _ in range(MALFORMED):   # Content-Length with Transfer-Encoding: a 400, no app
            with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
                s.sendall(b"POST / HTTP/1.1\r\nhost: x\r\ncontent-length: 3\r\ntransfer-encoding: chunked\r\n\r\n")
                assert s.recv(100).startswith(b"HTTP/1.1 400 ")
        total = sum(EXPECTED.values())

        def counted() -> dict | None:
            s = scrape(cfg)
            got = {c: value(s, "upgraderd_http_requests_total", listener="web", status_class=c)
                   for c in EXPECTED if c != "1xx"}
            return s if got == {c: n for c, n in EXPECTED.items() if c != "1xx"} else None
        s = wait_until(counted, 10, f"{EXPECTED} requests in the metrics")
        assert value(s, "upgraderd_http_request_duration_seconds_count", listener="web") == total
        assert value(s, "upgraderd_http_request_duration_seconds_bucket", listener="web", le="+Inf") == total
        assert 0 < value(s, "upgraderd_http_request_duration_seconds_sum", listener="web") < total * 5

        with connect(f"ws://127.0.0.1:{port}/ws"), connect(f"ws://127.0.0.1:{port}/ws"):
            wait_until(lambda: value(scrape(cfg), "upgraderd_websockets_open", listener="web", state="active") == 2,
                       10, "2 open WebSockets in the metrics")
        wait_until(lambda: value(scrape(cfg), "upgraderd_websockets_open", listener="web", state="active") == 0,
                   10, "no open WebSocket in the metrics")

        d.reload_to(2)   # the first generation's workers exit: their counts stay
        wait_until(lambda: value(scrape(cfg), "upgraderd_draining_workers") == 0, 20, "generation 1's workers reaped")
        s = scrape(cfg)
        for c, n in EXPECTED.items():
            if c != "1xx":
                assert value(s, "upgraderd_http_requests_total", listener="web", status_class=c) == n, c
        assert value(s, "upgraderd_http_request_duration_seconds_count", listener="web") == total
