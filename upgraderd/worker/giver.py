"""The giving end of hand-offs: find the takers, offer them connections, say when a give is over.

A draining worker gives to the oldest generation newer than its own that
still has its channels open: the ACTIVE one. When there is none, to the
newest older one that has (a rolled-back canary gives back to the generation
it served beside). When there is neither (its slot was retired by TTOU, or
the master is stopping) it gives to its siblings of the same generation; siblings that are draining
themselves have closed their channel or refuse. A taker that fails once (it
refused, fell silent past `timeout`, vanished, or is not who its name says)
is dropped for the rest of this drain, and the connection is offered to the
next one; when none is left, `give()` returns False and the caller serves the
connection on. A connection is never lost here: its fd stays open in this
process until the taker has answered ACK and our COMMIT went out.

A giver connects to at most TAKERS takers, starting at its own slot's place
in the list: with N workers per generation, connecting (and checking the
credentials of) every taker cost N connects per giver, N * N per reload,
seconds of CPU at 128 workers; the givers of a generation still spread their
connections over all the takers, each starting at a different one.

Once a taker's ACK says it takes batches (contract/wire.py), the offers of
a round to it go as BATCH messages of up to MAX_BATCH connections, each
answered and committed as one; the first round to a taker, and a connection
too large for one message, go as single OFFERs.

Each `give_many` ends with an END to every taker it offered to that is still
in play (contract/wire.py): the taker then knows this give is complete.
"""

from __future__ import annotations

import array
import os
import socket
import time
from collections import Counter
from typing import Callable, NamedTuple

from upgraderd.contract import wire
from upgraderd.worker import peers
from upgraderd.worker.moved import Handed, identity
from upgraderd.contract.wire import Channel
from upgraderd.worker.peers import Peer

BATCH = 64  # offers in flight to one taker (it holds at most MAX_PENDING = 128)
BATCH_BYTES = wire.MAX_PENDING_BYTES  # payload in flight to one taker (it drops a giver that sends more)
TAKERS = 8  # takers one giver connects to, at most (more only replace those that fail)


class _Target:
    """One taker's channel and, once connected and checked, our socket to it."""

    def __init__(self, channel: Channel) -> None:
        self.channel = channel
        self.sock: socket.socket | None = None
        self.batches = False  # it said it takes BATCH messages

    def close(self) -> None:
        if self.sock is not None:
            self.sock.close()
            self.sock = None


class Giver:
    """Offers this worker's connections to other workers of the same master (blocking)."""

    def __init__(self, *, master: int | None = None, timeout: float = 2.0,
                 trust: Callable[[Peer, Channel], bool] | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.generation, self.slot = identity()
        self.master = os.getppid() if master is None else master
        self.timeout, self.clock = timeout, clock
        self.trust = trust or (lambda p, c: peers.trusted(p, self.master, c.generation, c.generation))
        self.failures: Counter[str] = Counter()
        self.given = 0
        self._targets: list[_Target] = []
        self._next = 0

    def find(self) -> int:
        """Connect to the takers to give to now, checking each; return how many there are.

        The oldest newer generation with a trusted taker wins: a generation
        closes its channels when it drains, and ours drains only once its
        successor is ACTIVE, so that is the ACTIVE one, not a STARTING one that
        may yet fail. With no newer one, the newest older one: a canary rolled
        back (core/rollout.py) gives back to the generation it served beside,
        which is ACTIVE; older ones that drain have closed their channels. Names bound by a stranger (abstract names are free for
        all) fail the check and are skipped, so they cannot hide the real takers.
        """
        self.close()
        channels = peers.listening_channels(self.master)
        self._targets = []
        newer = sorted({c.generation for c in channels if c.generation > self.generation})
        older = sorted({c.generation for c in channels if c.generation < self.generation}, reverse=True)
        for gen in [*newer, *older]:
            self._targets = self._trusted(self._from_own_slot([c for c in channels if c.generation == gen]),
                                          TAKERS)
            if self._targets:
                break
        else:
            self._targets = self._trusted(self._from_own_slot(
                [c for c in channels if c.generation == self.generation and c.slot != self.slot]), TAKERS)
        self._next = 0
        return len(self._targets)

    def _from_own_slot(self, channels: list[Channel]) -> list[Channel]:
        """Return `channels` by slot, rotated to start at our slot: the givers of one
        generation then start at different takers and spread evenly."""
        ordered = sorted(channels, key=lambda c: c.slot)
        start = self.slot % len(ordered) if ordered else 0
        return ordered[start:] + ordered[:start]

    def aim(self, channels: list[Channel]) -> int:
        """Connect to exactly `channels`, checking each; return how many takers passed."""
        self.close()
        self._targets = self._trusted(channels)
        self._next = 0
        return len(self._targets)

    def _trusted(self, channels: list[Channel], limit: int | None = None) -> list[_Target]:
        """Return the channels we could connect to and whose owner passed the check (the first `limit`)."""
        out: list[_Target] = []
        for channel in channels:
            if limit is not None and len(out) >= limit:
                break
            target = _Target(channel)
            try:
                ok = self._connect(target, self.clock() + self.timeout)
            except OSError:
                ok = False  # it closed its channel since we listed it (it drains): not a failure
            else:
                if not ok:
                    self.failures["untrusted_taker"] += 1
            if ok:
                out.append(target)
            else:
                target.close()
        return out

    def take_sockets(self) -> list[socket.socket]:
        """Hand over the sockets of the takers found and checked (worker/outbox.py); keep none."""
        socks = [t.sock for t in self._targets if t.sock is not None]
        for t in self._targets:
            t.sock = None
        self._targets = []
        return socks

    @property
    def targets(self) -> int:
        """Return how many takers are still in play."""
        return len(self._targets)

    def give(self, moving: Handed) -> bool:
        """Offer one connection; see `give_many`."""
        return self.give_many([moving])[0]

    def give_many(self, moving: list[Handed]) -> list[bool]:
        """Offer connections until a taker commits to each; return, per connection, if it is theirs now.

        Stop reading the connections before calling this. Where True, close your
        copy and never touch the connection again; where False, serve it on.
        The offers to one taker are pipelined: all OFFERs, then all answers,
        then the COMMITs, so a batch costs one round trip per taker.
        """
        given = [False] * len(moving)
        msgs: dict[int, list[bytes]] = {}
        for i, m in enumerate(moving):
            try:
                msgs[i] = wire.encode_offer(m.listener, m.state, m.unhandled, m.unsent)
            except ValueError:
                self.failures["too_large"] += 1
        pending = list(msgs)
        sizes = [m.size for m in moving]
        offered: list[_Target] = []
        while pending and self._targets:
            plan = self._plan(pending, sizes)
            offered += [t for t in plan if t not in offered]
            failed = self._round(plan, moving, msgs, given)
            for target, reason in failed.items():
                self.failures[reason] += 1
                target.close()
                self._targets.remove(target)
            pending = [i for i in pending if not given[i]]
        self._end([t for t in offered if t in self._targets])
        self.given += sum(given)
        return given

    def _end(self, targets: list[_Target]) -> None:
        """Tell each taker we offered to that this give is over (END), so it stops holding.

        A taker that cannot take END now is left alone: it stops holding when
        it sees the channel close or times us out, and nothing of ours is at stake.
        """
        for target in targets:
            try:
                if target.sock is not None:
                    target.sock.send(wire.encode(wire.END), socket.MSG_DONTWAIT)
            except OSError:
                pass

    def close(self) -> None:
        """Close every channel socket (a taker that had not seen COMMIT drops its copy)."""
        for t in self._targets:
            t.close()

    def _plan(self, pending: list[int], sizes: list[int]) -> dict[_Target, list[int]]:
        """Spread `pending` round-robin over the takers, at most BATCH offers and BATCH_BYTES
        of payload each this round (every offer fits alone: wire.MAX_PAYLOAD < BATCH_BYTES)."""
        plan: dict[_Target, list[int]] = {}
        held: dict[_Target, int] = {}
        for i in pending:
            target = self._targets[self._next % len(self._targets)]
            if len(plan.get(target, ())) >= BATCH or held.get(target, 0) + sizes[i] > BATCH_BYTES:
                break
            plan.setdefault(target, []).append(i)
            held[target] = held.get(target, 0) + sizes[i]
            self._next += 1
        return plan

    def _round(self, plan: dict[_Target, list[int]], moving: list[Handed], msgs: dict[int, list[bytes]],
               given: list[bool]) -> dict[_Target, str]:
        """Offer, collect the answers, commit; mark `given`; return the takers that failed, with why."""
        deadline = self.clock() + self.timeout
        failed: dict[_Target, str] = {}
        units = {target: _units(target, idxs, moving) for target, idxs in plan.items()}
        for target, offers in units.items():
            reason = self._send_offers(target, offers, moving, msgs, deadline)
            if reason:
                failed[target] = reason
        for target, offers in units.items():
            if target in failed:
                continue
            acks, reason = self._answers(target, len(offers), deadline)
            if reason and reason != "refused":
                failed[target] = reason  # nothing committed: the taker drops its copies
                continue
            acked = [offer for offer, ok in zip(offers, acks) if ok]
            committed = self._commit(target, len(acked))
            for offer in acked[:committed]:
                for i in offer.idxs:
                    given[i] = True
            if reason or committed < len(acked):
                failed[target] = reason or "taker_gone"
        return failed

    def _send_offers(self, target: _Target, offers: list[_Unit], moving: list[Handed], msgs: dict[int, list[bytes]],
                     deadline: float) -> str:
        """Send OFFER (and DATA) or BATCH messages; return "" or the failure reason."""
        try:
            sock = target.sock
            if sock is None:
                return "taker_gone"
            for offer in offers:
                fds = array.array("i", [moving[i].sock.fileno() for i in offer.idxs])
                parts = [offer.batch] if offer.batch else msgs[offer.idxs[0]]
                _timeout(sock, deadline, self.clock)
                sock.sendmsg([parts[0]], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, fds)])
                for msg in parts[1:]:
                    _timeout(sock, deadline, self.clock)
                    sock.send(msg)
        except (socket.timeout, TimeoutError):
            return "timeout"
        except OSError:
            return "taker_gone"
        return ""

    def _answers(self, target: _Target, n: int, deadline: float) -> tuple[list[bool], str]:
        """Read `n` answers (True for ACK); return them and "", "refused" or the failure reason."""
        assert target.sock is not None
        acks: list[bool] = []
        try:
            while len(acks) < n:
                _timeout(target.sock, deadline, self.clock)
                reply = target.sock.recv(wire.RECV_SIZE)
                if not reply:
                    return acks, "taker_gone"
                kind = wire.kind_of(reply)
                if kind not in (wire.ACK, wire.REFUSE):
                    return acks, "malformed_reply"
                acks.append(kind == wire.ACK)
                target.batches = target.batches or wire.takes_batches(reply)
        except (socket.timeout, TimeoutError):
            return acks, "timeout"
        except wire.Malformed:
            return acks, "malformed_reply"
        except OSError:
            return acks, "taker_gone"
        return acks, "" if all(acks) else "refused"

    def _commit(self, target: _Target, n: int) -> int:
        """Send `n` COMMITs; return how many the kernel took (a taker that stopped refuses them)."""
        assert target.sock is not None
        sent = 0
        try:
            for _ in range(n):
                target.sock.send(wire.encode(wire.COMMIT))
                sent += 1
        except OSError:
            pass
        return sent

    def _connect(self, target: _Target, deadline: float) -> bool:
        """Connect to `target`; return True if its owner is who its name says."""
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)
        target.sock = sock
        _timeout(sock, deadline, self.clock)
        sock.connect(wire.address(target.channel.name))
        return self.trust(peers.peer_of(sock), target.channel)


class _Unit(NamedTuple):
    """One message's worth of offers: a single OFFER (`batch` empty) or a BATCH of `idxs`."""

    idxs: list[int]
    batch: bytes


def _units(target: _Target, idxs: list[int], moving: list[Handed]) -> list[_Unit]:
    """Group one round's offers to `target` into messages: BATCHes if it takes them, else single OFFERs."""
    if not target.batches:
        return [_Unit([i], b"") for i in idxs]
    out: list[_Unit] = []
    entries: list[bytes] = []
    group: list[int] = []
    size = 0
    for i in idxs:
        m = moving[i]
        entry = wire.batch_entry(m.listener, m.state, m.unhandled, m.unsent)
        if entry is None:
            out.append(_Unit([i], b""))
            continue
        if not wire.batch_fits(size, len(entries), entry):
            out.append(_Unit(group, wire.encode_batch(entries)))
            entries, group, size = [], [], 0
        entries.append(entry)
        group.append(i)
        size += len(entry)
    if entries:
        out.append(_Unit(group, wire.encode_batch(entries)))
    return out


def _timeout(sock: socket.socket, deadline: float, clock: Callable[[], float]) -> None:
    """Give the next blocking call on `sock` what is left until `deadline`."""
    left = deadline - clock()
    if left <= 0:
        raise TimeoutError("hand-off deadline passed")
    sock.settimeout(left)
