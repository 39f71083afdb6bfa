"""The master's private directories go to systemd's RuntimeDirectory when it gives one.

The shipped units set `RuntimeDirectory=upgraderd` (a tmpfs under /run), so
`$RUNTIME_DIRECTORY` names it; the workers' metric files and hand-off channels
are then made there instead of in $TMPDIR (system/rundir.py). A directory that
is not a safe one of ours is passed over for $TMPDIR.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path
from typing import Iterator

import pytest

from tests.support.persistent import Streams
from tests.support.scrape import scrape, value
from tests.support.upgraderd_proc import Daemon, echo_config, free_port

pytestmark = pytest.mark.e2e


@pytest.fixture
def short() -> Iterator[Path]:
    """A directory with a short path: a channel's path must fit in 107 bytes, and a base
    too long for that is passed over for /tmp (system/channeldir.py), as pytest's tmp_path is."""
    path = Path(tempfile.mkdtemp(prefix="ud-rt-", dir="/tmp"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


def made_in(path: Path, master: int) -> list[str]:
    """Return the private directories of `master` in `path`, by kind."""
    kinds = []
    for entry in sorted(os.listdir(path)):
        if entry.startswith(f"upgraderd-metrics-{master}-"):
            kinds.append("metrics")
        elif entry.startswith(f"upgraderd-{master}-handoff-"):
            kinds.append("handoff")
    return kinds


def test_metric_files_and_channels_go_to_the_runtime_directory_and_connections_still_move(short):
    runtime = short / "run"
    runtime.mkdir(mode=0o755)
    work = short / "work"
    work.mkdir()
    port = free_port()
    cfg = echo_config(port, count=2)
    with Daemon(work, cfg, env={"RUNTIME_DIRECTORY": str(runtime)}).start() as d:
        assert made_in(runtime, d.pid) == ["handoff", "metrics"]
        assert made_in(work, d.pid) == []
        channels = next(runtime.glob(f"upgraderd-{d.pid}-handoff-*"))
        assert sorted(p.name for p in channels.iterdir()) == ["handoff-1-0", "handoff-1-1"]
        streams = Streams(port, 8).start()
        assert streams.wait_ok(80)
        d.reload_to(2)
        d.wait_log(r"generation 1 DRAINING -> RETIRED")
        assert streams.wait_ok(streams.result.ok + 80)
        result = streams.stop()
        assert result.failures == {}, result.examples
        assert result.ports_kept
        assert value(scrape(cfg), "upgraderd_connections_handed_off_total", listener="echo") == 8
        master = d.pid
        assert d.stop() == 0
    assert made_in(runtime, master) == []   # both removed at the stop


@pytest.mark.parametrize("unsafe", ["symlink", "group_writable", "relative", "missing"])
def test_an_unsafe_runtime_directory_is_passed_over_for_tmpdir(short, unsafe):
    target = short / "target"
    target.mkdir(mode=0o755)
    named = {"symlink": short / "link", "group_writable": target, "relative": Path("target"),
             "missing": short / "gone"}[unsafe]
    if unsafe == "symlink":
        named.symlink_to(target)
    if unsafe == "group_writable":
        target.chmod(0o775)
    work = short / "work"
    work.mkdir()
    with Daemon(work, echo_config(free_port(), count=1), env={"RUNTIME_DIRECTORY": str(named)}).start() as d:
        assert made_in(work, d.pid) == ["handoff", "metrics"]   # the test's $TMPDIR
        assert os.listdir(target) == []
        assert d.stop() == 0
