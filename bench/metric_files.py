"""Benchmark: what a corrupt worker metric file costs the master (fold and scrape).

For each corruption class of tests/unit/test_metric_files_untrusted.py, and for
a clean file as the baseline, each repeat builds a fresh directory with one
damaged file (next to one good worker's file) and times, in wall-clock
milliseconds, the first collection (which reads, rejects and sets the file
aside) and a fold of the damaged pid. The table shows medians over repeats
and the ratio to the clean file, taken in the same run.

    .venv/bin/python -m bench.metric_files [--repeats 9]
"""

from __future__ import annotations

import argparse
import logging
import statistics
import sys
import tempfile
import time
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


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=9)
    args = ap.parse_args()
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
