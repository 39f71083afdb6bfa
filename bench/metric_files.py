"""Benchmark: what a corrupt worker metric file costs the master (fold and scrape), and the writer's cost.

For each corruption class of tests/unit/test_metric_files_untrusted.py, and for
a clean file as the baseline, each repeat builds a fresh directory with one
damaged file (next to one good worker's file) and times, in wall-clock
milliseconds, the first collection (which reads, rejects and sets the file
aside) and a fold of the damaged pid. The table shows medians over repeats
and the ratio to the clean file, taken in the same run.

    .venv/bin/python -m bench.metric_files [--repeats 9]

`--writer` times instead the workers' writer (apps/metricfile.py): the cost
of one `MetricFile.add()` to a series that exists (what every flush does),
over the 12 series of a built-in worker's listener, for this tree's layout
and for the writer of an older commit (`--old-rev`, by default the last one
that wrote prometheus-client's mmap_dict layout), loaded from git in the
same process; medians over repeats, the ratio taken within each repeat.

    .venv/bin/python -m bench.metric_files --writer [--repeats 9] [--updates 200000]

`--reader` times the master's reader (metrics/dbfile.py `parse`) the same
way, old against new, on the same 1,000 series in each layout: with a cold
key cache (a file seen for the first time) and a warm one (a later scrape).

    .venv/bin/python -m bench.metric_files --reader [--repeats 9]
"""

from __future__ import annotations

import argparse
import logging
import os
import statistics
import subprocess
import sys
import tempfile
import time
import types
from pathlib import Path

from tests.unit import test_metric_files_untrusted as cases  # noqa: E402
from upgraderd.metrics.multiproc import WorkerFiles  # noqa: E402

GOOD = [(cases.KEY, 5.0)]
BAD = [(cases.KEY, 7.0), (cases.KEY.replace("web", "other"), 1.0)]


def too_many_entries(p: Path) -> None:
    """The worst case for time: the most entries a file may hold, plus one, each a distinct key."""
    p.unlink()
    cases.write_db(p, [(cases.KEY.replace("web", f"l{i}"), 1.0) for i in range(cases.dbfile.MAX_ENTRIES + 1)])


def once(prefix: str, damage: object, action: str) -> float:
    with tempfile.TemporaryDirectory() as tmp:
        d = Path(tmp) / "mp"
        files = WorkerFiles(str(d))
        cases.write_db(d / "counter_1.db", GOOD)
        bad = d / f"{prefix}_{cases.BAD_PID}.db"
        cases.write_db(bad, BAD)
        if callable(damage):
            damage(bad)
        t0 = time.perf_counter()
        if action == "collect":
            list(files.collect())
        else:
            files.fold(cases.BAD_PID)
        took = time.perf_counter() - t0
        files.close()
        return took * 1000


def old_module(path: str, rev: str | None) -> tuple[str, types.ModuleType]:
    """Return (commit, module) of `path` as of `rev`, or of the last commit with the mmap_dict layout."""
    revs = [rev] if rev else subprocess.run(["git", "log", "--format=%H", "--", path], capture_output=True,
                                            text=True, check=True).stdout.split()
    for commit in revs:
        source = subprocess.run(["git", "show", f"{commit}:{path}"], capture_output=True, text=True,
                                check=True).stdout
        if rev or "metricformat" not in source:
            module = types.ModuleType(f"old_{Path(path).stem}")
            sys.modules[module.__name__] = module   # dataclasses look their module up
            exec(compile(source, f"{commit[:7]}:{path}", "exec"), module.__dict__)
            return commit[:7], module
    raise SystemExit(f"no commit with the old {path} found")


def time_writer(module: types.ModuleType, updates: int) -> float:
    """Return the ns per `add()` to existing series, over the 12 series of one listener."""
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "counter_1.db")
        with open(path, "wb") as f:
            f.truncate(1 << 16)
        mf = module.MetricFile(path)
        keys = [module.key(f"upgraderd_metric_{i}", f"upgraderd_metric_{i}_total", {"listener": "web"},
                           "help " * 10) for i in range(12)]
        for k in keys:
            mf.add(k, 0)
        add = mf.add
        t0 = time.perf_counter()
        for i in range(updates // 12):
            for k in keys:
                add(k, 1)
        took = time.perf_counter() - t0
        mf.map.close()
        os.close(mf.fd)
        return took / (updates // 12 * 12) * 1e9


def writer_main(repeats: int, updates: int, rev: str | None) -> int:
    from upgraderd.apps import metricfile as new
    commit, old = old_module("upgraderd/apps/metricfile.py", rev)
    rows: dict[str, list[float]] = {"old": [], "new": []}
    for _ in range(repeats):
        rows["old"].append(time_writer(old, updates))
        rows["new"].append(time_writer(new, updates))
    ratio = statistics.median(n / o for n, o in zip(rows["new"], rows["old"]))
    print(f"median of {repeats} repeats, {updates} add() calls each, ns per call; ratio within each repeat\n")
    print("| writer | ns per add() |")
    print("|---|---:|")
    print(f"| old ({commit}, prometheus-client mmap_dict layout) | {statistics.median(rows['old']):.0f} |")
    print(f"| new (contract/metricformat.py layout) | {statistics.median(rows['new']):.0f} |")
    print(f"\nnew / old: {ratio:.2f}")
    return 0


def reader_main(repeats: int, rev: str | None) -> int:
    import json
    import struct
    from upgraderd.contract import metricformat
    from upgraderd.metrics import dbfile as new
    commit, old = old_module("upgraderd/metrics/dbfile.py", rev)
    keys = [json.dumps(["upgraderd_c", "upgraderd_c_total", {"listener": f"l{i}"}, "h" * 40]) for i in range(1000)]
    body = b""
    for k in keys:   # prometheus-client's layout, as the old reader expects it
        raw = k.encode()
        body += struct.pack("i", len(raw)) + raw + b" " * (8 - (len(raw) + 4) % 8) + struct.pack("dd", 1.0, 0.0)
    old_bytes = struct.pack("ii", 8 + len(body), 0) + body
    body = b"".join(metricformat.entry(k, 1.0) for k in keys)
    new_bytes = metricformat.header(8 + len(body)) + body
    print(f"median of {repeats} repeats, ms per parse of {len(keys)} entries; ratio within each repeat\n")
    print("| key cache | old (" + commit + ") ms | new ms | new / old |")
    print("|---|---:|---:|---:|")
    for label, warm in (("cold", False), ("warm", True)):
        caches: dict[str, dict[bytes, object]] = {"old": {}, "new": {}}
        rows: dict[str, list[float]] = {"old": [], "new": []}
        for _ in range(repeats):
            for name, module, data in (("old", old, old_bytes), ("new", new, new_bytes)):
                cache = caches[name] if warm else {}
                t0 = time.perf_counter()
                module.parse(data, "counter", cache, 10.0)   # a loaded machine must not hit the 50 ms budget
                rows[name].append((time.perf_counter() - t0) * 1000)
        ratio = statistics.median(n / o for n, o in zip(rows["new"], rows["old"]))
        print(f"| {label} | {statistics.median(rows['old']):.3f} | {statistics.median(rows['new']):.3f} | "
              f"{ratio:.2f} |")
    return 0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=9)
    ap.add_argument("--writer", action="store_true", help="time the workers' writer, old layout vs new")
    ap.add_argument("--reader", action="store_true", help="time the master's reader, old layout vs new")
    ap.add_argument("--updates", type=int, default=200_000)
    ap.add_argument("--old-rev", default=None, help="the commit whose writer is 'old'")
    args = ap.parse_args()
    if args.writer:
        return writer_main(args.repeats, args.updates, args.old_rev)
    if args.reader:
        return reader_main(args.repeats, args.old_rev)
    logging.getLogger("upgraderd").setLevel(logging.ERROR)  # one warning per rejected file, hundreds here
    rows = [("counter", None, "clean")] + [(p, f, f.__name__) for p, f, _ in cases.CASES]
    rows.append(("counter", too_many_entries, "too_many_entries"))
    base: dict[str, list[float]] = {}
    print(f"median of {args.repeats} repeats, wall ms; ratio to the clean file in the same run\n")
    print("| file | collect (ms) | fold (ms) | collect / clean | fold / clean |")
    print("|---|---:|---:|---:|---:|")
    for prefix, damage, name in rows:
        col = [once(prefix, damage, "collect") for _ in range(args.repeats)]
        fold = [once(prefix, damage, "fold") for _ in range(args.repeats)]
        if damage is None:
            base = {"collect": col, "fold": fold}
        rc = statistics.median(c / b for c, b in zip(col, base["collect"]))
        rf = statistics.median(f / b for f, b in zip(fold, base["fold"]))
        print(f"| {name} | {statistics.median(col):.3f} | {statistics.median(fold):.3f} | {rc:.2f} | {rf:.2f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
