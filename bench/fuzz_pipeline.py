"""Fuzz the whole config pipeline: >= 10,000 accepted configs through check, start and reload.

The same property as tests/unit/test_pipeline_fuzz.py (see tests/unit/pipeline.py),
run in batches of fresh random examples until `--accepted` configs that
`check` accepted have been started or reloaded by a Master over the fake
process layer. A failure prints hypothesis's shrunk reproduction and exits 1.

    .venv/bin/python -m bench.fuzz_pipeline [--accepted 10000] [--batch 1000]
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import tempfile
import time
from pathlib import Path


from hypothesis import HealthCheck, given, seed, settings  # noqa: E402

from tests.unit.pipeline import Tally, run_sequence, sequences  # noqa: E402


def batch(tally: Tally, examples: int, batch_seed: int) -> None:
    """Run one hypothesis search of `examples` examples; raise on the first failure."""
    @seed(batch_seed)
    @settings(max_examples=examples, deadline=None, database=None,
              suppress_health_check=list(HealthCheck))
    @given(sequences())
    def prop(texts: list[str]) -> None:
        with tempfile.TemporaryDirectory() as d:
            run_sequence(Path(d), texts, tally)
    prop()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--accepted", type=int, default=10_000, help="stop after this many accepted configs")
    ap.add_argument("--batch", type=int, default=1000, help="examples per hypothesis run")
    ap.add_argument("--seed", type=int, default=int.from_bytes(os.urandom(4), "big"))
    args = ap.parse_args()
    os.environ.pop("NOTIFY_SOCKET", None)  # the master must not notify a real systemd
    logging.getLogger("upgraderd").setLevel(logging.CRITICAL)
    tally = Tally()
    t0, runs = time.monotonic(), 0
    while tally.accepted < args.accepted:
        try:
            batch(tally, args.batch, args.seed + runs)
        except Exception as e:  # hypothesis has printed the shrunk example
            print(f"FAILED in batch {runs} (seed {args.seed + runs}): {type(e).__name__}: {e}")
            return 1
        runs += 1
        print(f"batch {runs}: {tally.accepted} accepted, {tally.rejected} rejected, "
              f"reloads {dict(sorted(tally.outcomes.items()))}, {time.monotonic() - t0:.0f}s", flush=True)
    print(f"\n{tally.accepted} accepted configs applied, {tally.rejected} rejected by check, "
          f"{runs * args.batch} sequences, {time.monotonic() - t0:.0f}s (seed {args.seed})")
    print("reload outcomes:", dict(sorted(tally.outcomes.items())))
    print("master exceptions: 0; check/reload disagreements: 0")
    return 0


if __name__ == "__main__":
    sys.exit(main())
