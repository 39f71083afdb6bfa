"""Which app a worker runs: a built-in one, or a user's `package.module:factory`.

A `module:factory` app is forked from a template (apps/template.py), which
imports the module once per generation. The config checks the name's syntax
and that the module can be found where the template will look, without
importing it: importing runs a user's code in the master.
"""

from __future__ import annotations

import importlib.machinery
import importlib.util
import os
import re
import sys
from typing import Any, Mapping

from upgraderd.config.validators import Invalid, _did_you_mean, _show, string

BUILTIN_APPS = ("echo", "http")
_FACTORY = re.compile(r"[A-Za-z_]\w*(\.[A-Za-z_]\w*)*:[A-Za-z_]\w*")
WEB_KINDS = ("asgi", "wsgi")  # `asgi:package.module:app`: served by upgraderd's HTTP server (apps/asgi/)


def boolean(v: Any) -> bool:
    """true | false"""
    if not isinstance(v, bool):
        raise Invalid(f"expected true or false, got {_show(v)}")
    return v


def app_name(v: Any) -> str:
    """echo | http | package.module:factory | asgi:package.module:app | wsgi:package.module:app"""
    s = string(v)
    kind, _, rest = s.partition(":")
    if kind in WEB_KINDS:
        if _FACTORY.fullmatch(rest):
            return s
        raise Invalid(f"{_show(v)} is not `{kind}:package.module:app` (dotted Python names, then the app's name)")
    if s in BUILTIN_APPS or _FACTORY.fullmatch(s):
        return s
    if ":" in s:
        raise Invalid(f"{_show(v)} is not `package.module:factory` (dotted Python names, one colon)")
    raise Invalid(f"{_show(v)} is not one of {', '.join(BUILTIN_APPS)}{_did_you_mean(s, BUILTIN_APPS)}"
                  " or `package.module:factory`")


_MODULE = re.compile(r"[A-Za-z_]\w*(\.[A-Za-z_]\w*)*")


def module_list(v: Any) -> tuple[str, ...]:
    """a list of dotted module names (e.g. [fastapi, pydantic])"""
    if not isinstance(v, list):
        raise Invalid(f"expected a list of module names, got {_show(v)}")
    for i, name in enumerate(v):
        if not isinstance(name, str) or not _MODULE.fullmatch(name):
            raise Invalid(f"item {i}: {_show(name)} is not a dotted Python module name")
    return tuple(v)


def app_module(app: str) -> str:
    """Return the module an app spec imports: `pkg.mod` of `pkg.mod:f` and of `asgi:pkg.mod:app`."""
    kind, _, rest = app.partition(":")
    return rest.partition(":")[0] if kind in WEB_KINDS else kind


def module_problem(module: str, cwd: str | None, env: Mapping[str, str]) -> str | None:
    """Say why `module` cannot be found where the template will look, without importing it."""
    cwd = cwd or os.getcwd()
    extra = env.get("PYTHONPATH", os.environ.get("PYTHONPATH", ""))
    path: list[str] | None = [cwd, *filter(None, extra.split(os.pathsep)), *sys.path[1:]]
    parts = module.split(".")
    for i, part in enumerate(parts):
        # PathFinder looks in `path` only: no parent package's __init__ runs.
        spec = importlib.machinery.PathFinder.find_spec(part, path)
        if spec is None and i == 0:
            spec = importlib.util.find_spec(part) if part in sys.builtin_module_names else None
        if spec is None:
            return f"module {'.'.join(parts[:i + 1])!r} not found (searched {cwd} and sys.path)"
        path = list(spec.submodule_search_locations or [])
        if i < len(parts) - 1 and not path:
            return f"{'.'.join(parts[:i + 1])!r} is a module, not a package"
    return None
