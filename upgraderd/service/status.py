"""The status file: the master's state, readable by `upgraderd status` and `reload`.

Design note: another process must see the master's generations and the
outcome of the last reload. The master writes a small JSON document next to
its pidfile (`PIDFILE.status.json`) whenever that state changes, atomically
(temporary file, then rename), so a reader sees a whole document or the
previous one. The temporary file has a random name and is created with
O_EXCL|O_NOFOLLOW (pidfile.write_atomic), so nothing planted next to it is
followed; readers open it with O_NOFOLLOW and refuse anything but a regular
file. The alternative, a control socket served from the master's
selector, would add a protocol and a client/server pair to the master for
what one file write per change gives. Times in the file are wall-clock
seconds, so a reader computes ages itself and the file does not change while
nothing happens.

`upgraderd reload` uses two counters: `hups` (SIGHUPs the master has handled)
and `last_reload.covers` (the value of `hups` when the last settled reload
started reading its config). Once `covers` reaches the `hups` value seen
before sending SIGHUP plus one, the settled reload is the one that read the
config after our signal.
"""

from __future__ import annotations

import json
import os
import time
from typing import TYPE_CHECKING, Any

from upgraderd import __version__
from upgraderd.service.pidfile import read_regular, write_atomic

# Far above any real document (a few KB per generation): a bigger file is not ours.
MAX_BYTES = 4 * 1024 * 1024

if TYPE_CHECKING:
    from upgraderd.core.snapshot import Snapshot


def path_for(pidfile: str) -> str:
    """Return the status file that goes with `pidfile`."""
    return pidfile + ".status.json"


def document(snap: Snapshot) -> dict[str, Any]:
    """Return the snapshot as the JSON-ready status document (times as wall clock)."""
    s, off = snap.stats, snap.wall_offset
    gens = [{
        "number": g.number, "state": g.state.name, "since": g.changed_at + off,
        "created_at": g.created_at + off, "reason": g.reason, "runs": g.runs,
        "workers": [{"slot": w.slot, "pid": w.pid, "state": w.state.name,
                     "started_at": w.started_at + off} for w in g.workers],
    } for g in snap.generation_list]
    return {
        "pid": os.getpid(), "version": __version__, "config": os.path.abspath(snap.config_path),
        "started_at": snap.started_at,
        "listeners": [{"name": x.name, "address": x.address, "mode": x.mode} for x in snap.listeners],
        "generations": gens,
        "reloads": dict(s.reloads), "hups": s.hups, "rollout": _rollout(snap), "previous": _previous(snap),
        "last_reload": {"result": s.last_reload_result, "generation": s.last_reload_generation,
                        "covers": s.last_reload_covers,
                        "error": "" if s.last_reload_ok else s.last_reload_error},
    }


def _rollout(snap: Snapshot) -> dict[str, Any] | None:
    r = snap.rollout
    if r is None:
        return None
    return {"generation": r.generation, "previous": r.previous, "phase": r.phase, "workers": r.workers,
            "of": r.of, "checks": list(r.checks), "began_at": r.began_at + snap.wall_offset, "held": r.held,
            "window_ends": r.window_ends + snap.wall_offset, "batch": r.batch, "batches": r.batches}


def _previous(snap: Snapshot) -> dict[str, Any] | None:
    p = snap.previous
    if p is None:
        return None
    return {"release": p.release, "generation": p.superseded, "template": p.template,
            "until": p.until + snap.wall_offset}


def describe_rollout(r: dict[str, Any], now: float) -> str:
    """Return a rollout under way in one line."""
    checks = ", ".join(r["checks"])
    if r.get("held"):
        return (f"rollout: generation {r['generation']} canary held, {r['workers']} of {r['of']} workers beside "
                f"generation {r['previous']}: {r['held']}; waiting for `upgraderd promote` or `upgraderd rollback`")
    if r["phase"] == "batches":
        return (f"rollout: generation {r['generation']} batch {r.get('batch')} of {r.get('batches')}, "
                f"{r['workers']} of {r['of']} workers ready; generation {r['previous']} serves the rest "
                f"(checks: {checks})")
    if r["phase"] == "promoting":
        return (f"rollout: generation {r['generation']} promoting, {r['workers']} of {r['of']} workers ready; "
                f"generation {r['previous']} serves until all are (checks: {checks})")
    return (f"rollout: generation {r['generation']} canary, {r['workers']} of {r['of']} workers ready beside "
            f"generation {r['previous']}; verdict in {age(r['window_ends'] - now)} (checks: {checks})")


def only_readiness_changed(before: dict[str, Any] | None, after: dict[str, Any]) -> bool:
    """Return True if `after` differs from `before` only in the states of STARTING generations' workers.

    Such a change waits for the next one: the last READY=1 of a starting
    generation is what makes it ACTIVE, and a rename on a busy disk took up to
    10 ms, so writing after each READY=1 delayed the next one. The pids of
    starting workers are still written at once (a restarted master looks for
    orphans by them); their readiness shows when the generation settles.
    """
    return before is not None and _without_readiness(before) == _without_readiness(after)


def _without_readiness(data: dict[str, Any]) -> dict[str, Any]:
    gens = [{**g, "workers": [{**w, "state": ""} for w in g["workers"]]} if g["state"] == "STARTING" else g
            for g in data["generations"]]
    return {**data, "generations": gens}


def write(path: str, data: dict[str, Any]) -> None:
    """Write `data` to the status file atomically.

    Compact, not indented: json's C encoder takes no indent, and the pure-Python
    one it falls back to took 10-100 ms per write at 128 workers, once per
    loop pass while a generation starts (`upgraderd status` is the readable form).
    """
    write_atomic(path, json.dumps(data, sort_keys=True, separators=(",", ":")) + "\n")


def read(path: str) -> dict[str, Any] | None:
    """Return the status document at `path`, or None if there is none."""
    raw = read_regular(path, MAX_BYTES)
    if raw is None or len(raw) >= MAX_BYTES:
        return None
    try:
        data = json.loads(raw)
    except (ValueError, RecursionError):
        return None
    return data if isinstance(data, dict) else None


def age(seconds: float) -> str:
    """Return a duration as 45s, 3m05s or 2h03m."""
    s = max(0, int(seconds))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{s % 3600 // 60:02d}m"


def render(data: dict[str, Any], now: float | None = None) -> str:
    """Return the status document as the text `upgraderd status` prints."""
    now = time.time() if now is None else now
    lines = [f"master pid {data['pid']}, up {age(now - data['started_at'])} "
             f"(upgraderd {data['version']})", f"config {data['config']}"]
    lines += [f"listener {x['name']} {x['address']} ({x['mode']})" for x in data["listeners"]]
    for g in data["generations"]:
        live = [w for w in g["workers"] if w["pid"] is not None]
        lines.append(f"generation {g['number']} {g['state']} for {age(now - g['since'])}, "
                     f"age {age(now - g['created_at'])}, {len(live)} worker(s)"
                     + (f", runs generation {g['runs']}'s release (a rollback)" if g.get("runs") else "")
                     + (f": {g['reason']}" if g["reason"] else ""))
        for w in g["workers"]:
            pid = w["pid"] if w["pid"] is not None else "-"
            lines.append(f"  slot {w['slot']}  pid {pid}  {w['state']}  age {age(now - w['started_at'])}")
    if data.get("rollout"):
        lines.append(describe_rollout(data["rollout"], now))
    if data.get("previous"):
        p = data["previous"]
        lines.append(f"previous release: generation {p['release']}'s template pid {p['template']} kept "
                     f"{age(p['until'] - now)} more for `upgraderd rollback`")
    lines.append(f"last reload: {describe_reload(data)}")
    r = data["reloads"]
    lines.append(f"reloads: {r['success']} succeeded, {r['failed']} failed, {r['rejected']} rejected")
    return "\n".join(lines) + "\n"


def describe_reload(data: dict[str, Any]) -> str:
    """Return the last reload's outcome in one line (its error may span more)."""
    last = data["last_reload"]
    if not last["result"]:
        return "none yet"
    if last["result"] == "success":
        return f"success: generation {last['generation']} ACTIVE"
    what = "rejected (the old generation keeps serving)" if last["result"] == "rejected" else \
        f"failed: generation {last['generation']} did not become ACTIVE (the old one keeps serving)"
    if last["result"] == "failed" and " rolled back: " in last["error"]:
        what = f"failed: generation {last['generation']} was rolled back (the old one keeps serving)"
    return f"{what}\n{last['error']}"
