"""ListenerSet's part for steering: which sockets of each port group new connections may reach.

`steer()` runs every loop pass with the ready slots. It works out each port
group's wanted sockets (memoized: recomputed only when the config, the ready
slots, the generation, the sockets, the cookie pools or the parked set
changed), then attaches a group's program only when its wanted set changed
(steering.py builds the programs, sockets.py keeps the groups' order).
"""

from __future__ import annotations

import logging
import socket
from typing import Iterable

from upgraderd.config.schema import Config
from upgraderd.core.seams import SocketKey, key_for
from upgraderd.system import conflict, cookiepool, steering

log = logging.getLogger("upgraderd")

# A kernel SO_REUSEPORT group: family, bound address (as getsockname() says) and type.
GroupId = tuple[int, str, int, int]


class Steerer:
    """Steer each port group of a ListenerSet to its wanted sockets."""

    _socks: dict[SocketKey, socket.socket]
    _group_of: dict[SocketKey, GroupId]
    _groups: dict[GroupId, steering.Group[SocketKey]]
    _parked: set[SocketKey]
    _pool: cookiepool.Pool
    _membership: int
    _wanted: tuple[object, dict[GroupId, set[SocketKey]]] | None
    steer_refused: int

    def steer(self, cfg: Config, ready_slots: Iterable[int], gen: int = 0) -> str | None:
        """Send new connections of `cfg`'s port groups only to `ready_slots`' sockets.

        Returns what to log when something changed for the worse (nothing
        ready on a group, a program refused), else None. With no ready slot a
        group keeps its program. Cheap when nothing changed: no system call.
        """
        slots = tuple(ready_slots)
        inputs = (cfg, slots, gen, self._membership, self._pool.changes, frozenset(self._parked))
        if self._wanted is not None and self._wanted[0] == inputs:
            wanted = self._wanted[1]
        else:
            wanted = self._wanted_keys(cfg, slots, gen)
            self._wanted = (inputs, wanted)
        notes = [note for gid, keys in wanted.items()
                 if (note := self._steer_group(gid, frozenset(keys))) is not None]
        return "; ".join(notes) or None

    def _wanted_keys(self, cfg: Config, slots: tuple[int, ...], gen: int) -> dict[GroupId, set[SocketKey]]:
        """Return, for each of `cfg`'s port groups, its sockets that `slots` accept on."""
        wanted: dict[GroupId, set[SocketKey]] = {}
        kinds: dict[tuple[str, int, str], list[SocketKey]] = {}
        for key in self._socks:
            kinds.setdefault(_kind(key), []).append(key)
        for spec in cfg.listeners:
            if spec.mode == "worker-bind":
                continue
            host, port, mode, _ = key_for(spec, 0, gen)
            per_slot = spec.mode == "reuseport"
            ready = {self._pool.socket_of((host, port, mode, s if per_slot else 0)) for s in slots} - self._parked
            for key in kinds.get(_kind(key_for(spec, 0)), ()):
                keys = wanted.setdefault(self._group_of[key], set())
                if key in ready:
                    keys.add(key)
        return wanted

    def is_steered(self, cfg: Config) -> bool:
        """Return True if every socket group of `cfg`'s listeners is steered now."""
        gids = {self._group_of[k] for k in self._socks for spec in cfg.listeners
                if spec.mode != "worker-bind" and spec.path is None and _kind(k) == _kind(key_for(spec, 0))}
        return bool(gids) and all(self._groups[g].attached is not None for g in gids)

    def _steer_group(self, gid: GroupId, keys: frozenset[SocketKey]) -> str | None:
        group = self._groups[gid]
        where = f"{gid[1]}:{gid[2]}"
        if group.refused:
            return None
        if not group.known:
            return _once(group, f"{where}: the order of its sockets is not known (adopted from an "
                                f"older master, or a socket left while a worker held it): not steered")
        if not keys:
            return _once(group, f"{where}: no ready slot; new connections go where they went before")
        if keys == group.allowed and group.attached is not None and group.order == group.members:
            return None  # the usual pass: nothing changed, so nothing to build
        if (stranger := conflict.unverified(gid, len(group.members))) is not None:
            group.known = False  # a position the master did not give out: steering would guess
            self._load(group, None)
            return _once(group, f"{where}: {stranger}: not steered")
        group.allowed, group.note = keys, None
        note = self._load(group, group.want())
        group.order = list(group.members)
        return note

    def _load(self, group: steering.Group[SocketKey], prog: steering.Program | None) -> str | None:
        """Make `prog` the group's program (None: none); on refusal, unsteer the group."""
        if prog == group.attached:
            return None
        via = self._socks[group.members[0]]
        try:
            if prog is None:
                steering.detach(via)
            else:
                steering.attach(via, prog)
        except OSError as e:
            if prog is None:
                group.attached = None  # ENOENT: nothing was attached
                return None
            self.steer_refused += 1
            group.refused, group.allowed, group.attached = True, None, None
            try:
                steering.detach(via)
            except OSError:
                pass
            name = via.getsockname()
            why = (f"the kernel refused the steering program on {name[0]}:{name[1]} "
                   f"({e.strerror or e}): new connections go to every socket of the group")
            log.warning("%s", why)
            return why
        group.attached = prog
        return None


def _kind(key: SocketKey) -> tuple[str, int, str]:
    """Return host, port and mode of `key`, without a cookie listener's generation."""
    return (key[0], key[1], key[2].partition("@")[0])


def _once(group: steering.Group[SocketKey], note: str) -> str | None:
    """Return `note` unless it is what this group said last."""
    if group.note == note:
        return None
    group.note = note
    return note
