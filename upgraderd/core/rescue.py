"""Connections queued on the socket of a reuseport slot that lost its worker go to its siblings.

Steering (`Slots.steer`, core/slots.py) sends new connections only to READY slots, but the
kernel queues on a slot's socket whatever arrived before the master saw its
worker die: between the crash and the next pass. Nobody accepts them while
the slot is in back-off, nor if each respawned worker dies again before it
accepts; once the slot is FATAL its socket closes, and at
net.ipv4.tcp_migrate_req=0 the kernel resets them.

So on every pass, before any socket closes (`Slots.close_unused`), the master
takes what is queued on the sockets of the ACTIVE generation's slots in
BACKOFF or FATAL, and hands it to that generation's READY workers over their
hand-off channels (system/rescuer.py). While a slot is in back-off it keeps
looking, every POLL seconds, for connections whose handshake finished after
the steering changed. These functions decide; `Slots` (core/slots.py) owns
the seam and reports what was rescued. Workers without a hand-off channel (any `command:`
program that does not open one) get nothing: the connections then stay
queued, for the respawned worker to accept, as before.
"""

from __future__ import annotations

from upgraderd.core.events import ConnectionsRescued
from upgraderd.core.generation import Generation, WorkerState
from upgraderd.core.seams import Rescue, RescueAPI, key_address, key_for

# How often a slot in back-off is looked at for connections that queued late.
POLL = 0.05

DEAD = (WorkerState.BACKOFF, WorkerState.FATAL)


def plan(gen: Generation) -> Rescue | None:
    """Return what to rescue now in the ACTIVE `gen`: the reuseport sockets of dead slots and the READY
    slots to take them."""
    dead = sorted(s for s, w in gen.workers.items() if w.state in DEAD and not w.retiring)
    takers = tuple(sorted(s for s, w in gen.workers.items() if w.state is WorkerState.READY and not w.retiring))
    # TCP only: a UDP slot socket's datagrams wait for the respawned worker (accept() fails on it).
    socks = tuple((key_for(spec, s), spec.name) for s in dead for spec in gen.config.listeners
                  if spec.mode == "reuseport" and spec.protocol == "tcp")
    if not socks or not takers:
        return None
    return Rescue(gen.number, socks, takers)


def run(gen: Generation, rescuer: RescueAPI) -> list[ConnectionsRescued]:
    """Take what is queued on the dead slots' sockets of the ACTIVE `gen` to hand it to READY siblings;
    return what was taken, per socket that had any."""
    todo = plan(gen)
    if todo is None:
        return []
    counts = rescuer.rescue(todo)
    return [ConnectionsRescued(n, todo.generation, key[3], name, key_address(key), todo.takers)
            for (key, name), n in zip(todo.sockets, counts) if n]


def deadline(gen: Generation, now: float) -> float | None:
    """Return when to look again: soon while a slot of the ACTIVE `gen` is in back-off."""
    if plan(gen) is None:
        return None
    backoff = any(w.state is WorkerState.BACKOFF and not w.retiring for w in gen.workers.values())
    return now + POLL if backoff else None
