"""Read a config file and compose its YAML, within bounds that hold for hostile files.

The master reads its config inside its loop on every reload, and any local
user who can write the file (or a deploy tool gone wrong) chooses its
contents. So, before anything is validated:

- the file is at most MAX_BYTES, checked before it is read (a stat, then a
  bounded read, as it may grow in between), and it must be a regular file:
  a FIFO would block the reader forever;
- it is composed by libyaml when PyYAML has it, several times faster than the
  pure-Python parser (bench/config_parse.py);
- its aliases may expand the document to at most MAX_VALUES values, and may
  not refer to a value that contains them: the loader constructs values
  from the node tree, and a "billion laughs" would otherwise be built in full.

Every problem is a ConfigError naming the file and, where there is one, the
line and column.
"""

from __future__ import annotations

import os
import stat
from typing import Any

import yaml

from upgraderd.config.validators import _show
from upgraderd.errors import ConfigError

# A real config is a few kilobytes. Parsing runs in the master's loop on every
# reload, so a huge file must fail before it is parsed.
MAX_BYTES = 1024 * 1024
# Values in the document once every alias is expanded. A few hundred is usual;
# aliases nested a few levels deep (a "billion laughs") reach billions.
MAX_VALUES = 100_000


def read_text(path: str) -> str:
    """Return the text of the config file at `path`; raise a located ConfigError."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except FileNotFoundError:
        raise ConfigError([f"{path}: no such file"]) from None
    except OSError as e:
        raise ConfigError([f"{path}: cannot read: {e.strerror}"]) from None
    try:
        raw = _read_bounded(fd, path)
    except OSError as e:
        raise ConfigError([f"{path}: cannot read: {e.strerror}"]) from None
    finally:
        os.close(fd)
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        line, col = _line_col(raw, e.start)
        raise ConfigError([f"{path}:{line}:{col}: cannot read: not UTF-8 text "
                           f"(byte {raw[e.start]:#04x})"]) from None


def _read_bounded(fd: int, path: str) -> bytes:
    st = os.fstat(fd)  # of what was opened, not of what the name points at now
    if stat.S_ISDIR(st.st_mode):
        raise ConfigError([f"{path}: is a directory, not a config file"])
    if not stat.S_ISREG(st.st_mode):
        raise ConfigError([f"{path}: is not a regular file"])
    if st.st_size > MAX_BYTES:
        raise ConfigError([too_big(path, st.st_size, "bytes")])
    chunks: list[bytes] = []
    size = 0
    while size <= MAX_BYTES and (chunk := os.read(fd, MAX_BYTES + 1 - size)):
        chunks.append(chunk)
        size += len(chunk)
    if size > MAX_BYTES:
        raise ConfigError([too_big(path, size, "bytes or more")])  # it grew since the stat
    return b"".join(chunks)


# PyYAML's pure-Python parser takes seconds on a dense file near MAX_BYTES, in the
# master's loop; libyaml takes a fifth of that. libyaml's error messages say less
# ("did not find expected ','" without what it found), so a small file that fails
# is parsed again in Python for the message.
_FAST = yaml.CSafeLoader if getattr(yaml, "__with_libyaml__", False) else yaml.SafeLoader
_RETRY_BELOW = 64 * 1024


def compose(text: str, path: str) -> yaml.Node | None:
    """Return the YAML node tree of `text`; raise a located ConfigError if it is not YAML."""
    try:
        return _compose_with(text, path, _FAST)
    except ConfigError:
        if _FAST is yaml.SafeLoader or len(text) > _RETRY_BELOW:
            raise
    return _compose_with(text, path, yaml.SafeLoader)


def _compose_with(text: str, path: str, loader: Any) -> yaml.Node | None:
    try:
        return yaml.compose(text, Loader=loader)
    except yaml.MarkedYAMLError as e:
        mark = e.problem_mark or e.context_mark
        where = f"{path}:{mark.line + 1}:{mark.column + 1}" if mark else path
        msg = e.problem or e.context or "invalid YAML"
        if e.context and e.problem and e.context_mark:
            msg += f" ({e.context} at {e.context_mark.line + 1}:{e.context_mark.column + 1})"
        raise ConfigError([f"{where}: YAML syntax error: {msg}"]) from None
    except yaml.reader.ReaderError as e:
        line, col = _line_col(text, e.position)
        raise ConfigError([f"{path}:{line}:{col}: YAML syntax error: character "
                           f"{_show(chr(e.character) if isinstance(e.character, int) else e.character)} "
                           f"is not allowed: {e.reason}"]) from None
    except yaml.YAMLError as e:
        raise ConfigError([f"{path}: YAML syntax error: {e}"]) from None
    except RecursionError:
        raise ConfigError([f"{path}: YAML syntax error: nested too deeply"]) from None


def too_big(path: str, size: int, unit: str) -> str:
    return (f"{path}: the config is {size} {unit}; at most {MAX_BYTES} ({MAX_BYTES // 1024} KiB) "
            "are read")


def check_expansion(root: yaml.Node, path: str) -> None:
    """Raise a located ConfigError if aliases expand the document past MAX_VALUES or into a cycle."""
    sizes: dict[int, int] = {}
    on_path: set[int] = set()

    def size(node: yaml.Node) -> int:
        key = id(node)
        if key in sizes:
            return sizes[key]
        if key in on_path:
            raise _Located(node, "a YAML alias refers to a value that contains it")
        on_path.add(key)
        children: list[yaml.Node] = []
        if isinstance(node, yaml.SequenceNode):
            children = list(node.value)
        elif isinstance(node, yaml.MappingNode):
            children = [n for pair in node.value for n in pair]
        total = 1
        for child in children:
            total += size(child)
            if total > MAX_VALUES:
                raise _Located(node, f"YAML aliases expand this value past {MAX_VALUES} values "
                                     "(an alias bomb?); write the values out")
        on_path.discard(key)
        sizes[key] = total
        return total

    try:
        size(root)
    except _Located as e:
        mark = e.node.start_mark
        raise ConfigError([f"{path}:{mark.line + 1}:{mark.column + 1}: {e.message}"]) from None
    except RecursionError:
        raise ConfigError([f"{path}: YAML syntax error: nested too deeply"]) from None


class _Located(Exception):
    def __init__(self, node: yaml.Node, message: str) -> None:
        super().__init__(message)
        self.node, self.message = node, message


def _line_col(text: str | bytes, offset: int) -> tuple[int, int]:
    nl = "\n" if isinstance(text, str) else b"\n"
    line = text.count(nl, 0, offset) + 1  # type: ignore[arg-type]
    return line, offset - (text.rfind(nl, 0, offset) + 1) + 1  # type: ignore[arg-type]


