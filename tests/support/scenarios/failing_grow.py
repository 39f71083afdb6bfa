"""Failing grows under echo load in reuseport mode; print the load outcome as JSON.

    HOST_NETNS=$(readlink /proc/self/ns/net) unshare -n python -m tests.support.scenarios.failing_grow WORKDIR ROUNDS

Each round HUPs to a config with 4 slots instead of 2 whose workers never
become ready (`sleep`), so the generation fails at its ready timeout and its
2 new slot sockets close. Run in a private network namespace with
net.ipv4.tcp_migrate_req=0: without steering, what queued on them is reset.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import yaml

from tests.support.loadgen import Load
from tests.support.upgraderd_proc import Daemon, echo_config, free_port


def main(workdir: str, rounds: str) -> int:
    if os.readlink("/proc/self/ns/net") == os.environ.get("HOST_NETNS", ""):
        print("refusing to run in the caller's network namespace; use unshare -n", file=sys.stderr)
        return 2
    subprocess.run(["ip", "link", "set", "lo", "up"], check=True)
    Path("/proc/sys/net/ipv4/tcp_migrate_req").write_text("0\n")
    port = free_port()
    cfg = echo_config(port, count=2)
    with Daemon(Path(workdir), cfg).start() as d:
        load = Load("127.0.0.1", port, threads=4, max_seconds=int(rounds) * 10 + 30).start("echo")
        assert load.wait_for_ok(100)
        bad = {**cfg, "workers": {"count": 4, "command": ["sleep", "30"]},
               "ready": {"mode": "notify", "timeout": "1s"}}
        for n in range(1, int(rounds) + 1):
            d.config_path.write_text(yaml.safe_dump(bad))
            d.hup()
            d.wait_log(r"reload failed, still serving generation 1", count=n, timeout=30)
        d.config_path.write_text(yaml.safe_dump(cfg))
        result = load.stop()
    print(json.dumps({"ok": result.ok, "failures": result.failures}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main(*sys.argv[1:]))
