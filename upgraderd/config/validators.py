"""Validators for config values, and `opt()`, which declares one option.

Each validator takes the value PyYAML constructed and returns the typed value,
or raises `Invalid` with a message that says what is allowed; the loader in
config.py adds the file, line, column and key path. A validator's docstring is
the type shown in docs/configuration.md.
"""

from __future__ import annotations

import difflib
import grp
import ipaddress
import math
import os
import pwd
import re
import reprlib
from dataclasses import field
from typing import Any, Callable

REQUIRED: Any = object()


class Invalid(Exception):
    """Raised by a validator; the loader adds the location and key path."""


Check = Callable[[Any], Any]


def opt(default: Any, check: Check, doc: str) -> Any:
    """Declare one config option: its default, its validator and its doc line."""
    meta = {"check": check, "doc": doc}
    if default is REQUIRED:
        return field(metadata={**meta, "required": True})
    if isinstance(default, (list, dict)):
        frozen = default
        return field(default_factory=lambda: type(frozen)(frozen), metadata=meta)
    return field(default=default, metadata=meta)


# -- validators: each takes the constructed YAML value and returns the typed one --

def integer(lo: int | None = None, hi: int | None = None) -> Check:
    def check(v: Any) -> int:
        if isinstance(v, bool) or not isinstance(v, int):
            raise Invalid(f"expected an integer, got {_show(v)}")
        if (lo is not None and v < lo) or (hi is not None and v > hi):
            raise Invalid(f"{v} is out of range; allowed: {_range(lo, hi)}")
        return v
    check.__doc__ = f"integer {_range(lo, hi)}"
    return check


def _range(lo: int | None, hi: int | None) -> str:
    if hi is None:
        return f">= {lo}"
    return f"{lo}..{hi}"


def string(v: Any) -> str:
    """string"""
    if not isinstance(v, str) or not v:
        raise Invalid(f"expected a non-empty string, got {_show(v)}")
    return text(v)


def text(s: str) -> str:
    """Return `s` if the OS can take it as a path, argument or variable; raise Invalid.

    YAML's escapes can write a NUL or a lone surrogate. Both pass every other
    check and then make exec, open or bind raise ValueError, far from here.
    """
    if "\0" in s:
        raise Invalid(f"{_show(s)} contains a NUL byte (\\0), which no path, argument, "
                      "variable or name can hold")
    try:
        # Strict UTF-8, not os.fsencode: a surrogate-escaped byte ('\\udc80') would
        # reach exec, but not a UTF-8 log file or terminal.
        s.encode("utf-8")
    except UnicodeEncodeError as e:
        raise Invalid(f"{_show(s)} contains {s[e.start]!r} (character {e.start + 1}), a lone "
                      "surrogate with no UTF-8 encoding; write the character itself, not a \\u "
                      "escape of half of it") from None
    return s


def name(v: Any) -> str:
    """name: letters, digits, '.', '_' or '-'"""
    s = string(v)
    if not re.fullmatch(r"[A-Za-z0-9._-]{1,64}", s):
        raise Invalid(f"{_show(v)} is not a valid name; use letters, digits, '.', '_', '-'")
    return s


def one_of(*choices: str) -> Check:
    """Return a check for one of the words `choices` (its `words` attribute names them).

    YAML 1.1 reads an unquoted off, on, yes or no as a boolean; the loader
    gives a key that takes words the word as written instead (see `words`).
    """
    def check(v: Any) -> str:
        if v not in choices:
            hint = _did_you_mean(str(v), choices)
            raise Invalid(f"{_show(v)} is not one of {', '.join(choices)}{hint}")
        return str(v)
    check.__doc__ = " | ".join(choices)
    setattr(check, "words", choices)
    return check


def words(check: Check) -> tuple[str, ...]:
    """Return the words a `one_of` check takes (() for any other check)."""
    found: tuple[str, ...] = getattr(check, "words", ())
    return found


def host(v: Any) -> str:
    """IPv4 or IPv6 address"""
    s = string(v)
    try:
        ipaddress.ip_address(s)
    except ValueError:
        raise Invalid(f"{_show(v)} is not an IPv4 or IPv6 address") from None
    # ipaddress takes any text after '%' as an IPv6 scope; bind() wants an interface name.
    _, pct, scope = s.partition("%")
    if pct and not re.fullmatch(r"[A-Za-z0-9_.-]{1,15}", scope):
        raise Invalid(f"{_show(v)}: {_show(scope)} is not an interface name (IPv6 scope)")
    return s


_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0}
# A year: longer than any drain, ready or back-off wait that makes sense, and
# small enough that deadlines computed from it stay exact floats.
MAX_DURATION = 365 * 24 * 3600.0


def duration(v: Any) -> float:
    """duration: 500ms, 30s, 2m, 1h (a bare number means seconds), at most 8760h"""
    if isinstance(v, bool) or not isinstance(v, (int, float, str)):
        raise Invalid(f"{_show(v)} is not a duration; write e.g. 500ms, 30s or 2m")
    if isinstance(v, int) and abs(v) > MAX_DURATION:
        # Decided on the int: float(v) raises OverflowError past 1e308.
        secs = MAX_DURATION * 2 if v > 0 else -1.0
    elif isinstance(v, (int, float)):
        secs = float(v)
    else:
        m = re.fullmatch(r"\s*([0-9]{1,30}(?:\.[0-9]{1,30})?)\s*(ms|s|m|h)\s*", v)
        if not m:
            raise Invalid(f"{_show(v)} is not a duration; write e.g. 500ms, 30s or 2m")
        secs = float(m.group(1)) * _UNITS[m.group(2)]
    if secs < 0 or not math.isfinite(secs):
        raise Invalid(f"{_show(v)} is not a duration >= 0; write e.g. 500ms, 30s or 2m")
    if secs > MAX_DURATION:
        raise Invalid(f"{_show(v)} is too long; allowed: 0 .. {MAX_DURATION:g}s (8760h, a year)")
    return secs


def grace(v: Any) -> float:
    """duration from 0 to 1h: how long an orphaned worker keeps serving (0: it drains at once)"""
    secs = duration(v)
    if secs > 3600:
        raise Invalid(f"{_show(v)} is longer than 1h; an orphan should not outlive its master for long")
    return secs


def signal_name(v: Any) -> str:
    """signal name: TERM, QUIT, INT, HUP, USR1, USR2, WINCH"""
    s = string(v).upper()
    s = s[3:] if s.startswith("SIG") else s
    if s not in _SIGNALS:
        hint = _did_you_mean(s, _SIGNALS)
        raise Invalid(f"{_show(v)} is not a signal name{hint}; allowed: {', '.join(_SIGNALS)}")
    return s


_SIGNALS = ("TERM", "QUIT", "INT", "HUP", "USR1", "USR2", "WINCH")


def argv(v: Any) -> tuple[str, ...]:
    """command: a list of strings (argv), or one string split on spaces"""
    if isinstance(v, str):
        parts = v.split()
    elif isinstance(v, list) and all(isinstance(p, (str, int, float)) for p in v):
        parts = [str(p) for p in v]
    else:
        raise Invalid(f"expected a list of strings, got {_show(v)}")
    if not parts:
        raise Invalid("the command is empty")
    for i, part in enumerate(parts):
        try:
            text(part)
        except Invalid as e:
            raise Invalid(f"argument {i}: {e}") from None
    return tuple(parts)


def env_map(v: Any) -> dict[str, str]:
    """mapping of environment variable names to strings"""
    if not isinstance(v, dict):
        raise Invalid(f"expected a mapping of NAME: value, got {_show(v)}")
    out = {}
    for k, val in v.items():
        if not isinstance(k, str) or not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", k):
            raise Invalid(f"{_show(k)} is not a valid environment variable name")
        if isinstance(val, (dict, list)) or val is None:
            raise Invalid(f"the value of {k} must be a string, got {_show(val)}")
        out[k] = str(val).lower() if isinstance(val, bool) else str(val)
        try:
            text(out[k])
        except Invalid as e:
            raise Invalid(f"the value of {k}: {e}") from None
    return out


def directory(v: Any) -> str:
    """path of an existing directory"""
    s = string(v)
    if not os.path.isdir(s):
        raise Invalid(f"{_show(v)} is not an existing directory")
    return s


def file_path(v: Any) -> str:
    """path of a file in an existing directory"""
    s = string(v)
    parent = os.path.dirname(s) or "."
    if not os.path.isdir(parent):
        raise Invalid(f"{_show(v)}: directory {parent!r} does not exist")
    if os.path.isdir(s):
        raise Invalid(f"{_show(v)} is a directory; name a file")
    return s


def dir_path(v: Any) -> str:
    """path of a directory (created if missing)"""
    s = string(v)
    if os.path.lexists(s) and not os.path.isdir(s):
        raise Invalid(f"{_show(v)} exists and is not a directory")
    return s


# Validators whose value is a path: a relative one is taken relative to the
# config file's directory, so the meaning of a config does not depend on the
# master's working directory (which is / in daemon mode).
PATH_CHECKS: tuple[Check, ...] = (directory, file_path)


def user_name(v: Any) -> str:
    """name (or uid) of an existing user"""
    s = _account(v, "user")
    try:
        pwd.getpwuid(int(s)) if is_id(s) else pwd.getpwnam(s)
    except (KeyError, OverflowError):
        raise Invalid(f"no such user: {_show(v)}") from None
    return s


def group_name(v: Any) -> str:
    """name (or gid) of an existing group"""
    s = _account(v, "group")
    try:
        grp.getgrgid(int(s)) if is_id(s) else grp.getgrnam(s)
    except (KeyError, OverflowError):
        raise Invalid(f"no such group: {_show(v)}") from None
    return s


def is_id(s: str) -> bool:
    """Return True if `s` is a numeric uid or gid: ASCII digits only."""
    # str.isdigit() is also true for '٣' and '²', which int() reads as 3 or rejects.
    return s.isascii() and s.isdigit()


def _account(v: Any, what: str) -> str:
    s = str(v) if isinstance(v, int) and not isinstance(v, bool) else string(v)
    if s.isdigit() and not is_id(s):
        raise Invalid(f"{_show(v)} is not a {what} name or an ASCII number; write the "
                      f"{'uid' if what == 'user' else 'gid'} in the digits 0-9")
    return s


def listen_address(v: Any) -> str | None:
    """host:port (IPv6 as [::1]:port), or null to disable"""
    if v is None:
        return None
    if isinstance(v, int) and not isinstance(v, bool):
        raise Invalid(f"{v} is not host:port; write e.g. 127.0.0.1:{v}")
    s = string(v)
    m = re.fullmatch(r"\[([0-9A-Fa-f:.]+)\]:([0-9]{1,5})|([0-9.]+|localhost):([0-9]{1,5})", s)
    if not m:
        raise Invalid(f"{_show(v)} is not host:port (write IPv6 as [::1]:9108)")
    hostpart = m.group(1) or m.group(3)
    port = int(m.group(2) or m.group(4))
    if hostpart != "localhost":
        host(hostpart)
    if not 1 <= port <= 65535:
        raise Invalid(f"port {port} is out of range; allowed: 1..65535")
    return s


def default_pidfile() -> str:
    """Return /run/upgraderd.pid for root, else a per-user runtime path."""
    if os.geteuid() == 0:
        return "/run/upgraderd.pid"
    runtime = os.environ.get("XDG_RUNTIME_DIR")
    return os.path.join(runtime, "upgraderd.pid") if runtime else f"/tmp/upgraderd-{os.geteuid()}.pid"


_REPR = reprlib.Repr()
_REPR.maxstring = _REPR.maxother = 60


def _show(v: Any) -> str:
    # reprlib bounds the work too: a YAML alias bomb builds a structure whose
    # full repr would be exponentially long.
    text = _REPR.repr(v)
    return text if len(text) <= 60 else text[:57] + "..."


def _did_you_mean(word: str, choices: Any) -> str:
    lowered = {str(c).lower(): str(c) for c in choices}
    close = difflib.get_close_matches(word.lower(), list(lowered), n=1, cutoff=0.6)
    return f" (did you mean {lowered[close[0]]!r}?)" if close else ""


def parse_url(url: str) -> tuple[str, int, str]:
    """Split an http:// readiness URL into (host, port, path); raise ValueError.

    The host must be an IP address or `localhost`: the master never resolves
    names, because a DNS lookup would block its loop.
    """
    m = re.fullmatch(r"http://(\[[0-9A-Fa-f:.]+\]|[^/:?#\[\]]+)(?::(\d+))?([/?][^#]*)?", url)
    if not m:
        raise ValueError(f"{url!r} is not an http://HOST[:PORT]/PATH URL (https is not supported)")
    host = m.group(1).strip("[]")
    host = "127.0.0.1" if host == "localhost" else host
    try:
        ipaddress.ip_address(host)
    except ValueError:
        raise ValueError(f"{url!r}: the host must be an IP address or localhost, "
                         f"not {host!r} (the master does not resolve names)") from None
    port = int(m.group(2) or 80)
    if not 1 <= port <= 65535:
        raise ValueError(f"{url!r}: port {port} is out of range")
    path = m.group(3) or "/"
    return host, port, path if path.startswith("/") else "/" + path


def worker_ids(user: str | None, group: str | None) -> tuple[int, int]:
    """Return the (uid, gid) workers of `user`/`group` run with (the master's own where None).

    Raises KeyError if the user or group does not exist. Numeric ids are
    ASCII digits only: '٣' is a name, not the number 3.
    """
    uid = _uid(user) if user is not None else os.geteuid()
    if group is not None:
        gid = int(group) if _ascii_digits(group) else grp.getgrnam(group).gr_gid
    else:
        gid = pwd.getpwuid(uid).pw_gid if user is not None else os.getegid()
    return uid, gid


def _uid(user: str) -> int:
    return int(user) if _ascii_digits(user) else pwd.getpwnam(user).pw_uid


def _ascii_digits(s: str) -> bool:
    return s.isascii() and s.isdigit()
