"""Where `upgraderd` looks for its config when no `-c` is given, and `upgraderd init`.

Design note: an installed `upgraderd` must find a config without a flag, the
way nginx finds /etc/nginx/nginx.conf, and a developer running from a source
checkout must still get the checkout's `config/upgraderd.yaml`. The order:

1. `$UPGRADERD_CONFIG`, when set (containers, tests);
2. the checkout's `config/upgraderd.yaml`, only when the package itself is
   imported from a source checkout (its parent folder holds pyproject.toml);
3. /etc/upgraderd/upgraderd.yaml.

When none exists, the error lists every place looked at and names
`upgraderd init`, which writes the default config shipped in the package.
The wheel carries `config/` as `upgraderd/defaults/` (see pyproject.toml); a
checkout (or an editable install) reads `config/` itself.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

SYSTEM_PATH = "/etc/upgraderd/upgraderd.yaml"
ENV_VAR = "UPGRADERD_CONFIG"
_PACKAGE = Path(__file__).resolve().parent.parent


@dataclass(frozen=True)
class Lookup:
    """The config path chosen, or None, and every place that was looked at."""

    path: str | None
    looked: tuple[str, ...]

    def missing_message(self) -> str:
        """Return the one-line error for a lookup that found nothing."""
        return (f"no config file: looked at {', '.join(self.looked)}; write a starter config "
                f"with `upgraderd init` (it creates {SYSTEM_PATH}) or give one with -c FILE")


def checkout_root() -> Path | None:
    """Return the source checkout the package is imported from, or None when installed."""
    root = _PACKAGE.parent
    return root if (root / "pyproject.toml").is_file() and (root / "config").is_dir() else None


def shipped_dir() -> Path:
    """Return the folder of the shipped default and example configs."""
    inside = _PACKAGE / "defaults"
    if inside.is_dir():
        return inside
    root = checkout_root()
    if root is None:
        raise FileNotFoundError(f"{inside}: the shipped configs are missing from this install")
    return root / "config"


def find_config(environ: dict[str, str] | None = None) -> Lookup:
    """Return the default config path, in the order the module docstring gives."""
    env = os.environ if environ is None else environ
    candidates = []
    if env.get(ENV_VAR):
        candidates.append(env[ENV_VAR])
    root = checkout_root()
    if root is not None:
        candidates.append(str(root / "config" / "upgraderd.yaml"))
    candidates.append(SYSTEM_PATH)
    for path in candidates:
        if os.path.isfile(path):
            return Lookup(path, tuple(candidates))
    return Lookup(None, tuple(candidates))


def write_starter(path: str, force: bool = False) -> str:
    """Write the shipped default config to `path`; return it. Raises OSError.

    The file is created with O_EXCL (O_TRUNC with `force`) and O_NOFOLLOW, so
    a symlink planted at `path` is refused rather than followed.
    """
    text = (shipped_dir() / "upgraderd.yaml").read_text(encoding="utf-8")
    parent = os.path.dirname(os.path.abspath(path))
    os.makedirs(parent, mode=0o755, exist_ok=True)
    flags = os.O_WRONLY | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC
    flags |= os.O_TRUNC if force else os.O_EXCL
    fd = os.open(path, flags, 0o644)
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        f.write(text)
    return text
