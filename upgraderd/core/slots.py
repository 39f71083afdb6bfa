"""The slots: the owner of worker slots' sockets: TTIN and TTOU, steering, rescue, retirement.

`Slots` is the only writer of the kernel setting as last read
(net.ipv4.tcp_migrate_req) and the only caller of the listener, kernel and
rescue seams after start-up, besides a reload binding its config's sockets.
It reads the generations from the fleet (core/fleet.py) and reports to the
bus: sockets retired unsafely, steering refused, connections rescued.

A change of scale (TTIN/TTOU) lasts until the next reload, which goes back to
`workers.count`. In `reuseport` mode a slot has its own socket:
- a new slot's socket is bound before its worker starts;
- a retiring slot's socket is closed once nothing serves it, and the kernel
  resets what is still queued on it unless net.ipv4.tcp_migrate_req=1
  (counted in upgraderd_slot_retire_risks_total).

The port groups are checked for strangers (another process listening on one
of the ACTIVE config's TCP addresses, system/strangers.py) at every reload,
which a stranger fails, and every STRANGER_CHECK seconds in between: what
the last check found is `strangers`, which the snapshot carries to /readyz
(503 while there is one) and to upgraderd_reuseport_foreign_listeners. A
stranger is logged when it appears and its leaving once. The check is one
sock_diag dump; /proc is read only while there is a stranger to name.
"""

from __future__ import annotations

import logging
from typing import Callable, Iterable

from upgraderd.config.schema import Config
from upgraderd.core import events as ev
from upgraderd.core import rescue
from upgraderd.core.fleet import Fleet
from upgraderd.core.generation import WorkerState
from upgraderd.core.seams import KernelAPI, ListenerAPI, RescueAPI, SocketKey, key_address, keys_for

log = logging.getLogger("upgraderd")

# Seconds between two checks of the port groups for strangers, between reloads.
STRANGER_CHECK = 2.0


class Slots:
    """Scale, steer, rescue and retire the slots of the fleet's generations."""

    def __init__(self, fleet: Fleet, listeners: ListenerAPI, kernel: KernelAPI, rescuer: RescueAPI | None,
                 bus: ev.Bus, find_strangers: Callable[[Config], list[str]] = lambda cfg: []) -> None:
        self.fleet, self.listeners, self.kernel, self.rescuer, self.bus = fleet, listeners, kernel, rescuer, bus
        self.tcp_migrate_req: int | None = None   # as last read; None: unavailable
        self.find_strangers = find_strangers
        self.strangers: tuple[str, ...] = ()       # as the last check found them
        self._check_at = 0.0

    def add_worker(self, now: float) -> None:
        """Start one more worker, in a new slot of the ACTIVE generation (SIGTTIN)."""
        gen = self.fleet.active
        if gen is None or self.fleet.stopping:
            log.warning("received SIGTTIN: ignored, no ACTIVE generation")
            return
        try:
            # Only the new slot: a retiring slot's socket is closed on purpose, and
            # binding it again would let connections queue where nobody accepts.
            self.listeners.ensure(gen.config, slots=[max(gen.workers, default=-1) + 1])
        except OSError as e:
            log.error("received SIGTTIN: cannot add a worker: %s", e)
            return
        slot = gen.add_slot(now)
        log.info("received SIGTTIN: generation %d slot %d added, %d workers (a reload goes back to "
                 "workers.count=%d)", gen.number, slot, len(gen.workers), gen.config.workers.count)

    def remove_worker(self, now: float) -> None:
        """Drain the highest slot of the ACTIVE generation (SIGTTOU)."""
        gen = self.fleet.active
        if gen is None or self.fleet.stopping:
            log.warning("received SIGTTOU: ignored, no ACTIVE generation")
            return
        serving = [s for s, w in gen.workers.items() if not w.retiring]
        if len(serving) > 1:
            self.steer(without=max(serving))   # away from the slot before its worker drains
        slot = gen.remove_slot(now)
        if slot is None:
            log.warning("received SIGTTOU: ignored, generation %d is down to one worker", gen.number)
            return
        left = len([w for w in gen.workers.values() if not w.retiring])
        log.info("received SIGTTOU: generation %d slot %d retiring, %d workers left (a reload goes back "
                 "to workers.count=%d)", gen.number, slot, left, gen.config.workers.count)

    def warn_growth(self, cfg: Config) -> None:
        """Warn when a reload adds reuseport slots whose sockets take connections before they are ready."""
        active = self.fleet.active
        if active is None or cfg.workers.count <= len(active.workers):
            return
        if any(s.mode == "reuseport" for s in cfg.listeners) and self.kernel.retire_risk() \
                and not self.listeners.is_steered(cfg):
            # The new slots' sockets join the port group now, before the generation is
            # ready; should it fail, they close with whatever the kernel queued on them.
            log.warning("the reload adds worker slots whose sockets take connections before generation %d "
                        "is ready: if it fails, those connections are reset (net.ipv4.tcp_migrate_req is "
                        "not 1)", self.fleet.next_number)

    def check_kernel(self, cfg: Config) -> None:
        """Read (and with `kernel.tcp_migrate_req: set`, set) net.ipv4.tcp_migrate_req."""
        bound = [s.name for s in cfg.listeners if s.mode == "worker-bind"]
        state = self.kernel.ensure_migrate_req(cfg.kernel.tcp_migrate_req, bound)
        self.tcp_migrate_req = state.value
        for line in state.info:
            log.info("%s", line)
        for line in state.warnings:
            log.warning("%s", line)

    def worker_bind_reset_risk(self, configs: Iterable[Config]) -> bool:
        """Return True if draining a worker-bind listener of `configs` can reset queued connections now."""
        bound = any(s.mode == "worker-bind" for c in configs for s in c.listeners)
        return bound and self.tcp_migrate_req != 1

    def close_unused(self) -> None:
        """Close every socket no STARTING or ACTIVE slot will accept on again.

        Draining workers no longer accept, so they do not keep a socket open; a
        socket kept for them would queue connections that nobody serves. A
        steered socket that a live worker still holds is parked instead: it gets
        no new connection, and closes once its worker is gone, so nothing queued
        on it is reset.
        """
        self._rescue()   # what a dead slot's socket queued goes to its siblings, before any close
        wanted: set[SocketKey] = set()
        held: set[SocketKey] = set()
        for g in self.fleet.generations:
            wanted |= keys_for(g.config, g.serving_slots(), g.number)
            held |= keys_for(g.config, [w.slot for w in g.pids().values()], g.number)
        done = self.listeners.retire(wanted, held)
        if self.fleet.stopping:
            return
        for key in done.closed:
            log.info("closed listener %s (%s, slot %d): no slot serves it any more",
                     key_address(key), key[2], key[3])
        unsafe = [key for key in done.unsafe if key[2] == "reuseport"]
        if unsafe and (risk := self.kernel.retire_risk()) is not None:
            self.bus.emit(ev.SlotsRetiredUnsafely(len(unsafe)))
            log.warning("closed %d reuseport slot socket(s): %s", len(unsafe), risk)

    def _rescue(self) -> None:
        gen = self.fleet.active
        if gen is None or self.fleet.stopping or self.rescuer is None:
            return
        for rescued in rescue.run(gen, self.rescuer):
            self.bus.emit(rescued)

    def next_deadline(self, now: float) -> float | None:
        """Return when a slot needs the loop again (a dead slot's socket is watched for late arrivals).

        Not the check of the port groups: the loop passes at least once a second anyway.
        """
        gen = self.fleet.active
        if gen is None or self.fleet.stopping or self.rescuer is None:
            return None
        return rescue.deadline(gen, now)

    def steer_and_check(self, now: float) -> None:
        """Steer (every pass), and check the port groups for strangers when that is due."""
        gen = self.fleet.active
        due = gen is not None and not self.fleet.stopping and now >= self._check_at
        if due:
            self._check_at = now + STRANGER_CHECK   # first: a check that raises is not retried at once
        self.steer()
        if gen is None or not due:
            return
        found = tuple(self.find_strangers(gen.config))
        for line in found:
            if line not in self.strangers:
                log.warning("port group shared: %s (/readyz answers 503 until it leaves)", line)
        if self.strangers and not found:
            log.info("port group: no stranger listens on this master's addresses any more")
        self.strangers = found

    def steer(self, without: int | None = None) -> None:
        """Confine new connections to the READY slots of the ACTIVE and the held generation (reuseport steering)."""
        gen = self.fleet.active
        if gen is None or self.fleet.stopping:
            return
        ready = [s for s, w in gen.workers.items()
                 if w.state is WorkerState.READY and not w.retiring and s != without]
        held = self.fleet.held   # a rollout's new generation: its READY slots accept too (batches
        if held is not None:     # hand the old generation's slots over to it one by one)
            ready += [s for s, w in held.workers.items()
                      if w.state is WorkerState.READY and s not in ready and s != without]
        before = self.listeners.steer_refused
        note = self.listeners.steer(gen.config, ready, gen.number)
        if (refused := self.listeners.steer_refused - before) > 0:
            self.bus.emit(ev.SteeringRefused(refused))
        if note is not None:
            log.warning("steering: %s", note)
