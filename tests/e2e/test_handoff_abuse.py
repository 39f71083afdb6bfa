"""A local user cannot take the hand-off away (issue 25, finding 1).

A process running as `nobody` squats the channel names of the next
generation, or floods the channels with connects, while 16 keep-alive echo
clients are served. `upgraderd reload` must then either move every
connection (exit 0, 16 handed off, 0 lost) or refuse the reload (exit 1)
with the old generation still serving all 16; never exit 0 and lose them.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Iterator

import pytest

from tests.support.persistent import Streams
from tests.support.scrape import scrape, value
from tests.support.upgraderd_proc import ROOT, Daemon, echo_config, free_port, wait_until

pytestmark = pytest.mark.e2e

SQUATTER = ROOT / "tests/fixtures/channel_squatter.py"
# The system interpreter, not the venv's: `nobody` needs nothing of upgraderd.
PYTHON = "/usr/bin/python3" if os.access("/usr/bin/python3", os.X_OK) else sys.executable


@pytest.fixture
def shared_dir() -> Iterator[Path]:
    """A directory `nobody` may write its ready file to (the test's tmp_path is root's alone)."""
    path = Path(tempfile.mkdtemp(prefix="upgraderd-squat-"))
    path.chmod(0o777)
    yield path
    shutil.rmtree(path, ignore_errors=True)


def reload_cli(d: Daemon) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "upgraderd", "reload", "--pidfile", str(d.pidfile),
                           "-c", str(d.config_path)],
                          capture_output=True, text=True, cwd=ROOT, timeout=60, stdin=subprocess.DEVNULL)


def channel_dir(d: Daemon) -> Path:
    """Return the master's channel directory, as its (exec'd) workers were told."""
    env = {}
    for pid in d.workers():
        raw = Path(f"/proc/{pid}/environ").read_bytes()
        env = dict(item.split("=", 1) for item in raw.decode().split("\0") if "=" in item)
        if "UPGRADERD_HANDOFF_DIR" in env:
            break
    path = Path(env["UPGRADERD_HANDOFF_DIR"])
    assert path.name.startswith(f"upgraderd-{d.pid}-handoff-") and (path.stat().st_mode & 0o777) == 0o700
    return path


def as_nobody(*args: str) -> subprocess.Popen[bytes]:
    if os.geteuid() != 0:
        pytest.skip("needs root to run the squatter as nobody")
    return subprocess.Popen([PYTHON, str(SQUATTER), *args], user="nobody", group="nogroup",
                            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


def handed_off(cfg: dict[str, object]) -> float:
    try:
        return value(scrape(cfg), "upgraderd_connections_handed_off_total", listener="echo")  # type: ignore[arg-type]
    except KeyError:
        return 0.0


def reload_under(d: Daemon, cfg: dict[str, object], port: int) -> None:
    """Reload with 16 echo clients; assert 0 lost, and that success means every one moved."""
    streams = Streams(port, 16).start()
    try:
        assert streams.wait_ok(160)
        r = reload_cli(d)
        assert r.returncode in (0, 1), r.stdout + r.stderr
        if r.returncode == 0:
            d.wait_log(r"generation 1 DRAINING -> RETIRED", timeout=30)
            wait_until(lambda: handed_off(cfg) == 16, 10, "all 16 connections handed off")
        else:
            assert "generation 1 ACTIVE -> DRAINING" not in d.log(), d.log()
        assert streams.wait_ok(streams.result.ok + 160)
    finally:
        result = streams.stop()
    assert result.failures == {}, (result.examples, d.log()[-3000:])
    assert result.ports_kept


def test_a_squatter_as_nobody_on_the_next_channels_loses_nothing(tmp_path, shared_dir):
    port = free_port()
    # drain.timeout short: on the old code the squatted reload cut every client at it.
    cfg = echo_config(port, count=4, drain={"timeout": "3s"})
    # TMPDIR=/tmp: the channel directory is where any user can see it, not under the
    # test's root-only tmp_path, so only the directory's own permissions keep `nobody` out.
    with Daemon(tmp_path, cfg, env={"TMPDIR": "/tmp"}).start() as d:
        ready = shared_dir / "squat.json"
        squatter = as_nobody("squat", str(d.pid), "2", "3", "4", "60", str(ready))
        try:
            wait_until(ready.exists, 10, "the squatter in place")
            reload_under(d, cfg, port)
        finally:
            squatter.kill()
            squatter.wait()
        assert json.loads(ready.read_text())["planted"] == 0


def test_a_connect_flood_from_four_strangers_loses_nothing(tmp_path, shared_dir):
    port = free_port()
    cfg = echo_config(port, count=4, drain={"timeout": "3s"})
    with Daemon(tmp_path, cfg, env={"TMPDIR": "/tmp"}).start() as d:
        readies = [shared_dir / f"flood{i}.json" for i in range(4)]
        flooders = [as_nobody("flood", str(d.pid), "60", str(r)) for r in readies]
        try:
            wait_until(lambda: all(r.exists() for r in readies), 10, "the flooders running")
            reload_under(d, cfg, port)
        finally:
            for f in flooders:
                f.kill()
                f.wait()


def test_a_channel_that_cannot_be_opened_fails_the_reload_and_the_old_workers_keep_their_clients(tmp_path):
    port = free_port()
    cfg = echo_config(port, count=2, drain={"timeout": "3s"}, ready={"timeout": "5s"})
    with Daemon(tmp_path, cfg).start() as d:
        channels = channel_dir(d)
        # Something that is not a socket where generation 2's slot 0 must listen.
        (channels / "handoff-2-0").mkdir()
        streams = Streams(port, 8).start()
        try:
            assert streams.wait_ok(80)
            r = reload_cli(d)
            assert r.returncode == 1, r.stdout + r.stderr
            d.wait_log(r"hand-off channel unavailable, not starting")
            assert "generation 1 ACTIVE -> DRAINING" not in d.log()
            assert streams.wait_ok(streams.result.ok + 80)
        finally:
            result = streams.stop()
        assert result.failures == {}, result.examples
        assert result.ports_kept
