"""Reproduce kubelet's update of a mounted ConfigMap: the file itself is never written.

kubelet's atomic writer keeps the data in a timestamped directory `..<stamp>`,
points the symlink `..data` at it, and each key is a symlink `KEY -> ..data/KEY`.
An update writes a new timestamped directory, makes `..data_tmp` point at it,
renames `..data_tmp` over `..data` (the one atomic step), then removes the old
directory.
"""

from __future__ import annotations

import os
from pathlib import Path


def project(mount: Path, data: dict[str, str], stamp: str) -> None:
    """Create or update the ConfigMap volume at `mount` with `data` (key -> text)."""
    mount.mkdir(parents=True, exist_ok=True)
    new = mount / f"..{stamp}"
    new.mkdir()
    for key, text in data.items():
        (new / key).write_text(text)
    old = os.readlink(mount / "..data") if (mount / "..data").is_symlink() else None
    os.symlink(new.name, mount / "..data_tmp")
    os.rename(mount / "..data_tmp", mount / "..data")
    for key in data:
        if not (mount / key).is_symlink():
            os.symlink(f"..data/{key}", mount / key)
    if old is not None:
        for f in (mount / old).iterdir():
            f.unlink()
        (mount / old).rmdir()
