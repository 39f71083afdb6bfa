"""Generate the configuration reference (docs/configuration.md) from config/schema.py's options.

Every option is declared once, with `opt(default, validator, doc)`; this module
only reads those declarations, so the reference cannot drift from the code. A
test compares the checked-in document with `render()` and fails when they
differ. Regenerate it with `upgraderd docs -o docs/configuration.md`.

The output must not depend on the machine it runs on: defaults that are
computed at run time (the pidfile) are described in words, never evaluated.
"""

from __future__ import annotations

import dataclasses
import sys
from typing import Any

from upgraderd.config import schema as config
from upgraderd.config import validators

INTRO = """\
# Configuration reference

<!-- Generated from upgraderd/config/schema.py by `upgraderd docs -o docs/configuration.md`.
     Do not edit by hand: a test fails when this file and the code disagree. -->

upgraderd reads one YAML file (`upgraderd run -c FILE`). It is validated strictly
when the master starts and on every reload (SIGHUP or `upgraderd reload`); a file
that is invalid on reload changes nothing, and the running generation keeps serving.
`upgraderd check -c FILE` validates a file without touching a running master and
prints every problem, each as `file:line:column: key.path: message`.

- Unknown keys are errors, with a "did you mean" suggestion.
- Durations are written `500ms`, `30s`, `2m` or `1h`; a bare number means seconds. The
  longest is 8760h (a year).
- Strings may not hold a NUL byte or a lone surrogate (`"\\0"`, `"\\ud800"`): no argv,
  path or variable can carry them. A uid or gid is written in the ASCII digits 0-9.
- The file may be at most 1 MiB, and YAML aliases may expand it to at most 100,000
  values; both are checked before anything else.
- Relative paths are taken relative to the directory of the config file.
- Only `listeners` and one of `workers.app` / `workers.command` are required.

A minimal file:

```yaml
listeners:
  - name: web
    port: 8080
workers:
  app: http
```
"""


def render() -> str:
    """Return the whole reference document as Markdown."""
    parts = [INTRO, _table("Top level", "", config.Config)]
    for name, cls in config.SECTIONS.items():
        key = f"{name}[]" if name == "listeners" else name
        parts.append(_table(f"`{key}`", key, cls))
    return "\n".join(parts)


def _table(title: str, prefix: str, cls: type) -> str:
    doc = (cls.__doc__ or "").strip().splitlines()[0]
    lines = [f"## {title}", "", doc, "", "| key | type | default | description |",
             "|---|---|---|---|"]
    for f in dataclasses.fields(cls):
        if f.metadata.get("internal"):
            continue
        key = f"{prefix}.{f.name}" if prefix else f.name
        lines.append(f"| `{key}` | {_type(f)} | {_default(f)} | {f.metadata['doc']} |")
    return "\n".join(lines) + "\n"


def _type(f: dataclasses.Field[Any]) -> str:
    if f.name in config.SECTIONS:
        kind = "list" if f.name == "listeners" else "mapping"
        return f"{kind}, see [below](#{f.name})"
    check = f.metadata["check"]
    return (check.__doc__ or "").strip().splitlines()[0].replace("|", "\\|")


def _default(f: dataclasses.Field[Any]) -> str:
    if f.metadata.get("required"):
        return "required"
    if f.name in config.SECTIONS or f.name == "pidfile":
        return "see below" if f.name in config.SECTIONS else "see description"
    value: Any = f.default_factory() if callable(f.default_factory) else f.default
    if value is None:
        return "`null`"
    if f.metadata["check"] is validators.duration:
        return f"`{format_duration(value)}`"
    if isinstance(value, dict):
        return "`{}`"
    return f"`{value}`"


def format_duration(seconds: float) -> str:
    """Return `seconds` as the config writes it: 100ms, 30s, 2m."""
    if seconds < 1:
        return f"{seconds * 1000:g}ms"
    if seconds >= 60 and seconds % 60 == 0:
        return f"{seconds / 60:g}m"
    return f"{seconds:g}s"


def main(argv: list[str] | None = None) -> int:
    """Write the reference to the file named in argv (or stdout)."""
    args = sys.argv[1:] if argv is None else argv
    text = render()
    if args:
        with open(args[0], "w", encoding="utf-8") as out:
            out.write(text)
    else:
        sys.stdout.write(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
