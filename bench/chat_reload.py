"""Benchmark: N WebSocket chat clients (the `websockets` library) through H HUPs with the move opt-in.

config/examples/chat.yaml (config/examples/chat_app.py, which opts in to
upgraderd.websocket.move), `--clients` clients in 7 rooms, each sending a
message every `--every` s and waiting for its acknowledgement (the app's
per-user count, which moves with the connection). After each HUP the bench
waits for the old generation to be RETIRED and for every client to be
acknowledged twice more. Reported: clients whose connection ended
(disconnects), lost or repeated acknowledgements, clients whose local port
changed, and the generations every client was served by. The file limit is
raised (RLIMIT_NOFILE) for the bench and the daemon it starts.

    .venv/bin/python -m bench.chat_reload [--clients 1000] [--hups 20] [--every 2]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import re
import resource
import tempfile
import time
from pathlib import Path

import websockets

from tests.e2e.test_asgi import web_config
from tests.support.upgraderd_proc import Daemon, free_port


async def member(port: int, i: int, every: float, stop: asyncio.Event, seen: dict[int, list[int]],
                 gens: dict[int, set[int]], moved_port: list[int]) -> None:
    async with websockets.connect(f"ws://127.0.0.1:{port}/chat/room{i % 7}?name=user{i}", ping_interval=None,
                                  compression=None, open_timeout=60) as ws:
        local = ws.transport.get_extra_info("sockname")[1]
        n = 0
        while not stop.is_set():
            n += 1
            await ws.send(f"hello {n}")
            while True:
                text = await asyncio.wait_for(ws.recv(), 60)
                if text.startswith("ack "):
                    break
            m = re.fullmatch(r"ack (\d+) generation=(\d+)", text)
            assert m is not None, text
            seen.setdefault(i, []).append(int(m.group(1)))
            gens.setdefault(i, set()).add(int(m.group(2)))
            await asyncio.sleep(every)
        if local != ws.transport.get_extra_info("sockname")[1]:
            moved_port.append(i)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clients", type=int, default=1000)
    parser.add_argument("--hups", type=int, default=20)
    parser.add_argument("--every", type=float, default=2.0)
    args = parser.parse_args()
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = max(soft, min(hard, 4 * args.clients + 1024))
    resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))
    port = free_port()
    with tempfile.TemporaryDirectory(prefix="bench-chat-") as t, Daemon(Path(t), web_config("chat", port)).start() as d:
        async def run() -> tuple[list[BaseException | None], dict[int, list[int]], dict[int, set[int]], list[int],
                                 list[float]]:
            stop = asyncio.Event()
            seen: dict[int, list[int]] = {}
            gens: dict[int, set[int]] = {}
            moved: list[int] = []
            tasks = []
            for i in range(args.clients):
                tasks.append(asyncio.create_task(member(port, i, args.every, stop, seen, gens, moved)))
                if i % 50 == 49:
                    await asyncio.sleep(0.05)
            deadline = time.monotonic() + 120
            while len(seen) < args.clients and time.monotonic() < deadline and not any(t.done() for t in tasks):
                await asyncio.sleep(0.2)
            durations = []
            for gen in range(2, 2 + args.hups):
                if any(t.done() for t in tasks):
                    break
                t0 = time.monotonic()
                await asyncio.to_thread(d.reload_to, gen)
                await asyncio.to_thread(d.wait_log, rf"generation {gen - 1} DRAINING -> RETIRED", 1, 120)
                durations.append(time.monotonic() - t0)
                marks = {i: len(v) for i, v in seen.items()}
                deadline = time.monotonic() + 120
                while any(len(seen[i]) < marks[i] + 2 for i in seen) and time.monotonic() < deadline \
                        and not any(t.done() for t in tasks):
                    await asyncio.sleep(0.2)
                print(f"  HUP {gen - 1}: generation {gen} ACTIVE, {gen - 1} retired after {durations[-1]:.1f} s; "
                      f"load average {os.getloadavg()[0]:.1f}", flush=True)
            stop.set()
            outcomes = await asyncio.gather(*tasks, return_exceptions=True)
            return [o if isinstance(o, BaseException) else None for o in outcomes], seen, gens, moved, durations
        outcomes, seen, gens, moved, durations = asyncio.run(run())
        log = d.log()
    failed = [(i, repr(o)) for i, o in enumerate(outcomes) if o is not None]
    bad = [i for i, c in seen.items() if c != list(range(1, len(c) + 1))]
    last = 1 + len(durations)
    every_gen = sum(1 for g in gens.values() if g == set(range(1, last + 1)))
    print(f"clients {args.clients}, HUPs done {len(durations)} of {args.hups}, messages acknowledged "
          f"{sum(len(c) for c in seen.values())}")
    print(f"disconnects {len(failed)}, clients with lost or repeated messages {len(bad)}, "
          f"clients whose local port changed {len(moved)}, served by every generation 1..{last}: {every_gen}")
    print(f"HUP -> old generation retired: median {sorted(durations)[len(durations) // 2] if durations else 0:.1f} s, "
          f"max {max(durations, default=0):.1f} s; "
          f"on_move failures {log.count('on_move failed')}, SIGKILL {log.count('SIGKILL')}")
    if failed:
        print("first failures:", failed[:3])
    return 0 if not failed and not bad and not moved else 1


if __name__ == "__main__":
    raise SystemExit(main())
