"""Unix-domain stream listeners in the config: `path` and the keys that go with it.

A listener is a TCP address (`host`, `port`) or a Unix socket file (`path`),
never both. A path listener is always `mode: shared` (the default for it):
the kernel has no SO_REUSEPORT groups for Unix sockets, so there is nothing
to split per slot, and a worker cannot bind the master's file next to it.
`owner`, `group` and `permissions` set the socket file's ownership and mode
bits (`mode` already names the sharing mode). Each problem is reported at
its own key's line, like every other check (checks.py).
"""

from __future__ import annotations

import dataclasses
import grp
import os
import pwd
import re
from typing import TYPE_CHECKING, Any

import yaml

from upgraderd.config.checks import Reporter, node_at
from upgraderd.config.validators import Invalid, _show, is_id, string

if TYPE_CHECKING:
    from upgraderd.config.schema import Config, ListenerSpec

# sun_path is 108 bytes, one of them the terminating NUL.
MAX_PATH_BYTES = 107
UNIX_ONLY = ("owner", "group", "permissions")


def socket_path(v: Any) -> str:
    """absolute path of a Unix socket file (at most 107 bytes)"""
    s = string(v)
    if not s.startswith("/"):
        raise Invalid(f"{_show(v)} is not an absolute path; write e.g. /run/upgraderd/app.sock")
    if s.endswith("/") or os.path.basename(os.path.normpath(s)) in ("", ".", ".."):
        raise Invalid(f"{_show(v)} names a directory; name the socket file in it")
    size = len(os.fsencode(s))
    if size > MAX_PATH_BYTES:
        raise Invalid(f"{_show(v)} is {size} bytes long; a Unix socket path holds at most "
                      f"{MAX_PATH_BYTES} (sun_path)")
    return os.path.normpath(s)


def permissions(v: Any) -> str:
    """octal file mode in quotes, e.g. "0660" """
    if isinstance(v, int) and not isinstance(v, bool):
        # YAML reads an unquoted 0660 as the number 432: say how to write it.
        raise Invalid(f"{v} is a number; write the permissions in quotes, e.g. \"0660\"")
    s = string(v)
    if not re.fullmatch(r"0?[0-7]{3}", s):
        raise Invalid(f"{_show(v)} is not an octal file mode like \"0660\" (three digits 0-7, "
                      "optionally after a 0; no setuid, setgid or sticky bit)")
    return s.zfill(4)


def with_default_mode(spec: ListenerSpec | None, node: yaml.Node) -> ListenerSpec | None:
    """Return `spec` with mode shared if it is a path listener whose YAML sets no mode."""
    if spec is None or spec.path is None or node_at(node, "mode") is not None:
        return spec
    return dataclasses.replace(spec, mode="shared")


def check_listeners(loader: Reporter, root: yaml.Node, cfg: Config) -> None:
    """Report, at its own key, each listener that mixes path and host/port or misses both."""
    for i, spec in enumerate(cfg.listeners):
        lnode = node_at(root, "listeners", i) or root
        key = f"listeners[{i}]"
        if spec.path is None:
            if spec.port is None:
                loader.fail(lnode, f"{key}.port", "is required (or give `path` for a Unix socket)")
            for k in UNIX_ONLY:
                if (knode := node_at(lnode, k)) is not None:
                    loader.fail(knode, f"{key}.{k}", f"only a Unix socket listener (with `path`) "
                                f"takes `{k}`")
            continue
        for k in ("host", "port"):
            if (knode := node_at(lnode, k)) is not None:
                loader.fail(knode, f"{key}.{k}", f"`path` and `host`/`port` are mutually exclusive: "
                            f"this listener is the Unix socket {spec.path}; remove `{k}` (or `path`)")
        if spec.mode != "shared":
            why = ("SO_REUSEPORT groups do not exist for Unix sockets" if spec.mode == "reuseport"
                   else "a worker cannot bind the master's socket file next to it")
            loader.fail(node_at(lnode, "mode") or lnode, f"{key}.mode",
                        f"mode {spec.mode} does not apply to a Unix socket ({why}); "
                        "use mode: shared (the default with `path`)")
        _check_ownership(loader, lnode, key, spec)


def _check_ownership(loader: Reporter, lnode: yaml.Node, key: str, spec: ListenerSpec) -> None:
    if os.geteuid() == 0:
        return
    if spec.owner is not None and _uid(spec.owner) != os.geteuid():
        loader.fail(node_at(lnode, "owner") or lnode, f"{key}.owner",
                    f"{spec.owner!r}: giving the socket file to another user needs a master "
                    "started as root")
    if spec.group is not None:
        gid = _gid(spec.group)
        if gid != os.getegid() and gid not in os.getgroups():
            loader.fail(node_at(lnode, "group") or lnode, f"{key}.group",
                        f"{spec.group!r}: the master is not a member of that group, so it cannot "
                        "give it the socket file (a master started as root can)")


def _uid(user: str) -> int:
    return int(user) if is_id(user) else pwd.getpwnam(user).pw_uid


def _gid(group: str) -> int:
    return int(group) if is_id(group) else grp.getgrnam(group).gr_gid


def ids(spec: ListenerSpec) -> tuple[int, int]:
    """Return the (uid, gid) to give `spec`'s socket file; -1 leaves one as it is."""
    uid = _uid(spec.owner) if spec.owner is not None else -1
    gid = _gid(spec.group) if spec.group is not None else -1
    return uid, gid
