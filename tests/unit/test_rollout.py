"""Canary rollouts (core/rollout.py, core/rolloutchecks.py) with the fake clock and fake processes.

Each test serves generation 1 with a canary config, sends HUP, and scripts the
canary's readiness, exits and the clock: the verdict, what is drained, and the
reload's outcome must follow exactly.
"""

from __future__ import annotations

import dataclasses
import http.server
import signal
import threading
from typing import Any, Iterator

import pytest

from tests.unit.test_master import HUP, T0, TERM, Rig, messages
from tests.unit.conftest import RigMaker
from upgraderd.core.generation import GenerationState as G

USR2 = signal.SIGUSR2


def canary(window: str = "10s", workers: int = 1, **checks: Any) -> dict[str, Any]:
    return {"rollout": {"strategy": "canary", "canary": {"workers": workers, "window": window},
                        "checks": checks}}


@pytest.fixture
def rig(rigs: RigMaker[Rig]) -> Rig:
    return rigs(Rig)


def start_canary(rig: Rig, count: int = 4, **sections: Any) -> int:
    """Serve generation 1 with `sections`, HUP, make the canary ready at T0+2; return its pid."""
    rig.serving(count, **sections)
    rig.step(HUP, at=T0 + 1)
    assert len(rig.procs.pids(2)) == sections["rollout"]["canary"]["workers"]
    rig.ready(*rig.procs.pids(2), at=T0 + 2)
    return rig.procs.pids(2)[0]


def test_a_canary_starts_with_its_workers_beside_the_serving_generation(rig: Rig,
                                                                         caplog: pytest.LogCaptureFixture) -> None:
    start_canary(rig, **canary())
    m = rig.master
    assert rig.states() == [(1, G.ACTIVE), (2, G.ACTIVE)]
    assert m.active is m.generations[0]                     # generation 1 serves; 2 is held
    assert rig.procs.kills_of(rig.procs.pids(1)) == []       # never signalled
    assert m.stats.reloads == {"success": 0, "failed": 0, "rejected": 0}   # no verdict yet
    assert "rollout: generation 2 canary serving with 1 of 4 workers beside generation 1; checks crashes " \
           "for 10s" in messages(caplog)


def test_a_passed_window_promotes_then_the_old_generation_drains(rig: Rig) -> None:
    start_canary(rig, **canary())
    rig.step(at=T0 + 11.9)
    assert len(rig.procs.pids(2)) == 1                       # the window (10s from T0+2) is not over
    rig.step(at=T0 + 12)
    new = rig.procs.pids(2)[1:]
    assert len(new) == 3 and rig.states() == [(1, G.ACTIVE), (2, G.ACTIVE)]
    assert [rig.procs.spawn_of(p).env["UPGRADERD_SLOT"] for p in new] == ["1", "2", "3"]
    rig.ready(*new[:2], at=T0 + 12.5)
    assert rig.procs.kills_of(rig.procs.pids(1)) == []       # not before every worker is ready
    rig.ready(new[2], at=T0 + 13)
    assert rig.states() == [(1, G.DRAINING), (2, G.ACTIVE)]
    assert sorted(rig.procs.kills_of(rig.procs.pids(1))) == [(p, TERM) for p in rig.procs.pids(1)]
    m = rig.master
    assert m.active is m.generations[1]
    assert m.stats.reloads["success"] == 1 and m.stats.rollouts == {"promoted": 1, "rolled_back": 0}
    assert m.stats.last_reload_generation == 2


def test_a_crash_in_the_window_rolls_back_and_names_the_check(rig: Rig, caplog: pytest.LogCaptureFixture) -> None:
    pid = start_canary(rig, **canary())
    rig.procs.exit(pid, code=3)
    rig.step(at=T0 + 5)
    assert rig.states() == [(1, G.ACTIVE)]              # the canary drained, retired, forgotten
    m = rig.master
    assert m.active is m.generations[0] and m.config is m.generations[0].config
    assert rig.procs.kills_of(rig.procs.pids(1)) == []
    assert m.stats.reloads == {"success": 0, "failed": 1, "rejected": 0}
    assert m.stats.rollouts == {"promoted": 0, "rolled_back": 1}
    assert m.stats.rollout_check_failures == {"crashes": 1, "http": 0, "command": 0, "error_ratio": 0, "latency_p99": 0,
                                             "ready": 0}
    assert m.stats.last_reload_error == ("generation 2 rolled back: check crashes failed: 1 worker exit(s) of "
                                         f"generation 2 (allowed: 0); last: slot 0 pid {pid} exit code 3")
    rig.step(at=T0 + 30)
    assert len(rig.procs.pids(2)) == 1                       # never promoted, never respawned
    assert rig.states() == [(1, G.ACTIVE)]


def test_crashes_within_the_allowance_still_promote(rig: Rig) -> None:
    pid = start_canary(rig, **canary(crashes=1))
    rig.procs.exit(pid, code=1)
    rig.step(at=T0 + 3)
    rig.step(at=T0 + 3.2)                                    # the back-off (0.1s) is over: respawned
    respawned = rig.procs.pids(2)[1]
    rig.ready(respawned, at=T0 + 4)
    rig.step(at=T0 + 12)
    rig.ready(*rig.procs.pids(2)[2:], at=T0 + 13)
    assert rig.states() == [(1, G.DRAINING), (2, G.ACTIVE)]
    assert rig.master.stats.rollouts == {"promoted": 1, "rolled_back": 0}


def test_a_canary_that_fails_to_start_fails_the_reload_as_usual(rig: Rig) -> None:
    rig.serving(4, **canary())
    rig.step(HUP, at=T0 + 1)
    rig.procs.exit(rig.procs.pids(2)[0], code=1)
    rig.step(at=T0 + 2)
    m = rig.master
    assert m.stats.reloads["failed"] == 1 and m.stats.rollouts == {"promoted": 0, "rolled_back": 0}
    assert m.fleet.held is None and m.active is m.generations[0]
    rig.step(HUP, at=T0 + 3)                                 # the next reload runs at once
    assert len(rig.procs.pids(3)) == 1


def test_a_hup_during_the_window_waits_for_the_verdict(rig: Rig, caplog: pytest.LogCaptureFixture) -> None:
    start_canary(rig, **canary())
    rig.step(HUP, at=T0 + 3)
    assert rig.procs.pids(3) == []
    assert "received SIGHUP: reload queued, the rollout of generation 2 has no verdict yet" in messages(caplog)
    rig.procs.exit(rig.procs.pids(2)[0], code=1)
    rig.step(at=T0 + 4)                                      # rolled back; the queued reload runs
    assert len(rig.procs.pids(3)) == 1
    assert rig.master.fleet.held is rig.master.generations[-1]


def test_a_usr2_during_the_window_is_refused(rig: Rig, caplog: pytest.LogCaptureFixture) -> None:
    start_canary(rig, **canary())
    rig.step(USR2, at=T0 + 3)
    assert "received SIGUSR2: refused, the rollout of generation 2 has no verdict yet; send USR2 again " \
           "once it is promoted or rolled back" in messages(caplog)
    assert rig.master.selfexec.requested is False


def test_a_promoted_worker_not_ready_in_time_rolls_back(rig: Rig) -> None:
    start_canary(rig, **canary(), ready={"timeout": "5s"})
    rig.step(at=T0 + 12)
    rig.ready(*rig.procs.pids(2)[1:3], at=T0 + 13)
    rig.step(at=T0 + 17)
    m = rig.master
    assert m.stats.rollout_check_failures["ready"] == 1
    assert m.stats.last_reload_error.endswith("check ready failed: slot(s) 3 not ready within 5s of the promotion")
    assert m.active is m.generations[0] and rig.procs.kills_of(rig.procs.pids(1)) == []
    assert m.generations[1].state is G.DRAINING


def test_the_command_check_must_exit_0_within_the_window(rig: Rig) -> None:
    start_canary(rig, **canary(command=["/bin/smoke", "{generation}"]))
    cmd = rig.procs.spawns[-1]
    assert cmd.argv == ("/bin/smoke", "2") and cmd.fds == ()
    rig.procs.exit(cmd.pid, code=4)
    rig.step(at=T0 + 3)
    m = rig.master
    assert m.stats.rollout_check_failures["command"] == 1
    assert m.stats.last_reload_error.endswith("check command failed: /bin/smoke 2 exit code 4")
    assert m.stats.worker_exits == {"clean": 0, "error": 0, "signal": 0}   # not a worker's exit


def test_a_command_still_running_at_the_window_end_fails_and_is_killed(rig: Rig) -> None:
    start_canary(rig, **canary(command=["/bin/smoke"]))
    cmd = rig.procs.spawns[-1].pid
    rig.step(at=T0 + 12)
    assert rig.master.stats.rollout_check_failures["command"] == 1
    assert (cmd, signal.SIGKILL) in rig.procs.kills
    assert len(rig.procs.pids(2)) == 2                       # the canary and the command: no promotion


def test_a_command_that_passed_lets_the_window_promote(rig: Rig) -> None:
    start_canary(rig, **canary(command=["/bin/smoke"]))
    rig.procs.exit(rig.procs.spawns[-1].pid, code=0)
    rig.step(at=T0 + 12)
    assert len(rig.procs.pids(2)) == 2 + 3                   # canary, command, three promoted slots


class Health(http.server.BaseHTTPRequestHandler):
    status = 200

    def do_GET(self) -> None:  # noqa: N802 (the stdlib's name)
        self.send_response(self.status)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, *args: Any) -> None:
        pass


@pytest.fixture
def health() -> Iterator[http.server.HTTPServer]:
    class Handler(Health):
        pass
    # A thread per connection: a probe still connected when the test ends (its rig is torn down
    # after this fixture) must not keep shutdown() waiting for the request it never sends.
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.block_on_close = False
    t = threading.Thread(target=server.serve_forever, daemon=True)
    t.start()
    yield server
    server.shutdown()
    server.server_close()


def run_until(rig: Rig, done: Any, start: float, limit: int = 200) -> float:
    """Step the fake clock by 10 ms (the probes are real sockets) until `done()`; return the time."""
    import time as real
    now = start
    for _ in range(limit):
        rig.step(at=now)
        if done():
            return now
        real.sleep(0.01)   # the loopback server answers in another thread: give it the CPU
        now += 0.01
    raise AssertionError("condition not reached")


def test_an_http_check_answered_500_rolls_back(rig: Rig, health: http.server.HTTPServer) -> None:
    health.RequestHandlerClass.status = 500  # type: ignore[attr-defined]
    url = f"http://127.0.0.1:{health.server_port}/healthz?g={{generation}}"
    start_canary(rig, **canary(http={"url": url, "every": "100ms", "timeout": "300ms"}))
    m = rig.master
    run_until(rig, lambda: m.stats.rollouts["rolled_back"] == 1, T0 + 2)
    assert m.stats.rollout_check_failures["http"] == 1
    assert f"GET http://127.0.0.1:{health.server_port}/healthz?g=2 (slot 0) got no 2xx within 0.3s: " \
           "answered HTTP/1.0 500 Internal Server Error (" in m.stats.last_reload_error


def test_an_http_check_answered_200_lets_the_window_promote(rig: Rig, health: http.server.HTTPServer) -> None:
    url = f"http://127.0.0.1:{health.server_port}/healthz"
    start_canary(rig, **canary(window="1s", http={"url": url, "every": "100ms", "timeout": "300ms"}))
    m = rig.master
    run_until(rig, lambda: len(rig.procs.pids(2)) == 4, T0 + 2)
    assert m.stats.rollouts == {"promoted": 0, "rolled_back": 0}
    assert m.stats.reloads["failed"] == 0


def test_status_shows_the_rollout_and_the_serving_generation(rig: Rig) -> None:
    from upgraderd.service import status
    start_canary(rig, **canary())
    snap = rig.master.snapshot(T0 + 4)
    assert snap.active_generation == 1                       # the canary is not what serves
    doc = status.document(snap)
    text = status.render(doc, now=doc["rollout"]["began_at"] + 2)
    assert "rollout: generation 2 canary, 1 of 4 workers ready beside generation 1; verdict in 8s " \
           "(checks: crashes)" in text.splitlines()
    rig.procs.exit(rig.procs.pids(2)[0], code=1)
    rig.step(at=T0 + 5)
    doc = status.document(rig.master.snapshot(T0 + 5))
    assert doc["rollout"] is None
    assert status.describe_reload(doc).splitlines()[0] == \
        "failed: generation 2 was rolled back (the old one keeps serving)"


WINCH = signal.SIGWINCH


def ask(rig: Rig, request: str, at: float) -> None:
    """Leave `request` where SIGWINCH makes the master read it (once), then send SIGWINCH."""
    left = [request]
    rig.master.reloads.seams = dataclasses.replace(rig.master.reloads.seams,
                                                   requests=lambda: left.pop() if left else "")
    rig.step(WINCH, at=at)


def test_promote_ends_the_window_now_and_stops_an_unfinished_command(rig: Rig,
                                                                     caplog: pytest.LogCaptureFixture) -> None:
    start_canary(rig, **canary(command=["/bin/smoke"]))
    cmd = rig.procs.spawns[-1].pid
    ask(rig, "promote 2\n", at=T0 + 3)
    assert (cmd, signal.SIGKILL) in rig.procs.kills
    assert "upgraderd promote: generation 2 promoted before check command finished" in messages(caplog)
    new = rig.procs.pids(2)[2:]
    assert len(new) == 3
    rig.procs.exit(cmd, signal=signal.SIGKILL)               # the killed command is claimed, not a worker
    rig.ready(*new, at=T0 + 4)
    m = rig.master
    assert rig.states() == [(1, G.DRAINING), (2, G.ACTIVE)]
    assert m.stats.rollouts == {"promoted": 1, "rolled_back": 0} and m.stats.reloads["success"] == 1
    assert m.stats.worker_exits == {"clean": 0, "error": 0, "signal": 0}


def test_rollback_aborts_the_window(rig: Rig) -> None:
    start_canary(rig, **canary())
    ask(rig, "rollback 2", at=T0 + 3)
    m = rig.master
    assert m.generations[1].state is G.DRAINING and m.active is m.generations[0]
    assert rig.procs.kills_of(rig.procs.pids(1)) == []
    assert m.stats.rollouts == {"promoted": 0, "rolled_back": 1}
    assert m.stats.rollout_check_failures == {"crashes": 0, "http": 0, "command": 0, "error_ratio": 0,
                                              "latency_p99": 0, "ready": 0}
    assert m.stats.last_reload_error == "generation 2 rolled back: aborted by `upgraderd rollback`"


@pytest.mark.parametrize("request_text, logged", [
    ("rollback 3", "upgraderd rollback: ignored, no rollout of generation 3 is under way"),
    ("demote 2", "ignored a rollout request that is neither `promote N` nor `rollback N`: 'demote 2'"),
    ("", "received SIGWINCH without a rollout request (see `upgraderd promote`): ignored"),
])
def test_a_request_for_no_rollout_under_way_changes_nothing(rig: Rig, caplog: pytest.LogCaptureFixture,
                                                            request_text: str, logged: str) -> None:
    start_canary(rig, **canary())
    ask(rig, request_text, at=T0 + 3)
    assert logged in messages(caplog)
    assert rig.master.fleet.held is rig.master.generations[1]
    assert rig.master.stats.rollouts == {"promoted": 0, "rolled_back": 0}
