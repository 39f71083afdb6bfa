"""Talk to a running master from another process: reload, upgrade, scale, reopen, stop, status,
promote and rollback (a canary under way).

The master is found through its pidfile (pidfile.find_master checks that the
pid holds the pidfile's lock, and pidfile.send_signal checks it again through
a pidfd, so nothing is ever sent to a process that is not that master) and observed through
its status file (status.py). These are short-lived client commands, so they
may wait: they watch the master's pid with a pidfd, which becomes readable
the moment the master exits, and re-read the status file between waits.
"""

from __future__ import annotations

import json
import os
import select
import signal
import sys
import time
from typing import Any

from upgraderd.config import schema as configmod
from upgraderd.errors import ConfigError, ExitCode
from upgraderd.service import status
from upgraderd.service.pidfile import NotRunning, alive, find_master, read_regular, send_signal, write_atomic

POLL = 0.05


def _observe(pidfile: str) -> tuple[int, str, dict[str, Any]]:
    """Return the master's pid, its status file and the document in it."""
    pid = find_master(pidfile)
    path = status.path_for(pidfile)
    doc = status.read(path)
    if doc is None or doc.get("pid") != pid:
        raise NotRunning(f"master pid {pid} has not written its status file {path} yet")
    return pid, path, doc


def foreign_config(doc: dict[str, Any], config: str | None) -> str | None:
    """Return why `config` is not the file the master reads, or None if it is (or is None)."""
    theirs = doc.get("config")
    if config is None or not isinstance(theirs, str):
        return None
    try:
        if os.path.samefile(config, theirs):
            return None
    except OSError:
        if os.path.abspath(config) == theirs:
            return None
    return (f"the master reads {theirs}, not {config}; nothing was sent. Edit {theirs} "
            f"(or point it at the new file) and reload, or restart the master with -c {config}")


def _master_reading(pidfile: str, config: str | None) -> tuple[int, str, dict[str, Any]] | ExitCode:
    """Return the master's pid, status file and document, or FAILED if it reads another config."""
    pid, path, doc = _observe(pidfile)
    foreign = foreign_config(doc, config)
    if foreign:
        print(f"upgraderd: {foreign}", file=sys.stderr)
        return ExitCode.FAILED
    return pid, path, doc


def reload(pidfile: str, timeout: float, config: str | None = None) -> int:
    """Send SIGHUP and wait for the outcome: 0 if the new generation is ACTIVE, 1 if not."""
    found = _master_reading(pidfile, config)
    if isinstance(found, ExitCode):
        return found
    pid, path, before = found
    _warn_no_effect(before.get("config"))
    send_signal(pidfile, pid, signal.SIGHUP)
    doc = _wait(pid, timeout, lambda d: d["last_reload"]["covers"] > before["hups"], path)
    if doc is None:
        return _no_outcome(pid, timeout, "reload")
    if doc["last_reload"]["result"] == "success":
        print(f"reload done: generation {doc['last_reload']['generation']} ACTIVE")
        return ExitCode.OK
    print(f"upgraderd: reload {status.describe_reload(doc)}", file=sys.stderr)
    return ExitCode.FAILED


def _warn_no_effect(config: object) -> None:
    """Print the keys of the master's config file that change nothing (the master logs them too)."""
    if not isinstance(config, str):
        return
    try:
        cfg = configmod.load(config)
    except (ConfigError, OSError):
        return   # the master rejects it and the outcome says why
    for warning in cfg.warnings:
        print(f"warning: {warning}", file=sys.stderr)


def upgrade(pidfile: str, timeout: float, config: str | None = None) -> int:
    """Send SIGUSR2 and wait until the re-exec'd master's reload settles: 0 if it succeeded."""
    found = _master_reading(pidfile, config)
    if isinstance(found, ExitCode):
        return found
    pid, path, before = found
    # USR2 does not count as a HUP, so the outcome is the next settled reload
    # of any kind: success or failure after the exec, a refusal, a failed exec.
    settled = sum(before["reloads"].values())
    send_signal(pidfile, pid, signal.SIGUSR2)
    doc = _wait(pid, timeout, lambda d: sum(d["reloads"].values()) > settled, path)
    if doc is None:
        return _no_outcome(pid, timeout, "upgrade")
    last = doc["last_reload"]
    newest = max((g["number"] for g in before["generations"]), default=0)
    if last["result"] == "success" and last["generation"] > newest:
        print(f"upgrade done: master pid {pid} runs upgraderd {doc['version']} "
              f"(was {before['version']}); generation {last['generation']} ACTIVE")
        return ExitCode.OK
    if doc["reloads"]["failed"] > before["reloads"]["failed"] and last == before["last_reload"]:
        print(f"upgraderd: upgrade failed: the master (pid {pid}) could not exec itself and "
              "carries on as before; its log says why", file=sys.stderr)
        return ExitCode.FAILED
    print(f"upgraderd: upgrade {status.describe_reload(doc)}", file=sys.stderr)
    return ExitCode.FAILED


def request_path(pidfile: str) -> str:
    """Return the file `upgraderd promote|rollback` leave their request in, beside the pidfile."""
    return pidfile + ".rollout"


def take_request(path: str) -> str:
    """Return the request in `path` and remove it ("" if none). The master calls it on SIGWINCH;
    only a regular file is read (never through a symlink), and only 64 bytes of it."""
    data = read_regular(path, 64)
    if data is None:
        return ""
    try:
        os.unlink(path)
    except OSError:
        pass
    return data.decode("ascii", errors="replace")


def verdict(pidfile: str, action: str, timeout: float) -> int:
    """Ask for `action` (promote or rollback) of the rollout under way, then wait for its verdict."""
    pid, path, doc = _observe(pidfile)
    rollout = doc.get("rollout")
    if not isinstance(rollout, dict) and action == "rollback":
        return _to_previous(pidfile, pid, path, doc, timeout)
    if not isinstance(rollout, dict):
        print("upgraderd: no rollout is under way: nothing to promote", file=sys.stderr)
        return ExitCode.FAILED
    number, settled = rollout["generation"], sum(doc["reloads"].values())
    write_atomic(request_path(pidfile), f"{action} {number}\n")
    send_signal(pidfile, pid, signal.SIGWINCH)
    after = _wait(pid, timeout, lambda d: sum(d["reloads"].values()) > settled, path)
    if after is None:
        return _no_outcome(pid, timeout, action)
    last = after["last_reload"]
    if last["generation"] == number and last["result"] == ("success" if action == "promote" else "failed"):
        print(f"promote done: generation {number} ACTIVE" if action == "promote" else
              f"rollback done: generation {number} rolled back, generation {rollout['previous']} serves")
        return ExitCode.OK
    print(f"upgraderd: {action}: {status.describe_reload(after)}", file=sys.stderr)
    return ExitCode.FAILED


def _to_previous(pidfile: str, pid: int, path: str, doc: dict[str, Any], timeout: float) -> int:
    """Roll back to the previous release's kept template (no rollout under way), and wait until it serves."""
    kept = doc.get("previous")
    if not isinstance(kept, dict):
        print("upgraderd: no rollout is under way and no previous release is kept (rollout.keep_previous): "
              "nothing to roll back to", file=sys.stderr)
        return ExitCode.FAILED
    settled, newest = sum(doc["reloads"].values()), max((g["number"] for g in doc["generations"]), default=0)
    write_atomic(request_path(pidfile), f"previous {kept['release']}\n")
    send_signal(pidfile, pid, signal.SIGWINCH)
    after = _wait(pid, timeout, lambda d: sum(d["reloads"].values()) > settled, path)
    if after is None:
        return _no_outcome(pid, timeout, "rollback")
    last = after["last_reload"]
    if last["result"] == "success" and last["generation"] > newest:
        print(f"rollback done: generation {last['generation']} ACTIVE, running generation {kept['release']}'s "
              "release again")
        return ExitCode.OK
    print(f"upgraderd: rollback: {status.describe_reload(after)}", file=sys.stderr)
    return ExitCode.FAILED


def _serving_slots(doc: dict[str, Any]) -> tuple[int, int] | None:
    """Return (ACTIVE generation number, its slots that are not draining), or None."""
    for g in doc["generations"]:
        if g["state"] == "ACTIVE":
            slots = [w for w in g["workers"] if w["state"] not in ("DRAINING", "EXITED")]
            return g["number"], len(slots)
    return None


def scale(pidfile: str, delta: int, timeout: float) -> int:
    """Send |delta| x TTIN or TTOU, each after the previous one took effect."""
    pid, path, doc = _observe(pidfile)
    serving = _serving_slots(doc)
    if serving is None:
        print("upgraderd: no ACTIVE generation to scale", file=sys.stderr)
        return ExitCode.FAILED
    number, count = serving
    if count + delta < 1:
        print(f"upgraderd: generation {number} has {count} worker(s); it cannot go below one",
              file=sys.stderr)
        return ExitCode.FAILED
    sig, step = (signal.SIGTTIN, 1) if delta > 0 else (signal.SIGTTOU, -1)
    end = time.monotonic() + timeout
    for want in range(count + step, count + delta + step, step):
        # One signal at a time: the kernel merges a pending signal with a second
        # one of the same number, so a burst of TTINs could add a single worker.
        send_signal(pidfile, pid, sig)
        done = _wait(pid, max(0.0, end - time.monotonic()),
                     lambda d: _serving_slots(d) == (number, want), path)
        if done is None:
            print(f"upgraderd: generation {number} did not reach {want} worker(s) within "
                  f"{timeout:g}s (a reload since? `upgraderd status` shows where it is)",
                  file=sys.stderr)
            return ExitCode.TIMEOUT if alive(pid) else ExitCode.FAILED
    print(f"scaled generation {number}: {count} -> {count + delta} workers "
          "(the next reload goes back to workers.count)")
    return ExitCode.OK


def reopen(pidfile: str) -> int:
    """Send SIGUSR1: the master reopens its log file."""
    pid = find_master(pidfile)
    send_signal(pidfile, pid, signal.SIGUSR1)
    print(f"sent SIGUSR1 to master pid {pid}: it reopens its log file")
    return ExitCode.OK


def _no_outcome(pid: int, timeout: float, what: str) -> int:
    if not alive(pid):
        print(f"upgraderd: the master (pid {pid}) exited during the {what}", file=sys.stderr)
        return ExitCode.FAILED
    print(f"upgraderd: no {what} outcome within {timeout:g}s; `upgraderd status` shows "
          "where it is", file=sys.stderr)
    return ExitCode.TIMEOUT


def stop(pidfile: str, fast: bool, timeout: float) -> int:
    """Send SIGTERM (graceful) or SIGINT (fast) and wait until the master has exited."""
    pid = find_master(pidfile)
    send_signal(pidfile, pid, signal.SIGINT if fast else signal.SIGTERM)
    end = time.monotonic() + timeout
    with _PidWatch(pid) as watch:
        while alive(pid):
            if time.monotonic() >= end:
                print(f"upgraderd: pid {pid} is still draining after {timeout:g}s", file=sys.stderr)
                return ExitCode.TIMEOUT
            watch.wait(min(1.0, end - time.monotonic()))
    print(f"stopped (pid {pid})")
    return ExitCode.OK


def show_status(pidfile: str, as_json: bool) -> int:
    """Print the master's pid, uptime, generations and last reload."""
    pid = find_master(pidfile)
    doc = status.read(status.path_for(pidfile))
    if doc is None or doc.get("pid") != pid:
        print(f"master pid {pid}: starting (no status file yet)")
        return ExitCode.OK
    if as_json:
        print(json.dumps(doc, indent=1, sort_keys=True))
    else:
        sys.stdout.write(status.render(doc))
    return ExitCode.OK


def _wait(pid: int, timeout: float, done: Any, path: str) -> dict[str, Any] | None:
    """Return the first status document for which `done(doc)` holds; None on timeout or exit."""
    end = time.monotonic() + timeout
    with _PidWatch(pid) as watch:
        while True:
            doc = status.read(path)
            if doc is not None and doc.get("pid") == pid and done(doc):
                return doc
            if not alive(pid) or time.monotonic() >= end:
                return None
            watch.wait(POLL)


class _PidWatch:
    """Wait for a short time, waking early if `pid` exits (a pidfd; a plain sleep without one)."""

    def __init__(self, pid: int) -> None:
        self.fd: int | None
        try:
            self.fd = os.pidfd_open(pid)
        except (OSError, AttributeError):
            self.fd = None

    def __enter__(self) -> _PidWatch:
        return self

    def __exit__(self, *exc: object) -> None:
        if self.fd is not None:
            os.close(self.fd)

    def wait(self, seconds: float) -> None:
        """Return after `seconds`, or as soon as the process exits."""
        if self.fd is None:
            time.sleep(max(0.0, seconds))
        else:
            select.select([self.fd], [], [], max(0.0, seconds))
