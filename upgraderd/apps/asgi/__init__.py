"""upgraderd's own HTTP/1.1 server for Python web apps: `app: "asgi:pkg.mod:app"` or `"wsgi:..."`.

Forked from the generation's template like the built-in apps (the app module
is imported once, in the template), it serves on the inherited listeners
and, because it owns each connection's protocol state, hands live keep-alive
connections to the next generation between two requests (moves.py).

- entry.py    what the template calls: import the app, then run a worker
- server.py   the worker: accept loop, signals, lifespan, drain
- h1.py       one connection: httptools parsing, limits, timeouts, keep-alive
- cycle.py    one request's ASGI receive/send
- moves.py    hand-off through upgraderd/worker/handoff.py
- wsgi.py     a PEP 3333 app run in a thread pool, behind the same server
- lifespan.py, accesslog.py, settings.py

Parsing comes from httptools (llhttp, strict: the request-smuggling shapes
are errors); the loop is asyncio, on uvloop when installed. Like every app
package, it imports neither the core, the service nor the metrics layer.
"""
