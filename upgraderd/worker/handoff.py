"""Give live connections to another worker of the same master, and take them.

A worker that can take connections opens a `Taker` before it says READY=1:
it listens on `$UPGRADERD_HANDOFF_DIR/handoff-<gen>-<slot>` (contract/wire.py).
A draining worker opens a `Giver`, which finds the takers of the oldest
generation newer than its own (or, if there is none, its siblings: a slot
retired by TTOU), and offers them its connections, pipelined and spread
round-robin. Each connection moves with its listener name, an opaque state
blob, the bytes read but not handled, and the output not yet sent.

    taker = handoff.Taker(listeners)          # before worker.ready()
    ... register taker.fileno() for reading in your event loop ...
    for moved in taker.poll():                # when readable, and now and then
        serve(moved.sock, moved.state, moved.unhandled, moved.unsent)
    if taker.arriving: ...                    # a give is under way: more will come

    giver = handoff.Giver()                   # at a reload's drain (Drain.reason == "reload")
    giver.find()
    stop reading every connection, then:
    for h, theirs in zip(moving, giver.give_many(moving)):
        if theirs: h.sock.close()             # it is theirs now
        else: ... serve it on as if nothing happened ...
    giver.close()

The exchange is in upgraderd/contract/wire.py and docs/workers.md, section 8.
`give_many()` blocks for at most `timeout` per round and taker, and ends each
give with END, which is what brings `Taker.arriving` back to 0. An event loop
gives through an `Outbox` (upgraderd/worker/outbox.py) instead, which never
blocks and sends no END (its lanes end when their channel closes). Every
failure is counted by reason in `Giver.failures` / `Taker.failures` and never raised.
"""

from __future__ import annotations

from upgraderd.worker.giver import Giver
from upgraderd.worker.moved import Handed, enabled
from upgraderd.worker.taker import Taker

__all__ = ["Giver", "Handed", "Taker", "enabled"]
