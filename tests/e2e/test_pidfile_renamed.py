"""A renamed pidfile does not let a second master in (issue 25, flaws).

The pidfile lock guards one path; a first master whose pidfile was renamed
(a cleanup script, an operator's `mv`) no longer holds it. The address
check must still refuse a second master of the same config: the issue saw
one start, report ACTIVE and get none of the connections. (This layout, a
foreground master with its pidfile and lock moved aside, was refused on the
code the issue names too; the test keeps it so. Behind the address check,
system/strangers.py would refuse such a second master as well: the first
one's sockets are not its own.)
"""

from __future__ import annotations

import os

import pytest

from tests.support.upgraderd_proc import Daemon, echo_config, free_port

pytestmark = pytest.mark.e2e


def test_a_second_master_is_refused_after_the_first_ones_pidfile_was_renamed(tmp_path):
    port = free_port()
    cfg = echo_config(port, count=2)
    first = Daemon(tmp_path, cfg)
    with first.start():
        # The pidfile and its lock, moved aside: the lock no longer guards the path.
        for suffix in ("", ".lock"):
            os.rename(f"{first.pidfile}{suffix}", f"{first.pidfile}{suffix}.moved")
        second = Daemon(tmp_path, cfg)
        try:
            second.start(wait=False)
            assert second.proc is not None
            code = second.proc.wait(20)
            assert code == 3, second.log()
            assert f"another upgraderd master (pid {first.pid}) already serves 127.0.0.1:{port}" in second.log()
        finally:
            second.stop()
        assert first.proc is not None and first.proc.poll() is None
