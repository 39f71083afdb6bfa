"""A generation's template: import the app once, then fork its workers on the master's request.

`python -m upgraderd.apps.template APP` is exec'd by the master once per
generation (system/templatectl.py), APP being `echo`, `http`,
`package.module:factory` or a web app, `asgi:package.module:app` or
`wsgi:...` (upgraderd/apps/asgi/). It imports the app and everything a worker needs
(the built-in event loop and its metric files' writer), freezes the heap so
the workers share its pages, and then waits on its control channel
(fd 3): one packet per worker, a JSON object (slot, environment) with the
worker's listening sockets attached.

For the requests it has (one per worker; it takes every one already queued)
it double-forks: one intermediate child forks the workers and exits at once,
so they are re-parented to the master (a child subreaper), which reaps them
as any worker. For each worker the template sends
SPAWNED=<slot>:<pid> to the master's notify socket, and only then opens the
worker's gate, so the worker's own READY=1 can never arrive first. A worker
whose gate closes without the byte (the template died) exits without serving.

Invariants:
- The template never accepts: it holds a request's sockets only until the
  fork, and never registers them anywhere.
- The worker sees what an exec'd worker sees: its sockets at fd 3, 4, ... in
  LISTEN_FDS order, LISTEN_PID equal to its own pid, its own environment.
  Metric files are named by pid when a worker first reports (apps/connmetrics.py),
  in the worker, so each worker writes its own.
- The template dies with the master (PR_SET_PDEATHSIG) and on EOF of its channel.
- A standby (`--standby`, workers.warm) imports only what a HUP does not
  change (the standard library, the worker library, the built-in apps' loop,
  the ASGI server's stack for a web app), never an app module, built-in ones
  included: the app is imported when the master hands the standby its
  generation, fresh from disk. Modules of `workers.preload` are imported too,
  and so are those the previous template imported from the standard library
  and site-packages (its record); all are checked against the disk at the
  HUP: if any changed, the standby exec's itself as a fresh template
  (apps/preload.py).

Hazard: the template must stay single-threaded; an app module that starts a
thread at import time makes every fork unsafe. `factory` is called in the
worker, after the fork; put per-worker work there, not at import.

A `package.module:factory` app's factory takes no argument and returns a
server with a `serve() -> int | None` method, for example
`upgraderd.apps.server.Server(worker.listeners(), MyProtocol)`.
"""

from __future__ import annotations

import ctypes
import fcntl
import gc
import importlib
import json
import os
import signal
import socket
import sys
import time
import traceback
from typing import Any, Callable

from upgraderd.apps import logline
from upgraderd.apps.preload import Snapshot, record
from upgraderd.apps.relabel import relabel
from upgraderd.contract import env as contract
from upgraderd.contract import notify
from upgraderd.contract.standby import parse
from upgraderd.worker import proctitle

PR_SET_PDEATHSIG = 1
CONTROL_FD = 3
MAX_FDS = 64
MAX_BATCH = 64
HIGH_FD = 64


def load(app: str) -> Callable[[], int]:
    """Import `app` now; return what runs one worker of it after a fork."""
    import upgraderd.apps.server  # noqa: F401  (imported before the fork, so its pages are shared)
    if app.partition(":")[0] in ("asgi", "wsgi"):
        from upgraderd.apps.asgi import entry   # upgraderd's HTTP server for a web app
        return entry.load(app)
    if ":" not in app:
        module = importlib.import_module(f"upgraderd.apps.{app}")
        main: Callable[[], int] = module.main
        return main
    modname, _, attr = app.partition(":")
    factory = getattr(importlib.import_module(modname), attr)
    if not callable(factory):
        raise TypeError(f"{app}: {attr} is not callable")

    def run() -> int:
        code = factory().serve()
        return int(code or 0)
    return run


_LIBC: list[ctypes.CDLL] = []   # loaded once in the template, not again in each forked worker


def _libc() -> ctypes.CDLL:
    if not _LIBC:
        _LIBC.append(ctypes.CDLL(None, use_errno=True))
    return _LIBC[0]


def _die_with_parent() -> None:
    libc = _libc()
    libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    # The master may have died before the line above: then we were re-parented already.
    if str(os.getppid()) != os.environ.get(contract.TEMPLATE_PARENT, str(os.getppid())):
        os._exit(1)


def _control() -> socket.socket:
    """Move the control channel out of fd 3, which the workers' sockets take."""
    high = fcntl.fcntl(CONTROL_FD, fcntl.F_DUPFD_CLOEXEC, HIGH_FD)
    os.close(CONTROL_FD)
    return socket.socket(fileno=high)


def serve(control: socket.socket, run: Callable[[], int], then: Callable[[], None] = lambda: None) -> int:
    """Fork a worker per request until the master closes the channel; `then` after the first batch
    (off the path from the HUP to the workers' start)."""
    while True:
        batch = _receive(control)
        if batch is None:
            return 0
        try:
            _fork_batch(control, batch, run)
        finally:
            for _slot, _env, fds in batch:
                for fd in fds:
                    os.close(fd)
        then, later = (lambda: None), then
        later()


Request = tuple[int, dict[str, str], list[int]]


def _receive(control: socket.socket) -> list[Request] | None:
    """Wait for a request, then take every one already queued; None once the master is gone."""
    batch: list[Request] = []
    flags = 0
    while len(batch) < MAX_BATCH:
        try:
            data, anc, _flags, _addr = control.recvmsg(1 << 20, socket.CMSG_SPACE(MAX_FDS * 4), flags)
        except BlockingIOError:
            break
        except InterruptedError:
            continue
        fds = [fd for level, kind, raw in anc if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS
               for fd in _unpack(raw)]
        if not data:
            for fd in fds:
                os.close(fd)
            break
        request = json.loads(data)
        batch.append((int(request["slot"]), dict(request["env"]), fds))
        flags = socket.MSG_DONTWAIT
    return batch or None


def _unpack(raw: bytes) -> list[int]:
    usable = len(raw) - len(raw) % 4
    return [int.from_bytes(raw[i:i + 4], sys.byteorder, signed=True) for i in range(0, usable, 4)]


def _fork_batch(control: socket.socket, batch: list[Request], run: Callable[[], int]) -> None:
    """Fork every worker of `batch` from one short-lived middle process, then release them.

    One middle per batch, not per worker: each fork and each exit is a hand-off
    between processes, which costs most on a loaded machine. The middle exits as
    soon as it has forked, so the workers are re-parented to the master. The
    workers wait at one gate, a pipe: the template writes a byte per worker
    forked, and each worker reads one.
    """
    gate_r, gate_w = os.pipe()
    pid_r, pid_w = os.pipe()
    try:
        middle = os.fork()
        if middle == 0:
            _middle(control, batch, gate_r, pid_w, run)
    finally:
        os.close(pid_w)
        os.close(gate_r)
    try:
        os.waitpid(middle, 0)
        # The middle wrote every line before it exited, so one read takes them all.
        lines = os.read(pid_r, 1 << 16).decode(errors="replace").split()
        for line in lines:
            index, _, pid = line.partition(":")
            i = int(index)
            notify.notify(notify.spawned(batch[i][0], int(pid)), batch[i][1].get(contract.NOTIFY_SOCKET))
        # Every SPAWNED first, then the gate: a worker let run takes the core from the
        # template (wake-up preemption), so interleaved, the last SPAWNED of a batch
        # waited for the start-up of all the workers before it.
        if lines:
            os.write(gate_w, b"1" * len(lines))   # at most MAX_BATCH bytes: one atomic pipe write
    finally:
        os.close(pid_r)
        os.close(gate_w)


def _middle(control: socket.socket, batch: list[Request], gate: int, pid_w: int,
            run: Callable[[], int]) -> None:
    """In the middle process: fork each worker, write `index:pid` lines, and exit."""
    try:
        for i, (_slot, env, fds) in enumerate(batch):
            worker = os.fork()
            if worker == 0:
                # Only its own fds: the gate's write end held by a worker would keep the
                # others waiting forever if the template died before writing. A few
                # close_range calls, not a close per fd of the batch (O(N) per worker).
                close_all_but({gate, control.fileno(), *fds})
                _become_worker(control, gate, env, fds, run)
            os.write(pid_w, f"{i}:{worker}\n".encode())
    finally:
        os._exit(0)


def close_all_but(keep: set[int]) -> None:
    """Close every fd above 2 that is not in `keep`."""
    low = 3
    for fd in sorted(fd for fd in keep if fd >= low):
        if fd > low:
            os.closerange(low, fd)
        low = fd + 1
    os.closerange(low, max(os.sysconf("SC_OPEN_MAX"), low + 1))


def _become_worker(control: socket.socket, gate: int, env: dict[str, str], fds: list[int],
                   run: Callable[[], int]) -> None:
    control.detach()   # closed below with every other fd; the object must not close a reused number
    code = 1
    try:
        released = os.read(gate, 1) == b"1"
        os.close(gate)
        if released:
            gc.enable()
            _place(fds)
            become_environ(env)
            proctitle.worker(env)
            os.environ[contract.LISTEN_PID] = str(os.getpid())
            relabel(env.get(contract.GENERATION))   # a kept template forks a later generation
            code = run()
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else 1
    except BaseException:
        traceback.print_exc()
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)


def become_environ(env: dict[str, str]) -> None:
    """Make the environment exactly `env`, removing only the keys it does not have.

    `os.environ.clear()` copies the key list once per key it removes, and with
    `update()` after it cost 0.24-0.45 ms of each forked worker's start (55
    variables), against about 0.08 ms here. Every value is set again, even one
    os.environ already shows: code preloaded in the template may have changed
    the process's own environment under it (os.putenv, a C library's setenv).
    """
    for key in [key for key in os.environ if key not in env]:
        del os.environ[key]
    os.environ.update(env)


def _place(fds: list[int]) -> None:
    """Put `fds` at 3, 4, ... and close every other fd above 2."""
    top = max([*fds, 2 + len(fds)]) + 1
    moved = [fcntl.fcntl(fd, fcntl.F_DUPFD, top) for fd in fds]
    for i, fd in enumerate(moved):
        os.dup2(fd, 3 + i)
    close_all_but(set(range(3, 3 + len(fds))))   # the moved copies too


def preload() -> None:
    """Import what does not change at a HUP: the worker library and the built-in apps' loop.

    Never an app module, built-in ones included: those are imported when the
    master hands the standby its generation, fresh from disk.
    """
    import select  # noqa: F401
    import upgraderd.worker  # noqa: F401
    import upgraderd.apps.run  # noqa: F401  (the built-in apps' loop: server, threaded)


def _app_module(app: str) -> str:
    """Return the module an app spec names (`asgi:pkg.mod:app` -> `pkg.mod`; `echo` -> upgraderd's)."""
    kind, _, rest = app.partition(":")
    if kind in ("asgi", "wsgi"):
        return rest.partition(":")[0]
    return kind if rest else f"upgraderd.apps.{kind}"


def await_load(control: socket.socket) -> tuple[str, dict[str, str]]:
    """Wait, as a standby, for the app to import and the environment to take."""
    while True:
        data, anc, _flags, _addr = control.recvmsg(1 << 20, socket.CMSG_SPACE(MAX_FDS * 4))
        for level, kind, raw in anc:
            if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                for fd in _unpack(raw):
                    os.close(fd)
        if not data:
            raise SystemExit(0)
        request = json.loads(data)
        if "load" in request:
            return str(request["load"]), dict(request["env"])


def _exec_fresh(control: socket.socket, app: str, why: str) -> None:
    """Become a fresh (cold) template of `app` in place: same pid, same channel, nothing preloaded."""
    logline.log(f"upgraderd template {os.getpid()}: {why}; exec'ing a fresh template")
    os.dup2(control.fileno(), CONTROL_FD, inheritable=True)
    os.execv(sys.executable, [*sys.orig_argv[:-1], app])


def main(argv: list[str]) -> int:
    """Run a template for the app named in argv[1] (`--standby`: the master names it later)."""
    if len(argv) != 2:
        print("usage: python -m upgraderd.apps.template APP|--standby[=MODULE,...]", file=sys.stderr)
        return 2
    # No collections in the template: a collection writes to every object's header,
    # and the forked workers would then copy the pages it touched (gc.freeze's advice).
    gc.disable()
    _die_with_parent()
    control = _control()
    app = argv[1]
    if app.startswith("--standby"):
        proctitle.standby()
        preload()
        snapshot = Snapshot()
        snapshot.load(parse(app))   # the ASGI stack, workers.preload, the record (apps/preload.py)
        app, env = await_load(control)
        become_environ(env)
        importlib.invalidate_caches()   # a module added since we started must be found
        stale = snapshot.changed()
        if stale is not None:
            _exec_fresh(control, app, stale)
    proctitle.template()
    started = time.monotonic()
    try:
        run = load(app)
    except Exception as e:
        print(f"upgraderd template {os.getpid()}: cannot load {app!r}:", file=sys.stderr)
        traceback.print_exc()
        # The traceback's last line, for the master's failure reason (`upgraderd reload`).
        last = traceback.format_exception_only(e)[-1].strip().replace("\n", " ")
        notify.notify(notify.status(f"cannot load {app!r}: {last}"))
        return 3
    logline.log(f"upgraderd template {os.getpid()}: loaded {app} in {(time.monotonic() - started) * 1000:.0f} ms")
    gc.freeze()   # the workers' collections leave the template's objects (and their pages) alone
    return serve(control, run, lambda: record(_app_module(app)))   # for the next standby (apps/preload.py)


if __name__ == "__main__":
    raise SystemExit(main(sys.argv))
