"""Connections queued on the socket of a reuseport slot that lost its worker go to its siblings.

Steering (slots.steer) sends new connections only to READY slots, but the
kernel queues on a slot's socket whatever arrived before the master saw its
worker die: between the crash and the next pass. Nobody accepts them while
the slot is in back-off, nor if each respawned worker dies again before it
accepts; once the slot is FATAL its socket closes, and at
net.ipv4.tcp_migrate_req=0 the kernel resets them.

So on every pass, before any socket closes (slots.close_unused), the master
takes what is queued on the sockets of the ACTIVE generation's slots in
BACKOFF or FATAL, and hands it to that generation's READY workers over their
hand-off channels (system/rescuer.py). While a slot is in back-off it keeps
looking, every POLL seconds, for connections whose handshake finished after
the steering changed. Workers without a hand-off channel (any `command:`
program that does not open one) get nothing: the connections then stay
queued, for the respawned worker to accept, as before.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from upgraderd.core.generation import WorkerState
from upgraderd.core.seams import Rescue, key_for

if TYPE_CHECKING:
    from upgraderd.core.master import Master

log = logging.getLogger("upgraderd")

# How often a slot in back-off is looked at for connections that queued late.
POLL = 0.05

DEAD = (WorkerState.BACKOFF, WorkerState.FATAL)


def plan(master: Master) -> Rescue | None:
    """Return what to rescue now: the reuseport sockets of dead slots and the READY slots to take them."""
    gen = master.active
    if gen is None or master.stopping or master.system.rescue is None:
        return None
    dead = sorted(s for s, w in gen.workers.items() if w.state in DEAD and not w.retiring)
    takers = tuple(sorted(s for s, w in gen.workers.items() if w.state is WorkerState.READY and not w.retiring))
    # TCP only: a UDP slot socket's datagrams wait for the respawned worker (accept() fails on it).
    socks = tuple((key_for(spec, s), spec.name) for s in dead for spec in gen.config.listeners
                  if spec.mode == "reuseport" and spec.protocol == "tcp")
    if not socks or not takers:
        return None
    return Rescue(gen.number, socks, takers)


def run(master: Master) -> None:
    """Take what is queued on dead slots' sockets and have it handed to READY siblings."""
    todo = plan(master)
    if todo is None or master.system.rescue is None:
        return
    counts = master.system.rescue.rescue(todo)
    for ((host, port, _, slot), name), n in zip(todo.sockets, counts):
        if n:
            master.stats.rescued_connections += n
            log.info("generation %d slot %d: took %d connection(s) queued on its socket (%s %s:%d), "
                     "handing them to slot(s) %s", todo.generation, slot, n, name, host, port,
                     ", ".join(map(str, todo.takers)))


def deadline(master: Master, now: float) -> float | None:
    """Return when to look again: soon while a slot of the ACTIVE generation is in back-off."""
    gen = master.active
    if plan(master) is None or gen is None:
        return None
    backoff = any(w.state is WorkerState.BACKOFF and not w.retiring for w in gen.workers.values())
    return now + POLL if backoff else None
