"""The validator of `reload.watch`: which paths a file change reloads for.

Kept beside schema.py (which declares `ReloadSpec`) so that the reload section
is one self-contained addition to the config.
"""

from __future__ import annotations

import os
from typing import Any

from upgraderd.config.validators import Invalid, _show


def watch_paths(v: Any) -> tuple[str, ...]:
    """list of paths: `config` (this file) or absolute paths"""
    if not isinstance(v, list):
        raise Invalid(f"expected a list of paths, got {_show(v)}")
    out: list[str] = []
    for i, item in enumerate(v):
        if not isinstance(item, str) or not item or "\0" in item:
            raise Invalid(f"item {i}: expected `config` or an absolute path, got {_show(item)}")
        if item != "config" and not os.path.isabs(item):
            raise Invalid(f"item {i}: {_show(item)} is not an absolute path; write `config` or /a/path")
        path = item if item == "config" else os.path.normpath(item)
        if path in out:
            raise Invalid(f"item {i}: {_show(item)} is listed twice")
        out.append(path)
    return tuple(out)

