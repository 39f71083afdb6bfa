"""Give live connections to another worker of the same master, and take them.

A worker that can take connections opens a `Taker` before it says READY=1:
it listens on the abstract Unix socket `@upgraderd-<master>-handoff-<gen>-<slot>`.
A draining worker opens a `Giver`, which finds the takers of the newest
generation newer than its own (or, if there is none, its siblings: a slot
retired by TTOU), and offers them its connections one at a time, spread
round-robin. Each connection moves with its listener name, an opaque state
blob, the bytes read but not handled, and the output not yet sent.

    taker = handoff.Taker(listeners)          # before worker.ready()
    ... register taker.fileno() for reading in your event loop ...
    for moved in taker.poll():                # when readable, and now and then
        serve(moved.sock, moved.state, moved.unhandled, moved.unsent)

    giver = handoff.Giver()                   # at drain
    giver.find()
    stop reading conn, then:
    if giver.give(handoff.Handed(sock, "web", state, unhandled, unsent)):
        sock.close()                          # it is theirs now
    else:
        ... serve it on as if nothing happened ...

The exchange is in upgraderd/contract/wire.py and docs/workers.md. `give()`
blocks for at most `timeout` per receiver it tries; an event loop gives
through an `Outbox` (upgraderd/worker/outbox.py) instead, which never blocks. Every failure is counted
by reason in `Giver.failures` / `Taker.failures` and never raised.
"""

from __future__ import annotations

from upgraderd.worker.giver import Giver
from upgraderd.worker.moved import Handed, enabled
from upgraderd.worker.taker import Taker

__all__ = ["Giver", "Handed", "Taker", "enabled"]
