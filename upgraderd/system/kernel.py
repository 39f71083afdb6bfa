"""Check, and where asked set, the kernel settings upgraderd relies on.

net.ipv4.tcp_migrate_req (Linux 5.14+): when a SO_REUSEPORT listener
closes, the kernel resets the connections still queued on it, unless this
is 1, in which case it moves them to another listener of the same group.
A `worker-bind` listener is closed by each old worker as it drains, so
without the setting a reload can reset a few queued connections. (The
master-bound modes never close a socket during a reload.)

The setting is per network namespace and only root (CAP_NET_ADMIN in the
namespace's user namespace) may write it. `kernel.tcp_migrate_req` in the
config chooses: `set` writes 1, `check` only reads and warns, `ignore`
reads (for the metric) and says nothing.

The path is a parameter, so unit tests use a plain file.
"""

from __future__ import annotations

from dataclasses import dataclass, field

MIGRATE_REQ = "/proc/sys/net/ipv4/tcp_migrate_req"
FIX = ("set `kernel.tcp_migrate_req: set` in the config (the master must run as root; the "
       "setting is per network namespace), or run `sysctl -w net.ipv4.tcp_migrate_req=1`")


@dataclass(frozen=True)
class MigrateReq:
    """The outcome of a check: the value now in force and what to log."""

    value: int | None
    info: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)


def read_int(path: str) -> int | None:
    """Return the integer in `path`, or None if it is missing or unreadable."""
    try:
        with open(path) as f:
            return int(f.read().strip())
    except (OSError, ValueError):
        return None


def ensure_migrate_req(policy: str, worker_bind: list[str], path: str = MIGRATE_REQ) -> MigrateReq:
    """Apply `policy` (check, set, ignore); `worker_bind` names the listeners at risk."""
    value = read_int(path)
    info: list[str] = []
    warnings: list[str] = []
    if policy == "ignore":
        return MigrateReq(value)
    if policy == "set" and value is not None and value != 1:
        try:
            with open(path, "w") as f:
                f.write("1\n")
        except OSError as e:
            warnings.append(f"cannot set net.ipv4.tcp_migrate_req=1: {e.strerror or e} "
                            f"(it needs root in this network namespace)")
        else:
            info.append(f"set net.ipv4.tcp_migrate_req=1 (was {value}) in this network namespace")
        value = read_int(path)
    if not worker_bind:
        return MigrateReq(value, info, warnings)
    names = ", ".join(worker_bind)
    if value is None:
        warnings.append(f"net.ipv4.tcp_migrate_req is not available (Linux before 5.14?): draining "
                        f"the worker-bind listener(s) {names} can reset connections still queued on them")
    elif value != 1:
        warnings.append(f"net.ipv4.tcp_migrate_req={value}: draining the worker-bind listener(s) "
                        f"{names} can reset connections still queued on them. Fix: {FIX}")
    return MigrateReq(value, info, warnings)


def retire_risk() -> str | None:
    """Return a warning if closing a reuseport slot socket now can reset queued connections."""
    if read_int(MIGRATE_REQ) == 1:
        return None
    return ("net.ipv4.tcp_migrate_req is not 1, so connections still queued on a closing "
            "SO_REUSEPORT slot socket are reset; " + FIX)
