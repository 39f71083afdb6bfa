"""Passed sockets matched to listeners, and pidfd_getfd, against the real kernel on 127.0.0.1."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from tests.support.upgraderd_proc import free_port, wait_until
from upgraderd.config import schema
from upgraderd.errors import FatalError
from upgraderd.system import activation, conflict, orphanfds


def _cfg(tmp_path: Path, port: int, mode: str, count: int = 2) -> schema.Config:
    path = tmp_path / "c.yaml"
    path.write_text(f"listeners: [{{name: web, port: {port}, mode: {mode}}}, "
                    f"{{name: side, port: {free_port()}, mode: worker-bind}}]\n"
                    f"workers: {{count: {count}, app: echo}}\n")
    return schema.load(str(path))


def _listening(port: int, reuseport: bool = True) -> socket.socket:
    s = socket.socket()
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    if reuseport:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    s.bind(("127.0.0.1", port))
    s.listen(8)
    return s


def test_passed_sockets_are_adopted_by_name_and_slot_and_strangers_closed(tmp_path):
    port = free_port()
    cfg = _cfg(tmp_path, port, "reuseport")
    s0, s1, stray, beyond = _listening(port), _listening(port), _listening(free_port()), _listening(port)
    passed = [activation.Passed(3, "web", s0), activation.Passed(4, "web/1", s1),
              activation.Passed(5, "nobody", stray), activation.Passed(6, "web/7", beyond)]
    adopted = activation.Adopted()
    activation.match(cfg, passed, adopted)
    assert {k: s for k, (s, _) in adopted.sockets.items()} == {
        ("127.0.0.1", port, "reuseport", 0): s0, ("127.0.0.1", port, "reuseport", 1): s1}
    assert stray.fileno() == -1 and beyond.fileno() == -1   # closed: no listener wants them
    adopted.close()


def test_a_passed_socket_at_another_address_names_the_fd_and_the_listener(tmp_path):
    port, other = free_port(), free_port()
    cfg = _cfg(tmp_path, port, "shared")
    with _listening(other) as s, pytest.raises(FatalError) as e:
        activation.match(cfg, [activation.Passed(3, "web", s)], activation.Adopted())
    assert str(e.value) == (f"passed fd 3 ('web') is bound to 127.0.0.1:{other}, but listener 'web' "
                            f"is 127.0.0.1:{port} (mode shared)")


def test_a_passed_udp_or_unlistening_socket_is_refused(tmp_path):
    port = free_port()
    cfg = _cfg(tmp_path, port, "shared")
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp, pytest.raises(FatalError, match="not a TCP/IPv4"):
        udp.bind(("127.0.0.1", port))
        activation.match(cfg, [activation.Passed(3, "web", udp)], activation.Adopted())
    with socket.socket() as idle, pytest.raises(FatalError, match="is not listening"):
        idle.bind(("127.0.0.1", port))
        activation.match(cfg, [activation.Passed(3, "web", idle)], activation.Adopted())


def test_reuseport_with_more_slots_needs_so_reuseport_on_the_passed_socket(tmp_path):
    port = free_port()
    with _listening(port, reuseport=False) as s, pytest.raises(FatalError, match="ReusePort=yes"):
        activation.match(_cfg(tmp_path, port, "reuseport"), [activation.Passed(3, "web", s)], activation.Adopted())


def test_listen_variables_for_another_pid_are_ignored_and_removed():
    env = {"LISTEN_FDS": "2", "LISTEN_PID": str(os.getpid() + 1), "LISTEN_FDNAMES": "a:b", "KEEP": "1"}
    assert activation.take_passed(env) == []
    assert env == {"KEEP": "1"}
    env = {"LISTEN_FDS": "\u00b2", "LISTEN_PID": str(os.getpid())}
    assert activation.take_passed(env) == [] and env == {}


def test_pidfd_getfd_duplicates_a_childs_listening_socket(tmp_path):
    port = free_port()
    code = ("import socket, time, sys; s = socket.socket(); s.bind(('127.0.0.1', %d)); s.listen(4); "
            "print(s.fileno(), flush=True); time.sleep(30)" % port)
    child = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout is not None
        target = int(child.stdout.readline())
        pidfd = os.pidfd_open(child.pid)
        try:
            fd = orphanfds.pidfd_getfd(pidfd, target)
        finally:
            os.close(pidfd)
        with socket.socket(fileno=fd) as dup:
            assert dup.getsockname() == ("127.0.0.1", port)
            assert not os.get_inheritable(fd)
            # The same socket: a connection queued on it is accepted through our copy.
            with socket.create_connection(("127.0.0.1", port), timeout=5):
                conn, _ = dup.accept()
                conn.close()
        listed = wait_until(lambda: [x for x in conflict.listening() if x[1] == port], 5, "the LISTEN entry")
        assert len(listed) == 1  # type: ignore[arg-type]
    finally:
        child.kill()
        child.wait()
