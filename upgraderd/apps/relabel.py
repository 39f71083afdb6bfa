"""Make a forked worker's exec-time environment name its own generation.

Hand-off peers check each other's generation in /proc/PID/environ
(worker/peers.py), which shows the environment the process was *exec'd*
with: for a forked worker, its template's. A template serves one generation,
so the two agree, except for a template kept for an instant rollback
(core/previous.py): it was exec'd as generation 1, and forks generation 3.
Its workers would then fail every hand-off check, and the connections of
the generation they replace would be drained instead of handed over.

So the worker overwrites the value in place, in its own memory, through
/proc/self/mem (a process may always write its own; no capability needed,
unlike prctl(PR_SET_MM)). The value cannot grow: a template that may be kept
is exec'd with the number in 9 digits (contract/env.py `template_generation`),
and the new one is written with as many.

Hazard: this only changes what /proc shows, which the process could always
forge for itself; the trust it feeds was never more than "a worker of this
master, by its own word", as for any worker.
"""

from __future__ import annotations

import os

from upgraderd.apps import logline
from upgraderd.contract import env as contract

_LIMIT = 1 << 20


def relabel(generation: str | None) -> bool:
    """Write `generation` over GENERATION in /proc/self/environ if it differs; return True if written."""
    if generation is None or not generation.isdigit():
        return False
    try:
        with open("/proc/self/environ", "rb") as f:
            env = f.read(_LIMIT)
        key = contract.GENERATION.encode() + b"="
        at = 0 if env.startswith(key) else env.find(b"\0" + key) + 1
        if at == 0 and not env.startswith(key):
            return False   # not set: nothing to relabel
        start = at + len(key)
        old = env[start:env.index(b"\0", start)]
        if contract.small_number(old.decode("ascii", "replace")) == int(generation):
            return False
        new = generation.zfill(len(old)).encode()
        if len(new) != len(old):
            logline.log(f"upgraderd worker {os.getpid()}: generation {generation} does not fit in the template's "
                        f"{old.decode(errors='replace')!r}; hand-offs to this worker will be refused", "WARNING")
            return False
        with open("/proc/self/stat", "rb") as f:
            stat = f.read(4096)
        env_start = int(stat[stat.rindex(b")") + 2:].split()[47])   # field 50, env_start
        with open("/proc/self/mem", "r+b", buffering=0) as mem:
            mem.seek(env_start + start)
            mem.write(new)
        return True
    except (OSError, ValueError, IndexError):
        return False
