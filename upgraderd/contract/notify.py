"""The sd_notify messages of the contract, and the client that sends them.

A worker tells the master it is ready with `READY=1` (optionally with a
`STATUS=` line) on the datagram socket named in $NOTIFY_SOCKET; a prefork
template announces each worker it forked with `SPAWNED=<slot>:<pid>` before
that worker can say anything (apps/template.py; core/prefork.py judges it).
The master speaks the same protocol to systemd (READY=1, RELOADING=1,
STOPPING=1), through the same `notify()`.

A message is newline-separated KEY=VALUE lines, UTF-8. The master receives
with SO_PASSCRED, so the kernel, not the message, says who sent it
(system/notifysock.py). `@` at the start of an address stands for the abstract
namespace's leading NUL, as in systemd.
"""

from __future__ import annotations

import os
import socket

from upgraderd.contract.env import NOTIFY_SOCKET

READY = "READY"        # READY=1: the worker serves
STATUS = "STATUS"      # STATUS=<free text>
SPAWNED = "SPAWNED"    # SPAWNED=<slot>:<pid>, from a prefork template


def ready(status_text: str | None = None) -> str:
    """Return the READY=1 message, with a STATUS= line if `status_text` is given."""
    return f"{READY}=1" + (f"\n{STATUS}={status_text}" if status_text else "")


def status(text: str) -> str:
    """Return a STATUS= message."""
    return f"{STATUS}={text}"


def spawned(slot: int, pid: int) -> str:
    """Return the SPAWNED= message a template sends for the worker `pid` it forked into `slot`."""
    return f"{SPAWNED}={slot}:{pid}"


def notify(message: str, address: str | None = None) -> bool:
    """Send `message` to `address` (default $NOTIFY_SOCKET); return False if unset."""
    address = address if address is not None else os.environ.get(NOTIFY_SOCKET)
    if not address:
        return False
    target = "\0" + address[1:] if address.startswith("@") else address
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as s:
        s.connect(target)
        s.sendall(message.encode())
    return True
