"""The environment a worker is started with: the variables' names and how to read them.

The master sets these in every worker's environment (core/launch.py) and
the worker library reads them (upgraderd/worker/); docs/workers.md is the
prose contract. Three groups:

- systemd's socket-activation and notify protocol (LISTEN_FDS, LISTEN_PID,
  LISTEN_FDNAMES, NOTIFY_SOCKET), which any systemd-aware server understands;
- upgraderd's own `UPGRADERD_*` variables;
- METRICS_DIR, the directory a built-in worker writes its metric files into
  (metricformat.py), set only for the built-in apps.

Invariant: the generation number a worker was exec'd with stays readable in
/proc/PID/environ for as long as it lives (the kernel keeps the exec-time
environment there), and hand-off peers trust each other by it
(worker/peers.py): it must be set at exec, never changed later.
"""

from __future__ import annotations

import re

# systemd's protocol (sd_listen_fds(3), sd_notify(3)).
LISTEN_FDS = "LISTEN_FDS"
LISTEN_PID = "LISTEN_PID"
LISTEN_FDNAMES = "LISTEN_FDNAMES"
LISTEN_FDS_START = 3   # the first passed socket's fd (SD_LISTEN_FDS_START)
NOTIFY_SOCKET = "NOTIFY_SOCKET"
LISTEN_VARS = (LISTEN_FDS, LISTEN_PID, LISTEN_FDNAMES)

# upgraderd's own.
GENERATION = "UPGRADERD_GENERATION"        # this worker's generation number
SLOT = "UPGRADERD_SLOT"                    # its slot in the generation, 0-based
DRAIN_SIGNAL = "UPGRADERD_DRAIN_SIGNAL"    # the signal it is drained with, e.g. TERM
HANDOFF = "UPGRADERD_HANDOFF"              # "auto": give connections away at drain
HANDOFF_AUTO = "auto"
HANDOFF_DIR = "UPGRADERD_HANDOFF_DIR"      # the master's private directory of hand-off channels
ORPHAN_GRACE = "UPGRADERD_ORPHAN_GRACE"    # seconds to serve on after the master died
THREADS = "UPGRADERD_THREADS"              # event loops of a built-in app
WORKER_BIND = "UPGRADERD_WORKER_BIND"      # ':'-separated listeners the worker binds itself
ADDR_PREFIX = "UPGRADERD_ADDR_"            # + the listener's name: its address
PROBE_PORT = "UPGRADERD_PROBE_PORT"        # the port {probe_port} reserved for an HTTP probe
TEMPLATE_PARENT = "UPGRADERD_TEMPLATE_PARENT"  # the pid a prefork template must have as parent
METRICS_DIR = "UPGRADERD_METRICS_DIR"      # where a built-in worker writes its metric files
HTTP = "UPGRADERD_HTTP"                    # `asgi:`/`wsgi:` apps: the config's `http:` section as JSON
LOG_FORMAT = "UPGRADERD_LOG_FORMAT"        # the master's log.format, for a worker's own lines
NAME = "UPGRADERD_NAME"                    # the config's `name`, for process titles (when set)


def addr_env_name(listener: str) -> str:
    """Return the variable that gives workers the address of `listener` (UPGRADERD_ADDR_WEB)."""
    return ADDR_PREFIX + re.sub(r"[^A-Za-z0-9]", "_", listener).upper()


def small_number(value: str | None) -> int | None:
    """Return `value` as a non-negative int of at most 9 digits, else None (a worker's env is untrusted)."""
    if value is None or not (value.isascii() and value.isdigit()) or len(value) > 9:
        return None
    return int(value)


def template_generation(number: int, relabel: bool) -> str:
    """Return the GENERATION a prefork template is exec'd with: the number, or (`relabel`: its
    template may fork a later rollback generation) the number in 9 digits, so that a worker can
    overwrite it in place with its own (apps/relabel.py); `small_number` reads both alike."""
    return str(number).zfill(9) if relabel else str(number)
