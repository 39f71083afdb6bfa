"""Process titles, so that ps, top and pgrep tell the master, templates and workers apart.

    upgraderd: master [NAME]
    upgraderd: template gen 7 [NAME]
    upgraderd: standby [NAME]
    upgraderd: worker gen 7 slot 2 [NAME]

` [NAME]` only when the config sets `name` (workers and templates find it in
UPGRADERD_NAME). The title replaces /proc/PID/cmdline (`ps`, `top -c`,
systemd-cgls, `pgrep -f`); comm, 15 bytes, gets a short fixed name (`pgrep`,
`top`, `ps -o comm`): upgraderd, upgraderd-tmpl or upgraderd-work.

Design note: `setproctitle` (the library gunicorn uses) rewrites the memory
that held argv and the environment's strings in place, which Python cannot do
itself; prctl(PR_SET_NAME) alone would set only the 15-byte comm.

Hazards:
- After this, /proc/PID/cmdline is the title, not the argv: whatever
  recognises a master by its command line (system/procfs.py `is_master`)
  must also know the title.
- By default setproctitle also overwrites the environment's memory, and with
  it /proc/PID/environ, which peers, orphans and other masters read
  (UPGRADERD_GENERATION: worker/peers.py, system/orphanfds.py, system/conflict.py).
  SPT_NOENV, which the library reads at its first call only, keeps it: the
  title is then at most as long as the command line it replaces, and is cut
  there (a template's or worker's `python -m upgraderd.apps.template APP` is
  long enough for any of ours but a long NAME).
"""

from __future__ import annotations

import os
from typing import Mapping

from setproctitle import setproctitle, setthreadtitle

from upgraderd.contract import env as contract

MASTER_TITLE = "upgraderd: master"


def set_title(role: str, name: str | None, comm: str) -> None:
    """Make this process `upgraderd: ROLE [NAME]`, its comm `comm` (at most 15 bytes)."""
    noenv = os.environ.get("SPT_NOENV")
    os.environ["SPT_NOENV"] = "1"
    try:
        setproctitle(f"upgraderd: {role}" + (f" [{name}]" if name else ""))
    finally:
        if noenv is None:   # the workers' environment is the config's, not this switch's
            del os.environ["SPT_NOENV"]
    setthreadtitle(comm)


def master(name: str | None) -> None:
    """Title the master."""
    set_title("master", name, "upgraderd")


def template(env: Mapping[str, str] = os.environ) -> None:
    """Title a template of the generation in `env`."""
    set_title(f"template gen {env.get(contract.GENERATION, '?')}", env.get(contract.NAME), "upgraderd-tmpl")


def standby(env: Mapping[str, str] = os.environ) -> None:
    """Title a standby (a template waiting to be given its generation)."""
    set_title("standby", env.get(contract.NAME), "upgraderd-tmpl")


def worker(env: Mapping[str, str] = os.environ) -> None:
    """Title a worker with its generation and slot from `env`."""
    set_title(f"worker gen {env.get(contract.GENERATION, '?')} slot {env.get(contract.SLOT, '?')}",
              env.get(contract.NAME), "upgraderd-work")
