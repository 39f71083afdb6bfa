"""Fakes for unit-testing the state machines without processes, sockets or sleeps.

- `FakeClock`: a float that only moves when a test advances it.
- `FakeProcessAPI`: the `ProcessAPI` of upgraderd/process.py; records spawns and
  kills, hands out increasing pids, and returns scripted exits from `reap()`.
- `FakeNotify`: what the Master uses of `NotifyServer`; `receive()` returns
  scripted (pid, payload) pairs.
- `FakeLauncher`: the `Launcher` a `Generation` is given, for testing it alone.
- `FakeTemplates`: the `TemplateAPI` of system/templatectl.py; templates are fake
  processes, fork requests are recorded, and `room` models a control channel
  that fills: requests beyond it queue until the template `read()`s.
- `FakeWatcher`: the `WatcherAPI` of system/inotify.py; events are scripted with
  `event()`, fingerprints are the files' real bytes (the tests write real files).
- `fake_system()`: a `System` with fake processes and notify socket, and the
  real listeners, probes and kernel settings (the master unit tests bind real
  sockets on 127.0.0.1 and read the real net.ipv4.tcp_migrate_req).
"""

from __future__ import annotations

import hashlib
import signal as signal_mod
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Sequence

from upgraderd.errors import SpawnError
from upgraderd.core.generation import Generation
from upgraderd.config import schema
from upgraderd.core.handover import Handover
from upgraderd.core.seams import Exit, System
from upgraderd.system import posix, sockets
from upgraderd.system.probe import Prober, reserve_port
from upgraderd.system.process import user_env


def _sig(sig: int) -> int:
    """Return `sig` as a `signal.Signals` when it names one (readable assertion diffs)."""
    try:
        return signal_mod.Signals(sig)
    except ValueError:
        return sig


class FakeClock:
    """A monotonic clock that only moves by hand."""

    def __init__(self, start: float = 0.0) -> None:
        self.now = start

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> float:
        """Move forward by `seconds`; return the new time."""
        assert seconds >= 0, "a monotonic clock never goes back"
        self.now += seconds
        return self.now

    def set(self, when: float) -> float:
        """Move forward to `when`; return it."""
        assert when >= self.now, "a monotonic clock never goes back"
        self.now = when
        return self.now


@dataclass(frozen=True)
class Spawn:
    """One recorded `spawn` call."""

    pid: int
    argv: tuple[str, ...]
    env: dict[str, str]
    fds: tuple[int, ...]
    cwd: str | None

    @property
    def generation(self) -> int:
        return int(self.env["UPGRADERD_GENERATION"])

    @property
    def slot(self) -> int:
        return int(self.env["UPGRADERD_SLOT"])


@dataclass
class _SpawnFailure:
    generation: int | None
    slot: int | None
    message: str
    times: int


class FakeProcessAPI:
    """A `ProcessAPI` with no processes: spawns get pids 1000, 1001, ...; exits are scripted."""

    def __init__(self, first_pid: int = 1000) -> None:
        self.spawns: list[Spawn] = []
        self.kills: list[tuple[int, int]] = []
        self.spawn_errors: list[str] = []
        self._next_pid = first_pid
        self._pending: list[Exit] = []
        self._exited: set[int] = set()
        self._failures: list[_SpawnFailure] = []

    # -- ProcessAPI --

    def spawn(self, argv: Sequence[str], env: Mapping[str, str], fds: Sequence[int],
              cwd: str | None = None, user: str | None = None, group: str | None = None) -> int:
        for f in self._failures:
            if f.times > 0 and f.generation in (None, _int(env.get("UPGRADERD_GENERATION"))) \
                    and f.slot in (None, _int(env.get("UPGRADERD_SLOT"))):
                f.times -= 1
                self.spawn_errors.append(f.message)
                raise SpawnError(f.message)
        pid = self._next_pid
        self._next_pid += 1
        self.spawns.append(Spawn(pid, tuple(argv), dict(env), tuple(fds), cwd))
        return pid

    def kill(self, pid: int, sig: int) -> None:
        self.kills.append((pid, _sig(sig)))

    def reap(self) -> list[Exit]:
        out, self._pending = self._pending, []
        return out

    # -- scripting --

    def exit(self, pid: int, code: int | None = None, signal: int | None = None) -> Exit:
        """Make `pid` exit (code 0 by default); the next `reap()` returns it."""
        assert pid in self.pids(), f"pid {pid} was never spawned"
        assert pid not in self._exited, f"pid {pid} already exited"
        assert code is None or signal is None, "exit with a code or by a signal, not both"
        self._exited.add(pid)
        ex = Exit(pid, signal=signal) if signal is not None else Exit(pid, code=0 if code is None else code)
        self._pending.append(ex)
        return ex

    def fail_spawn(self, generation: int | None = None, slot: int | None = None,
                   message: str = "cannot start 'worker': No such file or directory",
                   times: int = 1) -> None:
        """Make the next `times` spawns matching generation/slot (None: any) raise SpawnError."""
        self._failures.append(_SpawnFailure(generation, slot, message, times))

    # -- queries --

    def pids(self, generation: int | None = None) -> list[int]:
        """Return the pids spawned (for `generation`, if given), in spawn order."""
        return [s.pid for s in self.spawns if generation is None or s.generation == generation]

    def live(self, generation: int | None = None) -> list[int]:
        """Return the spawned pids that have not exited."""
        return [p for p in self.pids(generation) if p not in self._exited]

    def spawn_of(self, pid: int) -> Spawn:
        return next(s for s in self.spawns if s.pid == pid)

    def kills_of(self, pids: Sequence[int]) -> list[tuple[int, int]]:
        """Return the recorded kills that target one of `pids`."""
        return [k for k in self.kills if k[0] in pids]


def _int(v: str | None) -> int | None:
    return None if v is None else int(v)


class FakeNotify:
    """What the Master uses of `NotifyServer`, with scripted datagrams."""

    address = "@upgraderd-fake-notify"

    def __init__(self) -> None:
        self._queue: list[tuple[int, bytes]] = []
        self.closed = False

    def send(self, pid: int, data: bytes = b"READY=1") -> None:
        """Queue a datagram from `pid`; the next `receive()` returns it."""
        self._queue.append((pid, data))

    def ready(self, *pids: int) -> None:
        """Queue READY=1 from every pid."""
        for pid in pids:
            self.send(pid, b"READY=1")

    def fileno(self) -> int:
        return -1

    def receive(self) -> list[tuple[int, bytes]]:
        out, self._queue = self._queue, []
        return out

    def close(self) -> None:
        self.closed = True


@dataclass
class FakeLauncher:
    """A `Launcher` for a lone `Generation`: records spawns and signals."""

    next_pid: int = 100
    fail_slots: set[int] = field(default_factory=set)
    spawned: list[tuple[int, int, int]] = field(default_factory=list)   # (generation, slot, pid)
    signals: list[tuple[int, int]] = field(default_factory=list)        # (pid, sig)
    failures: list[tuple[int, int]] = field(default_factory=list)       # (generation, slot)

    def spawn_worker(self, gen: Generation, slot: int) -> int:
        if slot in self.fail_slots:
            self.failures.append((gen.number, slot))
            raise SpawnError(f"cannot start 'worker': slot {slot} refused")
        pid = self.next_pid
        self.next_pid += 1
        self.spawned.append((gen.number, slot, pid))
        return pid

    def signal_worker(self, pid: int, sig: int) -> None:
        self.signals.append((pid, _sig(sig)))

    def pid_of(self, slot: int) -> int:
        """Return the pid most recently spawned into `slot`."""
        return [p for _, s, p in self.spawned if s == slot][-1]

    def pids(self) -> list[int]:
        return [p for _, _, p in self.spawned]


class FakeWatcher:
    """What the Master uses of `FileWatcher`: scripted events, fingerprints of the real files."""

    def __init__(self, inotify: bool = True) -> None:
        self.inotify = inotify
        self.pending = 0
        self.watched: list[str] = []
        self.closed = False

    def fileno(self) -> int | None:
        return -1 if self.inotify else None   # never selected: unit tests call step() themselves

    def watch(self, paths: Sequence[str]) -> list[str]:
        self.watched = list(paths)
        return []

    def event(self) -> None:
        """Script one inotify event in a watched directory."""
        self.pending += 1

    def changed(self) -> bool:
        had, self.pending = self.pending > 0, 0
        return had

    def fingerprint(self, path: str, content: bool) -> str:
        try:
            with open(path, "rb") as f:
                return hashlib.sha256(f.read()).hexdigest()
        except OSError:
            return ""

    def close(self) -> None:
        self.closed = True


Fork = tuple[int, int, dict[str, str], tuple[int, ...]]   # (template, slot, env, fds)


class FakeTemplates:
    """A `TemplateAPI` whose templates are fake processes; records the fork requests they took."""

    def __init__(self, procs: FakeProcessAPI, room: int | None = None) -> None:
        self.procs = procs
        self.forks: list[Fork] = []         # requests the channels took, in order
        self.queued: dict[int, list[Fork]] = {}   # template pid -> requests waiting for room
        self.room = room                    # requests the channels take before they are full (None: any)
        self.stopped: list[int] = []
        self.loads: list[tuple[int, str]] = []
        self.strangers: set[int] = {1, 4242}

    def start(self, argv: Sequence[str], env: Mapping[str, str], cwd: str | None = None,
              user: str | None = None, group: str | None = None) -> int:
        return self.procs.spawn(argv, env, (), cwd, user, group)

    def fork(self, pid: int, slot: int, env: Mapping[str, str], fds: Sequence[int]) -> None:
        if pid in self.stopped:
            raise SpawnError(f"template pid {pid} is gone")
        self.queued.setdefault(pid, []).append((pid, slot, dict(env), tuple(fds)))
        self._send(pid)

    def read(self, n: int) -> None:
        """Let the templates read `n` requests: that much room frees in the channels."""
        assert self.room is not None
        self.room += n

    def _send(self, pid: int) -> int:
        queue = self.queued[pid]
        taken = 0
        while queue and (self.room is None or self.room > 0):
            self.forks.append(queue.pop(0))
            taken += 1
            if self.room is not None:
                self.room -= 1
        if not queue:
            del self.queued[pid]
        return taken

    def flush(self) -> dict[int, int]:
        taken = {pid: self._send(pid) for pid in list(self.queued)}
        return {pid: n for pid, n in taken.items() if pid in self.queued}

    def writers(self) -> list[int]:
        return list(self.queued)

    def load(self, pid: int, app: str, env: Mapping[str, str]) -> None:
        self.loads.append((pid, app))

    def stop(self, pid: int) -> None:
        self.stopped.append(pid)
        self.queued.pop(pid, None)

    def is_child(self, pid: int) -> bool:
        return pid not in self.strangers


class FakeExec:
    """The `exec_master` seam: records each hand-over and fails, like an exec that returned."""

    def __init__(self) -> None:
        self.records: list[Handover] = []
        self.pending: list[list[int]] = []

    def __call__(self, record: Handover, pending: Sequence[int]) -> OSError:
        self.records.append(record)
        self.pending.append(list(pending))
        return OSError(2, "exec is not available in unit tests")


def fake_system(procs: FakeProcessAPI, notify: FakeNotify, watcher: FakeWatcher | None = None,
                execs: FakeExec | None = None, tell_systemd: Callable[[str], None] = lambda message: None) -> System:
    """Return a `System` of `procs` and `notify` plus the real sockets, probes and kernel;
    what the master tells systemd goes to `tell_systemd`."""
    no_exec = execs if execs is not None else FakeExec()
    return System(procs=procs, notify=notify, listeners=sockets.ListenerSet(), probes=Prober(),
                  kernel=posix.PosixKernel(), environ={"PATH": "/usr/bin:/bin"}, load_config=schema.load,
                  user_env=user_env, reserve_port=reserve_port, self_command=("/usr/bin/python3", "-m", "upgraderd"),
                  tell_systemd=tell_systemd, exec_master=no_exec, watcher=watcher,
                  check_probes=Prober(interval=0.05))
