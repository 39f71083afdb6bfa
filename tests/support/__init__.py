"""Helpers shared by the tests and by `bench/`; none of them is a test.

- `upgraderd_proc`: start the real master as a subprocess (`Daemon`), watch its
  log, children and status file; `free_port`, `wait_until`, `alive`, `children`.
- `loadgen`: a bounded load client that puts every round trip in one outcome bucket.
- `reloads`: run a `config/examples/` config and reload it under HTTP load.
- `scrape`: fetch and parse `/metrics`. `promql`: the metric names a PromQL
  expression selects. `promtools`: find (or install) prometheus and promtool.
- `mpworkers`: short-lived processes that write real multiprocess metric files.
- `fakes`: the fake clock, processes and notify socket of the unit tests.
- `netns_scenario`, `scenarios/`: whole runs that a test starts in a child
  process, e.g. inside a network namespace it creates (`python -m tests.support...`).

Importing the package itself loads only pathlib: child processes such as the
`mpworkers` factory import it before anything else.
"""

from __future__ import annotations

from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
"""The repository's top directory (tests/support/ is two levels down)."""
