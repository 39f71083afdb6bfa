"""The master speaks sd_notify to systemd: READY=1, RELOADING=1, STOPPING=1."""

from __future__ import annotations

import socket

import pytest

from tests.support.fdstore import next_state
from tests.support.upgraderd_proc import Daemon, echo_config, free_port

pytestmark = pytest.mark.e2e



def test_notifies_systemd_of_ready_reloading_and_stopping(tmp_path):
    path = str(tmp_path / "systemd-notify.sock")
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as systemd:
        systemd.bind(path)
        systemd.settimeout(20)
        d = Daemon(tmp_path, echo_config(free_port()), env={"NOTIFY_SOCKET": path}).start()
        try:
            assert next_state(systemd) == {"READY": "1", "STATUS": "generation 1 active"}
            d.hup()
            reloading = next_state(systemd)
            assert reloading["RELOADING"] == "1" and int(reloading["MONOTONIC_USEC"]) > 0
            assert next_state(systemd) == {"READY": "1", "STATUS": "generation 2 active"}
            # The workers never see the master's NOTIFY_SOCKET: they report to the master.
            for pid in d.workers():
                env = open(f"/proc/{pid}/environ", "rb").read().split(b"\0")
                assert f"NOTIFY_SOCKET={path}".encode() not in env
        finally:
            assert d.stop() == 0
        assert next_state(systemd) == {"STOPPING": "1"}
