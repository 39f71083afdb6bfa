"""`upgraderd rollback` after a reload: the previous release, forked from its kept template.

The app records its version at import; release 1 is served, the file is
changed on disk, a HUP serves release 2, and `upgraderd rollback` must bring
back the answers of release 1 (generation 3, no new template exec'd) with 0
failed round trips, a keep-alive connection of generation 2 handed over to
generation 3 on the same local port, and, once `keep_previous` is over,
nothing left to roll back to (exit 1).
"""

from __future__ import annotations

import re
import socket
from pathlib import Path

import pytest

from tests.e2e.test_cli import upgraderd
from tests.e2e.test_prefork import APP, Asker, app_config, forked, ran, templates
from tests.support.scrape import scrape, value
from tests.support.upgraderd_proc import Daemon, alive, free_port, wait_until

pytestmark = pytest.mark.e2e


# The tag app of test_prefork.py ("<version> <pid>" for every read), whose connections can
# move (apps/moves.py `Movable`): a draining worker hands them to the ACTIVE generation.
MOVABLE = APP.replace("class Tag:", "class Tag:\n    def handoff_state(self):\n        return b'', b''\n"
                      "    def restore(self, state):\n        pass\n")


def write_app(where: Path, version: str) -> None:
    """Write the movable tag app `tagapp`, answering with `version` (read at import)."""
    (where / "tagapp.py").write_text(MOVABLE.format(version=version, extra="", out=str(where / "out")))


def round_trip(sock: socket.socket) -> list[str]:
    """Send one request on the held connection; return the answer's version and pid."""
    sock.sendall(b"?")
    return sock.recv(100).decode().split()


def test_rollback_forks_the_previous_release_again(tmp_path):
    (tmp_path / "out").mkdir()
    write_app(tmp_path, "v1")
    port = free_port()
    cfg = {**app_config(port, tmp_path), "rollout": {"keep_previous": "4s"}}
    with Daemon(tmp_path, cfg).start() as d:
        (template1,) = templates(d)
        write_app(tmp_path, "version-two")
        d.hup()
        d.wait_log(r"reload done: generation 2 ACTIVE")
        d.wait_log(rf"keeping the template of generation 1's release \(pid {template1}, served by generation 1\)")
        asker = Asker(port)
        asker.wait_for_ok(asker.ok + 50)
        held = socket.create_connection(("127.0.0.1", port), timeout=5)
        version, gen2_pid = round_trip(held)
        assert version == "version-two"
        local = held.getsockname()[1]

        r = upgraderd("rollback", "--pidfile", str(d.pidfile))
        assert r.returncode == 0, r
        assert r.stdout.strip() == "rollback done: generation 3 ACTIVE, running generation 1's release again"
        d.wait_log(r"reload done: generation 3 ACTIVE [0-9.]+s after `upgraderd rollback` \(a rollback: "
                   r"it runs generation 1's release\)")
        gen3 = wait_until(lambda: {p for p in forked(d) if ran(tmp_path).get(p, [""])[0] == "v1"
                                   and ran(tmp_path)[p][4] == "3"} or None, 10, "generation 3's workers")
        assert len(gen3) == 2
        # The held connection moved to generation 3 (its workers passed the hand-off check as
        # generation 3), and answers with release 1 on the same local port.
        answers: list[list[str]] = []

        def moved() -> bool:
            answers.append(round_trip(held))   # an empty answer (the connection closed) fails below
            return int(answers[-1][1]) in gen3
        wait_until(moved, 10, "the held connection to be answered by generation 3", interval=0.05)
        assert {a[0] for a in answers[:-1]} <= {"version-two"} and answers[-1][0] == "v1", answers
        assert held.getsockname()[1] == local
        held.close()
        before = asker.ok
        asker.wait_for_ok(before + 100)
        assert asker.stop() == []
        assert "v1" in asker.versions
        # No exec: generation 3 was forked by release 1's template; release 2's is kept now.
        assert template1 in templates(d) and len(re.findall(r"template pid \d+ started", d.log())) == 2
        status = upgraderd("status", "--pidfile", str(d.pidfile)).stdout
        assert "runs generation 1's release (a rollback)" in status
        assert "previous release: generation 2's template pid" in status
        samples = scrape(cfg)
        assert value(samples, "upgraderd_generation") == 3
        assert value(samples, "upgraderd_serving_release") == 1
        assert value(samples, "upgraderd_previous_release_kept") == 2

        d.wait_log(r"released the template of generation 2's release \(pid \d+\): rollout.keep_previous "
                   r"\(4s\) is over", timeout=10)
        r = upgraderd("rollback", "--pidfile", str(d.pidfile))
        assert r.returncode == 1, r
        assert r.stderr.strip() == ("upgraderd: no rollout is under way and no previous release is kept "
                                    "(rollout.keep_previous): nothing to roll back to")
        assert alive(template1)


def test_a_rolled_back_canary_hands_its_connections_back(tmp_path):
    (tmp_path / "out").mkdir()
    write_app(tmp_path, "v1")
    port = free_port()
    cfg = app_config(port, tmp_path)
    with Daemon(tmp_path, cfg).start() as d:
        gen1 = forked(d)
        write_app(tmp_path, "version-two")
        d.write_config({**cfg, "rollout": {"strategy": "canary", "canary": {"workers": 1, "window": "120s"}}})
        d.hup()
        d.wait_log(r"rollout: generation 2 canary serving with 1 of 2 workers")
        (canary,) = wait_until(lambda: forked(d) - gen1 or None, 10, "the canary's worker")
        # Keep-alive connections, opened until 3 of them landed on the canary (at most 300).
        held: list[tuple[socket.socket, int]] = []
        on_canary = 0
        while on_canary < 3 and len(held) < 300:
            s = socket.create_connection(("127.0.0.1", port), timeout=5)
            version, pid = round_trip(s)
            held.append((s, int(pid)))
            on_canary += int(pid) == canary
        assert on_canary == 3, f"{on_canary} of {len(held)} connections reached the canary"
        asker = Asker(port)
        asker.wait_for_ok(asker.ok + 50)
        r = upgraderd("rollback", "--pidfile", str(d.pidfile))
        assert (r.returncode, r.stdout) == (0, "rollback done: generation 2 rolled back, generation 1 serves\n"), r
        # The 3 held ones, and any of the load's that the canary had open then: all of them.
        (handed,) = d.wait_log(r"worker generation 2 slot 0: handed (\d+) of (\d+) connection\(s\) to \d worker")
        assert int(handed.group(1)) == int(handed.group(2)) >= 3, handed.group(0)
        wait_until(lambda: not alive(canary), 10, "the canary to exit")
        # Every held connection answers again, on its own local port, from release 1 (generation 1).
        for s, _pid in held:
            port_before = s.getsockname()[1]
            version, pid = round_trip(s)
            assert (version, int(pid) in gen1, s.getsockname()[1]) == ("v1", True, port_before)
            s.close()
        asker.wait_for_ok(asker.ok + 100)
        assert asker.stop() == []
