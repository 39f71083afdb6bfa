"""The built-in HTTP/1.1 worker: a small responder for health checks and load tests.

Every request gets `200 OK` with a short text body naming the generation,
slot and pid that answered (so a test can tell generations apart). Answers
are counted as the asgi: server counts them (`upgraderd_http_requests_total`
and the duration histogram, apps/httpcounts.py), from the read that completed
the request's head to the answer made. Keep-alive
is honoured. With `drain.handoff: auto`, a draining worker hands each
keep-alive connection to the new generation between two requests. Without
it (or if no worker takes it), the next response carries `Connection: close`
and idle connections are closed only after a grace period, so a client that
is about to reuse a connection is never cut off mid-request.
"""

from __future__ import annotations

import os
import time

from upgraderd.apps import httpcounts, run
from upgraderd.contract import env

MAX_HEAD = 64 * 1024


class Http:
    """A minimal HTTP/1.1 protocol handler (GET/HEAD/anything: same answer)."""

    def __init__(self, listener: str) -> None:
        self.listener = listener
        self.buf = bytearray()
        self.close = False
        self.draining = False
        gen = os.environ.get(env.GENERATION, "0")
        slot = os.environ.get(env.SLOT, "0")
        self.body = f"generation={gen} slot={slot} pid={os.getpid()}\n".encode()
        self.counts = httpcounts.for_thread(listener)

    def received(self, data: bytes) -> bytes:
        """Answer every complete request in the buffer."""
        self.buf += data
        out = bytearray()
        began = time.perf_counter()
        while not self.close:
            end = self.buf.find(b"\r\n\r\n")
            if end < 0:
                if len(self.buf) > MAX_HEAD:
                    out += self._response(b"431 Request Header Fields Too Large", b"", False, close=True)
                    self.counts.request(self.listener, 431, time.perf_counter() - began)
                break
            head = bytes(self.buf[:end]).decode("latin-1")
            del self.buf[:end + 4]
            answer = self._answer(head)
            self.counts.request(self.listener, int(answer[9:12]), time.perf_counter() - began)
            out += answer
        return bytes(out)

    def _answer(self, head: str) -> bytes:
        lines = head.split("\r\n")
        parts = lines[0].split(" ")
        if len(parts) != 3 or not parts[2].startswith("HTTP/1."):
            return self._response(b"400 Bad Request", b"bad request\n", False, close=True)
        headers = {k.strip().lower(): v.strip() for k, _, v in (ln.partition(":") for ln in lines[1:])}
        if int(headers.get("content-length", "0") or 0) > 0:
            return self._response(b"400 Bad Request", b"request bodies are not supported\n",
                                  False, close=True)
        conn = headers.get("connection", "").lower()
        close = self.draining or conn == "close" or (parts[2] == "HTTP/1.0" and conn != "keep-alive")
        return self._response(b"200 OK", self.body, parts[0] == "HEAD", close)

    def _response(self, status: bytes, body: bytes, head_only: bool, close: bool) -> bytes:
        self.close = self.close or close
        hdr = (b"HTTP/1.1 " + status + b"\r\nContent-Type: text/plain\r\nContent-Length: "
               + str(len(body)).encode() + b"\r\nConnection: " + (b"close" if close else b"keep-alive")
               + b"\r\n\r\n")
        return hdr if head_only else hdr + body

    def closing(self) -> bool:
        """Close once a `Connection: close` response is flushed."""
        return self.close

    def idle(self) -> bool:
        """Idle when no partial request is buffered."""
        return not self.buf

    def drain(self) -> None:
        """Answer the next request with `Connection: close`."""
        self.draining = True

    def handoff_state(self) -> tuple[bytes, bytes] | None:
        """Move only between requests: never while a request is half read."""
        return None if self.buf or self.close else (b"", b"")

    def restore(self, state: bytes) -> None:
        """Nothing to restore: the new worker answers with its own generation."""


def main() -> int:
    """Serve HTTP on every inherited listener."""
    return run.main(Http)


if __name__ == "__main__":
    raise SystemExit(main())
