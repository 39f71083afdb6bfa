"""Benchmark: how long a file change takes to become the ACTIVE generation, beside a HUP.

For each debounce, one daemon (2 built-in HTTP workers) is reloaded `--repeats`
times by each of: a HUP (the reference), an editor's rename over the config,
kubelet's `..data` swap of a ConfigMap-style mount, and a deploy tool's switch of
a watched `current` symlink. Each is timed from just before the change to the
status file showing the new generation ACTIVE; the table shows medians, and
each way's ratio to the HUP median of the same run. It also reports the
master's CPU time while idle for a few seconds with the watch on, which stays
near zero because nothing polls while inotify works.

    .venv/bin/python -m bench.watch [--repeats 5] [--idle 5]
"""

from __future__ import annotations

import argparse
import os
import signal
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import yaml

from tests.support import kubelet
from tests.support.upgraderd_proc import Daemon, echo_config, free_port, wait_until


def config(port: int, watch: list[str], debounce: float, edit: int) -> dict[str, Any]:
    cfg = echo_config(port, count=2, reload={"watch": watch, "debounce": f"{int(debounce * 1000)}ms"})
    cfg["workers"] = {"count": 2, "app": "http", "env": {"EDIT": str(edit)}}
    return cfg


def active(d: Daemon) -> int:
    st = d.status()
    if st is None or any(g["state"] == "STARTING" for g in st["generations"]):
        return 0
    return max((g["number"] for g in st["generations"] if g["state"] == "ACTIVE"), default=0)


def timed(d: Daemon, change: Callable[[], None]) -> float:
    """Return the seconds from `change()` to the next generation being ACTIVE."""
    want = active(d) + 1
    t0 = time.monotonic()
    change()
    wait_until(lambda: active(d) >= want, 30, f"generation {want} ACTIVE", interval=0.005)
    return time.monotonic() - t0


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def run(debounce: float, repeats: int, idle: float) -> dict[str, float]:
    with tempfile.TemporaryDirectory() as tmp:
        root, port = Path(tmp), free_port()
        (root / "app" / "r0").mkdir(parents=True)
        (root / "app" / "current").symlink_to("r0")
        mount = root / "cm"
        edit = 0

        def cfg_text() -> str:
            return yaml.safe_dump(config(port, ["config", str(root / "app" / "current")], debounce, edit))

        kubelet.project(mount, {"upgraderd.yaml": cfg_text()}, "0")
        d = Daemon(root, cfg_text())
        d.config_path = mount / "upgraderd.yaml"
        out: dict[str, list[float]] = {"hup": [], "editor": [], "configmap": [], "current": []}
        with d.start():
            for i in range(repeats):
                out["hup"].append(timed(d, lambda: os.kill(d.pid, signal.SIGHUP)))
                edit += 1
                out["configmap"].append(timed(d, lambda: kubelet.project(mount, {"upgraderd.yaml": cfg_text()},
                                                                          f"{edit}")))
                (root / "app" / f"r{i + 1}").mkdir()
                out["current"].append(timed(d, lambda: _switch(root / "app", f"r{i + 1}")))
                edit += 1
                out["editor"].append(timed(d, lambda: _rename_over(mount / "upgraderd.yaml", cfg_text())))
            before = cpu_seconds(d.pid)
            time.sleep(idle)   # the idle period being measured
            idle_cpu = cpu_seconds(d.pid) - before
    med = {k: statistics.median(v) for k, v in out.items()}
    return {**med, **{f"{k}/hup": med[k] / med["hup"] for k in ("editor", "configmap", "current")},
            "idle_cpu": idle_cpu}


def _switch(app: Path, release: str) -> None:
    os.symlink(release, app / "current.tmp")
    os.rename(app / "current.tmp", app / "current")


def _rename_over(path: Path, text: str) -> None:
    # The mount's file is a symlink into ..data: an editor replaces what it resolves to.
    real = Path(os.path.realpath(path))
    tmp = real.with_name(".swp")
    tmp.write_text(text)
    os.rename(tmp, real)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--idle", type=float, default=5.0)
    args = ap.parse_args()
    print(f"medians of {args.repeats} reloads each; seconds from the change to the new generation ACTIVE")
    print("| debounce | HUP | editor rename | ConfigMap ..data swap | current switch | editor/HUP "
          "| ConfigMap/HUP | current/HUP | master CPU idle |")
    print("|---|---|---|---|---|---|---|---|---|")
    for debounce in (0.1, 0.5):
        r = run(debounce, args.repeats, args.idle)
        print(f"| {debounce * 1000:.0f} ms | {r['hup']:.3f} | {r['editor']:.3f} | {r['configmap']:.3f} | "
              f"{r['current']:.3f} | {r['editor/hup']:.2f} | {r['configmap/hup']:.2f} | {r['current/hup']:.2f} "
              f"| {r['idle_cpu']:.2f}s in {args.idle:g}s |")


if __name__ == "__main__":
    main()
