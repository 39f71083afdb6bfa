"""Upgrade the master itself in place (SIGUSR2): exec the new upgraderd, same pid.

The old master writes its state (listener fds by key, the notify socket's fd,
every live worker with its generation and deadlines, counters) as JSON into a
memfd, makes those fds inheritable and execs `python -m upgraderd run ...`.
Because the pid does not change, the workers stay its children (waitpid still
works), systemd's MAINPID and the pidfile stay right, and the workers'
NOTIFY_SOCKET address stays valid. The new master adopts it all and then
rolls a new generation, exactly as on SIGHUP.

Hazards handled here:
- exec resets signal handlers to their defaults, and SIGHUP's or SIGTERM's
  default would kill the master in the window before the new one installs its
  handlers. So the handled signals are *blocked* across exec (the mask is
  inherited) and the new master unblocks them after installing its handlers:
  anything that arrived in between is delivered then, not lost.
- If exec fails (a broken interpreter path, say), the fds are made
  non-inheritable again, the mask restored, and the old master carries on.
- CLOCK_MONOTONIC is system-wide, so deadlines are carried as absolute values.
"""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import sys
from typing import Any

from upgraderd.config.schema import SECTIONS, Config, ListenerSpec
from upgraderd.system.signals import HANDLED

ENV = "UPGRADERD_REEXEC_FD"
VERSION = 1


def config_to_dict(cfg: Config) -> dict[str, Any]:
    """Return `cfg` as JSON-able plain data."""
    return json.loads(json.dumps(dataclasses.asdict(cfg)))  # type: ignore[no-any-return]


def config_from_dict(data: dict[str, Any]) -> Config:
    """Rebuild a Config from `config_to_dict` output, without re-validating it.

    An inherited generation's config was valid when it was loaded; its command
    may since have been deleted from disk, which must not stop the adoption.
    """
    kwargs: dict[str, Any] = {}
    for name, value in data.items():
        if name == "listeners":
            kwargs[name] = tuple(ListenerSpec(**item) for item in value)
        elif name in SECTIONS:
            section = dict(value)
            if section.get("command") is not None:
                section["command"] = tuple(section["command"])
            kwargs[name] = SECTIONS[name](**section)
        else:
            kwargs[name] = value
    return Config(**kwargs)


def exec_master(state: dict[str, Any], fds: list[int], argv: list[str],
                executable: str = sys.executable) -> OSError:
    """Exec the new master with `state`; return the error if exec failed (else never returns)."""
    payload = json.dumps({"version": VERSION, **state}).encode()
    memfd = os.memfd_create("upgraderd-state", 0)
    os.write(memfd, payload)
    os.lseek(memfd, 0, os.SEEK_SET)
    inheritable = [*fds, memfd]
    old_mask = signal.pthread_sigmask(signal.SIG_BLOCK, HANDLED)
    try:
        for fd in inheritable:
            os.set_inheritable(fd, True)
        env = {**os.environ, ENV: str(memfd)}
        os.execve(executable, [executable, "-m", "upgraderd", *argv], env)
    except OSError as e:
        for fd in fds:
            os.set_inheritable(fd, False)
        os.close(memfd)
        signal.pthread_sigmask(signal.SIG_SETMASK, old_mask)
        return e
    raise AssertionError("unreachable: execve returned without an error")


def inherited() -> dict[str, Any] | None:
    """Return the state an old master passed us, or None on a normal start."""
    raw = os.environ.pop(ENV, None)
    if raw is None:
        return None
    fd = int(raw)
    with os.fdopen(fd, "rb") as f:
        state: dict[str, Any] = json.loads(f.read())
    if state.get("version") != VERSION:
        raise ValueError(f"state version {state.get('version')} from the old master is not {VERSION}")
    return state


def unblock_signals() -> None:
    """Unblock the signals an exec'ing master blocked (a no-op on a normal start)."""
    signal.pthread_sigmask(signal.SIG_UNBLOCK, HANDLED)
