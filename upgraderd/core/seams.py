"""The seams between the core and the OS: what the master needs, as Protocols.

The core decides; `upgraderd.system` acts. Every syscall the master's
decisions lead to goes through one of these interfaces, so unit tests drive
the master with fakes (tests/support/fakes.py) and the real implementations
are assembled in one place, `system.posix.posix_system()`.

Invariant: nothing in this module, or in any core module, opens a file,
a socket or a process itself. Every method a caller outside the core uses
is on its Protocol here too (system/posix.py checks no concrete type).
"""

from __future__ import annotations

import signal as signal_mod
from dataclasses import dataclass
from typing import Callable, Iterable, Mapping, Protocol, Sequence

from upgraderd.config.schema import Config, ListenerSpec
from upgraderd.core.handover import Handover
from upgraderd.core.requestcounts import RequestCounts

# (host, port, mode, slot): a socket's identity, whatever listener name it has.
# A Unix socket's is (path, 0, "shared", 0): a host never starts with "/".
# A UDP listener's mode is prefixed, "udp/reuseport": UDP and TCP can share a port; a
# `flows: cookie` listener's key belongs to one generation: "udp/cookie@GEN" (the system
# layer lends it a socket of the listener's pool, keyed (host, port, "udp/cookie", index)).
SocketKey = tuple[str, int, str, int]


def key_for(spec: ListenerSpec, slot: int, gen: int = 0) -> SocketKey:
    """Return the socket key that worker slot `slot` (of generation `gen`) uses for `spec`."""
    host, port, mode = spec.socket_id
    if spec.protocol != "tcp":
        mode = f"udp/cookie@{gen}" if spec.flows == "cookie" else f"{spec.protocol}/{mode}"
    return (host, port, mode, slot if spec.mode == "reuseport" else 0)


def key_address(key: SocketKey) -> str:
    """Return the address part of `key` as a log line shows it: host:port, or a Unix socket's path."""
    return key[0] if key[0].startswith("/") else f"{key[0]}:{key[1]}"


def is_udp(key: SocketKey) -> bool:
    """Return True if `key` names a UDP socket."""
    return key[2].startswith("udp/")


def keys_for(cfg: Config, slots: Iterable[int], gen: int = 0) -> set[SocketKey]:
    """Return every socket key that worker slots `slots` of a `cfg` generation (number `gen`) use."""
    slots = list(slots)
    keys: set[SocketKey] = set()
    for spec in cfg.listeners:   # one key_for per listener, not per slot: this runs every loop pass
        if spec.mode == "worker-bind" or not slots:
            continue
        host, port, mode, _ = key_for(spec, 0, gen)
        if spec.mode == "reuseport":
            keys.update((host, port, mode, slot) for slot in slots)
        else:
            keys.add((host, port, mode, 0))
    return keys


@dataclass(frozen=True)
class Exit:
    """How a reaped process ended."""

    pid: int
    code: int | None = None
    signal: int | None = None

    @property
    def reason(self) -> str:
        """Return 'clean', 'error' or 'signal' (the metric label)."""
        if self.signal is not None:
            return "signal"
        return "clean" if self.code == 0 else "error"

    def describe(self) -> str:
        """Return a human-readable account, e.g. 'exit code 3' or 'killed by SIGKILL'."""
        if self.signal is not None:
            try:
                name = signal_mod.Signals(self.signal).name
            except ValueError:
                name = str(self.signal)
            return f"killed by {name}"
        # The exec shim is /bin/sh, which exits 127/126 when it cannot exec the program.
        hint = {127: " (command or its interpreter not found?)", 126: " (not executable?)"}
        return f"exit code {self.code}{hint.get(self.code or 0, '')}"


class ProcessAPI(Protocol):
    """Start, signal and reap worker processes."""

    def spawn(self, argv: Sequence[str], env: Mapping[str, str], fds: Sequence[int],
              cwd: str | None = None, user: str | None = None, group: str | None = None) -> int:
        """Start argv with `fds` at 3, 4, ... as `user`/`group`; return the pid or raise SpawnError."""

    def kill(self, pid: int, sig: int) -> None:
        """Send `sig` to `pid`; a process that is already gone is not an error."""

    def reap(self) -> list[Exit]:
        """Collect every child that has exited, without blocking."""


class TemplateAPI(Protocol):
    """Template processes that fork a generation's workers (see system/templatectl.py)."""

    def start(self, argv: Sequence[str], env: Mapping[str, str], cwd: str | None = None,
              user: str | None = None, group: str | None = None) -> int:
        """Exec a template with its control channel; return its pid or raise SpawnError."""

    def fork(self, pid: int, slot: int, env: Mapping[str, str], fds: Sequence[int]) -> None:
        """Ask template `pid` for a worker in `slot` with `env` and `fds` at 3, 4, ...; queue the
        request if its channel is full; raise SpawnError if the template is gone."""

    def flush(self) -> dict[int, int]:
        """Send queued requests; return {template pid: requests it took now} for each that still has a queue."""

    def writers(self) -> list[int]:
        """Return the fds of the channels with a queue, for the loop to select for writability."""

    def load(self, pid: int, app: str, env: Mapping[str, str]) -> None:
        """Make standby `pid` import `app` with `env` and become a template; raise SpawnError."""

    def stop(self, pid: int) -> None:
        """Close template `pid`'s channel and kill it; its workers live on."""

    def is_child(self, pid: int) -> bool:
        """Return True if `pid` is a live (or unreaped) child of the master."""


@dataclass(frozen=True)
class Retired:
    """What `retire()` did: sockets closed, parked (held by a live worker), closed unsteered."""

    closed: list[SocketKey]
    parked: list[SocketKey]
    # Closed while new connections could still reach them (no steering, or
    # steered away only now): what was queued there may be reset.
    unsafe: list[SocketKey]


@dataclass(frozen=True)
class Rescue:
    """Sockets of slots without a worker, whose queues the READY `takers` of `generation` should get."""

    generation: int
    sockets: tuple[tuple[SocketKey, str], ...]   # (key, listener name)
    takers: tuple[int, ...]                      # READY slots of `generation`


class RescueAPI(Protocol):
    """Connections queued on a slot socket nobody accepts on, handed to READY workers (system/rescuer.py)."""

    def rescue(self, plan: Rescue) -> list[int]:
        """Accept what is queued on `plan.sockets` if a taker listens; return the count per socket.

        Never blocks: the accepted connections are handed over in the background.
        """

    def close(self) -> None:
        """Stop handing over (at master exit)."""


class NotifyAPI(Protocol):
    """The master's NOTIFY_SOCKET: datagrams from workers, with the sender's pid."""

    @property
    def address(self) -> str:
        """Return the NOTIFY_SOCKET value workers use."""

    def fileno(self) -> int:
        """Return the fd to select on."""

    def receive(self) -> list[tuple[int, bytes]]:
        """Read every pending datagram; return (sender pid, payload) pairs."""

    def close(self) -> None:
        """Close the socket."""


class ListenerAPI(Protocol):
    """The master's listening sockets, by key (see system/sockets.py)."""

    def ensure(self, cfg: Config, count: int | None = None,
               slots: Iterable[int] | None = None) -> list[SocketKey]:
        """Bind what `cfg` needs for `slots` and is not bound yet; raise OSError naming the address."""

    def child_fds(self, cfg: Config, slot: int, gen: int = 0) -> tuple[int, ...]:
        """Return the fds worker `slot` of generation `gen` (of `cfg`) inherits, in LISTEN_FDS order."""

    # Steering programs the kernel refused, since this set was created.
    steer_refused: int

    def retire(self, wanted: set[SocketKey], held: set[SocketKey]) -> Retired:
        """Close every socket not in `wanted`; park steered ones a live worker still holds."""

    def steer(self, cfg: Config, ready_slots: Iterable[int], gen: int = 0) -> str | None:
        """Send new connections of `cfg`'s port groups only to `ready_slots`; return a warning or None."""

    def is_steered(self, cfg: Config) -> bool:
        """Return True if every socket group of `cfg` is steered now."""

    def export(self) -> list[dict[str, object]]:
        """Return every socket as plain data, for a master re-exec."""

    def adopt(self, entries: list[dict[str, object]]) -> None:
        """Take over the sockets an old master exported."""

    def filenos(self) -> list[int]:
        """Return the fd of every open socket."""

    def keys(self) -> set[SocketKey]:
        """Return the key of every open socket (for the service manager's fd store)."""

    def fileno_of(self, key: SocketKey) -> int | None:
        """Return the fd of the socket `key`, or None if it is not open."""

    def close_all(self) -> None:
        """Close every socket."""


class ProbeAPI(Protocol):
    """HTTP readiness probes driven without blocking (see system/probe.py)."""

    def fileno(self) -> int:
        """Return the fd to select on."""

    def add(self, pid: int, url: str, now: float) -> None:
        """Start probing worker `pid` at `url`."""

    def pids(self) -> set[int]:
        """Return the pids being probed."""

    def remove(self, pid: int) -> tuple[str, str] | None:
        """Stop probing `pid`; return its (url, last error)."""

    def next_deadline(self) -> float | None:
        """Return when `poll` next has work without an fd event."""

    def poll(self, now: float) -> list[int]:
        """Advance every probe; return the pids that just answered 2xx."""

    def close(self) -> None:
        """Stop every probe."""


@dataclass(frozen=True)
class KernelState:
    """net.ipv4.tcp_migrate_req as read (None: unavailable) and what to log about it."""

    value: int | None
    info: tuple[str, ...] = ()
    warnings: tuple[str, ...] = ()


class KernelAPI(Protocol):
    """The kernel settings the master depends on."""

    def ensure_migrate_req(self, policy: str, worker_bind: list[str]) -> KernelState:
        """Apply `policy` (check, set, ignore) to net.ipv4.tcp_migrate_req."""

    def retire_risk(self) -> str | None:
        """Return a warning if closing a reuseport slot socket now can reset queued connections."""


class MetricsAPI(Protocol):
    """What the master asks of its metrics (metrics/telemetry.py implements it)."""

    def worker_env(self, cfg: Config) -> dict[str, str]:
        """Return the environment a worker of `cfg` needs to report its metrics."""

    def read_requests(self, pids: Sequence[int]) -> Mapping[int, RequestCounts]:
        """Return the request counts of worker `pids` from their metric files (those readable)."""

    def on_reaped(self, pid: int) -> None:
        """Fold the files of a reaped worker."""

    def check_reload(self, cfg: Config) -> None:
        """Warn about metrics settings only a restart applies."""

    def export(self) -> dict[str, object]:
        """Return what a re-exec'd master needs to carry the metrics on."""

    def close(self) -> None:
        """Stop the endpoint and release the worker files."""


class OrphanAPI(Protocol):
    """Orphaned workers of a dead master that this master took over (system/orphanfds.py)."""

    def live(self) -> int:
        """Return how many of them have not exited yet."""

    def pids(self) -> list[int]:
        """Return the pids of the live ones."""

    def drain(self) -> None:
        """Send each live one the drain signal it was started with."""

    def kill(self) -> None:
        """SIGKILL each live one."""

    def pidfds(self) -> list[int]:
        """Return the pidfds that track them (kept open across daemonizing)."""

    def close(self) -> None:
        """Stop tracking them."""


class WatcherAPI(Protocol):
    """inotify on the directories holding the watched paths (see system/inotify.py)."""

    def fileno(self) -> int | None:
        """Return the fd to select on; None when inotify is unavailable (the core then polls)."""

    def watch(self, paths: Sequence[str]) -> list[str]:
        """Watch the directories that hold `paths` and their targets; return new warnings."""

    def changed(self) -> bool:
        """Read every pending event without blocking; return True if there was any."""

    def fingerprint(self, path: str, content: bool) -> str:
        """Return a cheap identity of `path` ('' if missing): a content hash, or target, mtime and size."""

    def close(self) -> None:
        """Stop watching."""


@dataclass
class System:
    """Every OS service the master uses, passed in whole."""

    procs: ProcessAPI
    notify: NotifyAPI
    listeners: ListenerAPI
    probes: ProbeAPI
    kernel: KernelAPI
    environ: Mapping[str, str]
    # Load and validate a config file; raise ConfigError with every problem located.
    load_config: Callable[[str], Config]
    # HOME, USER and LOGNAME for a worker run as this user ({} for the master's own).
    user_env: Callable[[str | None], dict[str, str]]
    reserve_port: Callable[[], int]
    # The command that runs this upgraderd (what a USR2 exec runs): [python, -m, upgraderd].
    self_command: Sequence[str]
    # Send a message to the service manager ($NOTIFY_SOCKET of the master itself).
    tell_systemd: Callable[[str], None]
    # Exec the master again with the hand-over; returns only if the exec failed.
    exec_master: Callable[[Handover, Sequence[int]], OSError]
    # Reload on file change (config `reload.watch`); None: not available.
    watcher: WatcherAPI | None = None
    # Templates for prefork generations (None: not available, such configs fail to start).
    templates: TemplateAPI | None = None
    # Save what queued on the socket of a slot that lost its worker (None: leave it queued).
    rescue: RescueAPI | None = None
    # HTTP probes of rollout checks (core/rolloutchecks.py `Http`), apart from readiness's (None: none).
    check_probes: ProbeAPI | None = None
    # Read and remove the operator's rollout request, "promote N" or "rollback N" ("" if none).
    rollout_requests: Callable[[], str] = lambda: ""
    # One line per process not this master's that listens on a TCP address of the config, naming its
    # pid (system/strangers.py: one sock_diag dump, /proc only when there is one); [] if not checked.
    strangers: Callable[[Config], list[str]] = lambda cfg: []

    def watched_fds(self) -> list[int]:
        """Return the fds the loop selects on besides the signal inbox."""
        inotify = self.watcher.fileno() if self.watcher is not None else None
        checks = self.check_probes.fileno() if self.check_probes is not None else None
        return [self.notify.fileno(), self.probes.fileno(),
                *(fd for fd in (inotify, checks) if fd is not None)]

    def close(self) -> None:
        """Close every socket the master holds (only at exit)."""
        self.listeners.close_all()
        self.notify.close()
        self.probes.close()
        if self.check_probes is not None:
            self.check_probes.close()
        if self.rescue is not None:
            self.rescue.close()
        if self.watcher is not None:
            self.watcher.close()

