"""Reload a running daemon again and again under HTTP load, and account for every answer.

Used by the zero-drop tests of the real servers (tests/e2e/test_servers.py) and by
the worker-bind scenario that runs inside its own network namespace. Each reload
is a HUP, then a wait for the new generation to be ACTIVE and the old one to be
RETIRED; then more answers are collected, to requests started after that, and
every one of those must come from the new generation (the example apps start
their answer with `generation=N `).
"""

from __future__ import annotations

import re
import signal
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from tests.support import ROOT
from tests.support.loadgen import Load, Result
from tests.support.upgraderd_proc import Daemon, wait_until

EXAMPLES = ROOT / "config" / "examples"


def example_config(name: str, port: int, **args: str) -> dict[str, object]:
    """Return config/examples/NAME.yaml with its first listener moved to `port`.

    Each keyword replaces the value after `--KEY` in the worker command, e.g.
    `loop="asyncio"` for the uvicorn example.
    """
    cfg = yaml.safe_load((EXAMPLES / f"{name}.yaml").read_text())
    cfg["listeners"][0]["port"] = port
    if "metrics" in cfg:
        cfg["metrics"] = {"listen": None}
    command = cfg["workers"]["command"]
    for key, value in args.items():
        flag = "--" + key.replace("_", "-")
        if flag not in command:
            raise ValueError(f"{name}.yaml: the worker command has no {flag}: {command}")
        command[command.index(flag) + 1] = value
    return cfg


@dataclass
class Report:
    """What a run of reloads saw."""

    result: Result
    generations: list[int] = field(default_factory=list)
    stale: dict[int, Counter[str]] = field(default_factory=dict)
    fresh: dict[int, int] = field(default_factory=dict)


def reload_under_load(d: Daemon, port: int, reloads: int = 20, threads: int = 4,
                      answers_after: int = 20, timeout: float = 60.0, load: Load | None = None) -> Report:
    """HUP `d` `reloads` times under HTTP load; return the report.

    The load is connection-per-request with `threads` threads unless `load` (not
    yet started) is given, e.g. a keepalive.KeepAliveLoad.
    """
    if load is None:
        load = Load("127.0.0.1", port, threads=threads, max_seconds=reloads * timeout)
    load.start("http")
    report = Report(load.result)
    try:
        if not load.wait_for_ok(answers_after, timeout):
            raise AssertionError(f"no answers before the first reload: {load.result.outcomes}")
        gen = _newest_active(d)
        for _ in range(reloads):
            d.send(signal.SIGHUP)
            gen += 1
            d.wait_log(rf"reload done: generation {gen} ACTIVE", timeout=timeout)
            d.wait_log(rf"generation {gen - 1} DRAINING -> RETIRED", timeout=timeout)
            # Requests that start from now on can only reach generation `gen`; answers
            # still in flight from before may come from the old one, and do not count.
            mark = load.mark()
            wait_until(lambda: sum(load.answers_since(mark).values()) >= answers_after,
                       timeout, f"{answers_after} answers after reload to generation {gen}")
            new = load.answers_since(mark)
            report.generations.append(gen)
            report.fresh[gen] = sum(n for b, n in new.items() if b.startswith(f"generation={gen} "))
            report.stale[gen] = Counter({b: n for b, n in new.items()
                                         if not b.startswith(f"generation={gen} ")})
    finally:
        load.stop()
    return report


def _newest_active(d: Daemon) -> int:
    found = [int(n) for n in re.findall(r"generation (\d+) STARTING -> ACTIVE", d.log())]
    if not found:
        raise AssertionError("no ACTIVE generation yet")
    return max(found)


def start_example(tmp: Path, name: str, port: int, **args: str) -> Daemon:
    """Start the daemon on config/examples/NAME.yaml, moved to `port` (see example_config)."""
    return Daemon(tmp, example_config(name, port, **args)).start()
