"""A warm standby template's argument: what it imports ahead of the HUP (apps/preload.py).

The master (core/prefork.py) starts a standby as
`python -m upgraderd.apps.template --standby[=NAME,...]`: NAME is a module
to import now, `asgi`, upgraderd's ASGI server stack (for an `asgi:` or
`wsgi:` app), or `+recorded`, the modules the previous template recorded
(`workers.preload_recorded`). Module names are dotted Python names (config/appspec.py checks
`workers.preload`), so they never contain `,` or `=`.
"""

from __future__ import annotations

ASGI = "asgi"   # the token for upgraderd's ASGI server and the libraries it runs on
RECORDED = "+recorded"   # the token for what the previous template recorded (never a module name)


def arg(modules: list[str]) -> str:
    """Return the standby's argument for `modules` (`--standby` alone for none)."""
    return "--standby=" + ",".join(modules) if modules else "--standby"


def parse(argument: str) -> list[str]:
    """Return the modules of a standby's argument (`--standby` or `--standby=a,b`)."""
    _, _, names = argument.partition("=")
    return [n for n in names.split(",") if n]
