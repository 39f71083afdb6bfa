"""Benchmark: how long one config load blocks the master's loop, at the size cap.

The master parses its config inside its loop on every reload, so the parse time
of the largest file it accepts (schema.MAX_BYTES) is the longest a reload can
stall it. Three files of that size: a dense one (one env entry per line), a
comment, and a long list of listeners. Each is parsed `--repeats` times with
libyaml (what the loader uses when PyYAML has it) and with the pure-Python
parser; the table shows medians and their ratio, taken in the same run.

    .venv/bin/python -m bench.config_parse [--repeats 5]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Callable

import yaml  # noqa: E402

from upgraderd.config import schema  # noqa: E402
from upgraderd.errors import ConfigError  # noqa: E402

HEAD = "listeners:\n  - {name: web, port: 8080}\nworkers:\n  app: echo\n"


def fill(prefix: str, line: str) -> str:
    """Return `prefix` plus as many numbered `line`s as fit in MAX_BYTES."""
    n = (schema.MAX_BYTES - len(prefix)) // len(line % 0)
    return prefix + "".join(line % i for i in range(n))


FILES = {
    "dense env (1 MiB)": fill(HEAD + "  env:\n", "    V%06d: abcdefghij\n"),
    "comment (1 MiB)": HEAD + "#" + "x" * (schema.MAX_BYTES - len(HEAD) - 2) + "\n",
    "listeners (1 MiB)": fill("workers: {app: echo}\nlisteners:\n", "  - {name: l%06d, port: 1}\n"),
}


def median_time(fn: Callable[[], Any], repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        try:
            fn()
        except ConfigError:
            pass  # the listeners file is invalid (duplicate addresses): still fully parsed
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()
    print(f"libyaml: {getattr(yaml, '__with_libyaml__', False)}; MAX_BYTES {schema.MAX_BYTES}")
    print(f"{'file':<20} {'load (libyaml)':>15} {'compose, Python':>16} {'ratio':>6}")
    for name, text in FILES.items():
        fast = median_time(lambda: schema.parse(text, "bench.yaml"), args.repeats)
        slow = median_time(lambda: yaml.compose(text, Loader=yaml.SafeLoader), args.repeats)
        print(f"{name:<20} {fast:>14.3f}s {slow:>15.3f}s {slow / fast:>5.1f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
