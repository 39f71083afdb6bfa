"""Benchmark: the pub/sub example's subscribers across reloads, deliveries lost or not.

config/examples/pubsub.yaml as shipped (one worker, `app: "pubsub:make"`), N
subscribers of one topic and a publisher that connected before them (the
example offers its clients in the order it took them, so the publisher always
moves in the first hand-off round of 64). The publisher sends `PUB news <i>`
every `--interval` seconds and waits for each answer; H HUPs follow, each sent
once the previous old generation is RETIRED and `--between` more messages went
out. It reports, per run:
- published: messages answered; short: messages delivered to fewer than N
  subscribers (the answer `OK pub <k>` says to how many);
- lost: deliveries missing (N x published minus what the subscribers got);
- wrong: subscribers whose lines are not exactly `MSG news 1..published` in
  order (lost, repeated or reordered), and closed: subscribers whose
  connection ended (each must keep its one TCP connection throughout);
- reloads: the RETIRED generations, and the wall time of the run.

`--command FILE` runs FILE as an exec'd worker instead (`workers.command`), for
example the example as it was before the hand-off had an end:

    git show <commit>:config/examples/pubsub.py > /tmp/pubsub_before.py
    .venv/bin/python -m bench.pubsub_reload --command /tmp/pubsub_before.py
    .venv/bin/python -m bench.pubsub_reload [--subscribers 100] [--hups 20] [--runs 1]

Measured, one run each, back to back (2-core machine shared with other work,
load average about 40 to 60; 100 subscribers, 20 HUPs, 20 messages between HUPs,
publisher every 2 ms):

| example | published | short | lost deliveries | wrong subscribers | closed | reloads | wall |
|---|---|---|---|---|---|---|---|
| before (main's pubsub.py, `command:`) | 1,467 | 10 | 421 of 146,700 (0.29%) | 88 | 0 | 20 | 113 s |
| now (`app: "pubsub:make"`, warm) | 1,593 | 0 | 0 of 159,300 | 0 | 0 | 20 | 74 s |
| now as a `command:` (`--command config/examples/pubsub.py`, a later run) | 1,644 | 0 | 0 of 164,400 | 0 | 0 | 20 | 52 s |
"""

from __future__ import annotations

import argparse
import re
import sys
import tempfile
import time
from pathlib import Path

import yaml

from tests.support.broadcast import Broadcast
from tests.support.upgraderd_proc import ROOT, Daemon, free_port

EXAMPLES = ROOT / "config" / "examples"


def config(port: int, command: str | None) -> dict[str, object]:
    cfg = yaml.safe_load((EXAMPLES / "pubsub.yaml").read_text())
    cfg["listeners"][0]["port"] = port
    if command:
        cfg["workers"].pop("app", None)
        cfg["workers"].pop("cwd", None)
        cfg["workers"]["command"] = [sys.executable, command]
    else:
        cfg["workers"]["cwd"] = str(EXAMPLES)
        cfg["workers"]["warm"] = True
    return cfg


def run_once(subscribers: int, hups: int, between: int, interval: float, command: str | None) -> dict[str, object]:
    port = free_port()
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="bench-pubsub-") as tmp:
        with Daemon(Path(tmp), config(port, command)).start() as d:
            clients = Broadcast(port, subscribers, interval=interval).start()
            try:
                clients.wait_published(between)
                for n in range(2, hups + 2):
                    d.hup()
                    d.wait_log(rf"generation {n - 1} DRAINING -> RETIRED", timeout=60)
                    clients.wait_published(between, timeout=60)
                clients.finish(timeout=30)
                want = [f"MSG news {i}" for i in range(1, clients.published + 1)]
                retired = [float(x) for x in re.findall(r"DRAINING -> RETIRED after ([0-9.]+)s", d.log())]
                return {
                    "published": clients.published,
                    "short": sum(1 for k in clients.answers if k != subscribers),
                    "lost": clients.lost(),
                    "wrong": sum(1 for s in clients.subs if s.lines != want),
                    "closed": sum(1 for s in clients.subs if s.closed),
                    "errors": len(clients.errors),
                    "reloads": len(retired),
                    "seconds": round(time.monotonic() - started, 1),
                }
            finally:
                clients.close()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--subscribers", type=int, default=100)
    ap.add_argument("--hups", type=int, default=20)
    ap.add_argument("--between", type=int, default=20, help="messages answered between two HUPs")
    ap.add_argument("--interval", type=float, default=0.002)
    ap.add_argument("--runs", type=int, default=1)
    ap.add_argument("--command", help="run this file as an exec'd worker instead of the shipped app")
    args = ap.parse_args()
    for i in range(args.runs):
        result = run_once(args.subscribers, args.hups, args.between, args.interval, args.command)
        print(f"run {i + 1}: " + " ".join(f"{k}={v}" for k, v in result.items()), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
