"""`rollback: manual` with the real daemon: a failing canary is held for the operator, not rolled back."""

from __future__ import annotations

import re
import sys

import pytest

from tests.e2e.test_cli import upgraderd
from tests.e2e.test_rollout import CRASHLOOP, canary, finish, loaded, serving_only
from tests.support.scrape import scrape, value
from tests.support.upgraderd_proc import Daemon, echo_config, free_port, wait_until

pytestmark = pytest.mark.e2e


def test_a_failing_canary_waits_for_the_operator_then_rollback_decides(tmp_path):
    port = free_port()
    flag = tmp_path / "crash"
    flag.touch()
    v1 = echo_config(port, count=3)
    with Daemon(tmp_path, v1).start() as d:
        load = loaded(port)
        # The canary serves echo for 0.5 s, then exits 1: check crashes fails, and the rollout holds.
        d.write_config({**v1, "workers": {"count": 3, "command": [sys.executable, CRASHLOOP, str(flag), "all", "0.5"]},
                        "rollout": {**canary("2s"), "rollback": "manual"}})
        d.hup()
        d.wait_log(r"rollout: generation 2 check crashes failed: .*; holding it for the operator \(rollback: "
                   r"manual\): the canary keeps its share beside generation 1 until `upgraderd promote` or "
                   r"`upgraderd rollback`")
        wait_until(lambda: ((d.status() or {}).get("rollout") or {}).get("held"), 10, "the status to show the hold")
        shown = upgraderd("status", "--pidfile", str(d.pidfile)).stdout
        assert re.search(r"^rollout: generation 2 canary held, [01] of 3 workers beside generation 1: check crashes "
                         r"failed: .*; waiting for `upgraderd promote` or `upgraderd rollback`$", shown, re.M), shown
        samples = scrape(v1)
        assert value(samples, "upgraderd_rollout_waiting_for_operator") == 1
        assert value(samples, "upgraderd_rollouts_total", result="rolled_back") == 0
        assert value(samples, "upgraderd_generation") == 1
        r = upgraderd("rollback", "--pidfile", str(d.pidfile))
        assert (r.returncode, r.stdout) == (0, "rollback done: generation 2 rolled back, generation 1 serves\n"), r
        serving_only(d, 1)
        assert finish(load) == {}
        samples = scrape(v1)
        assert value(samples, "upgraderd_rollout_waiting_for_operator") == 0
        assert value(samples, "upgraderd_rollouts_total", result="rolled_back") == 1
        assert value(samples, "upgraderd_rollout_check_failures_total", check="crashes") == 1
