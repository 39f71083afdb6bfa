"""Unix socket listeners against the real kernel, without a daemon (system/unixsock.py).

Binding with permissions, the stale/live/not-a-socket cases, removal only of
the file the master created, the ListenerSet's keys, hand-over export and
adoption, and passed sockets matched to a path listener by activation.py.
"""

from __future__ import annotations

import os
import socket
import stat
from pathlib import Path

import pytest

from tests.support.upgraderd_proc import free_port
from upgraderd.config import schema
from upgraderd.errors import FatalError
from upgraderd.system import activation, fdstore, sockets, unixsock


def _cfg(sock: Path, extra: str = "") -> schema.Config:
    return schema.parse(f"listeners:\n  - {{name: web, path: {sock}{extra}}}\n"
                        f"  - {{name: tcp, port: {free_port()}, mode: shared}}\n"
                        "workers: {count: 2, app: echo}\n")


def _connects(path: Path) -> bool:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as c:
        try:
            c.connect(str(path))
        except ConnectionRefusedError:
            return False
    return True


def test_ensure_binds_the_path_once_and_close_all_removes_it(tmp_path):
    sock = tmp_path / "app.sock"
    cfg = _cfg(sock, ", permissions: '0600'")
    ls = sockets.ListenerSet()
    opened = ls.ensure(cfg)
    key = (str(sock), 0, "shared", 0)
    assert key in opened and len(opened) == 2
    assert stat.S_IMODE(os.lstat(sock).st_mode) == 0o600
    assert ls.ensure(cfg) == []                          # kept, never re-bound
    assert len({ls.child_fds(cfg, 0), ls.child_fds(cfg, 1)}) == 1   # shared: one socket for all slots
    assert _connects(sock)
    assert ls.steer(cfg, [0, 1]) is None
    assert ls.is_steered(cfg)   # the TCP group is; the Unix one has no groups to steer
    assert fdstore.names(cfg, ls.keys())[key] == "web"
    ls.close_all()
    assert not os.path.lexists(sock)


def test_a_reload_that_drops_the_listener_removes_the_file(tmp_path):
    sock = tmp_path / "app.sock"
    ls = sockets.ListenerSet()
    ls.ensure(_cfg(sock))
    closed = ls.keep_only(set())
    assert (str(sock), 0, "shared", 0) in closed
    assert not os.path.lexists(sock)


def test_export_and_adopt_carry_the_file_so_the_new_master_removes_it(tmp_path):
    sock = tmp_path / "app.sock"
    old = sockets.ListenerSet()
    old.ensure(_cfg(sock))
    entries = old.export()
    assert [e["file"] for e in entries if e["key"][0] == str(sock)] == [list(unixsock.file_id(str(sock)))]
    new = sockets.ListenerSet()
    new.adopt([{**e, "fd": os.dup(e["fd"])} for e in entries])
    old._files.clear()      # the old master execs away: it never removes anything
    old.close_all()
    assert _connects(sock)
    new.close_all()
    assert not os.path.lexists(sock)


def test_a_file_replaced_behind_the_masters_back_is_left_alone(tmp_path):
    sock = tmp_path / "app.sock"
    ls = sockets.ListenerSet()
    ls.ensure(_cfg(sock))
    os.unlink(sock)
    other = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    other.bind(str(sock))
    ident = unixsock.file_id(str(sock))
    ls.close_all()
    assert unixsock.file_id(str(sock)) == ident         # someone else's file: not removed
    other.close()


def test_stale_is_replaced_live_is_refused_others_left_alone(tmp_path):
    sock = tmp_path / "app.sock"
    spec = _cfg(sock).listeners[0]
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as live:
        live.bind(str(sock))
        live.listen(1)
        with pytest.raises(OSError) as e:
            unixsock.bind(spec)
        assert f"held by pid {os.getpid()}" in str(e.value.strerror)
        assert unixsock.holders_of(str(sock)) == [os.getpid()]
    # `live` is closed now, its file stays: stale.
    s, ident = unixsock.bind(spec)
    with s:
        assert unixsock.file_id(str(sock)) == ident
    os.unlink(sock)
    sock.write_text("data")
    with pytest.raises(OSError, match=r"the path exists and is not a socket \(a regular file\)"):
        unixsock.bind(spec)
    assert sock.read_text() == "data"


def test_a_full_backlog_counts_as_live(tmp_path):
    sock = tmp_path / "app.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as live:
        live.bind(str(sock))
        live.listen(0)
        queued = []
        for _ in range(3):   # fill the queue; a nonblocking connect then gets EAGAIN
            c = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            c.setblocking(False)
            try:
                c.connect(str(sock))
            except BlockingIOError:
                pass
            queued.append(c)
        with pytest.raises(OSError, match="a live socket is there"):
            unixsock.bind(_cfg(sock).listeners[0])
        for c in queued:
            c.close()


def test_passed_unix_sockets_match_the_path_listener(tmp_path):
    sock = tmp_path / "app.sock"
    cfg = _cfg(sock)
    passed = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    passed.bind(str(sock))
    passed.listen(8)
    adopted = activation.Adopted()
    activation.match(cfg, [activation.Passed(3, "web", passed)], adopted)
    assert list(adopted.sockets) == [(str(sock), 0, "shared", 0)]
    ls = sockets.ListenerSet()
    ls.adopt_listening(cfg, {k: s for k, (s, _) in adopted.sockets.items()})
    assert ls.ensure(cfg) == [("127.0.0.1", cfg.listeners[1].port, "shared", 0)]
    ls.close_all()
    assert os.path.lexists(sock)   # a passed socket's file belongs to whoever passed it


def test_a_passed_socket_at_another_path_or_of_another_kind_is_refused(tmp_path):
    cfg = _cfg(tmp_path / "app.sock")
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as other:
        other.bind(str(tmp_path / "other.sock"))
        other.listen(1)
        with pytest.raises(FatalError) as e:
            activation.match(cfg, [activation.Passed(3, "web", other)], activation.Adopted())
    assert str(e.value) == (f"passed fd 3 ('web') is bound to '{tmp_path}/other.sock', but listener "
                            f"'web' is {tmp_path}/app.sock (mode shared)")
    with socket.socket() as tcp, pytest.raises(FatalError, match="is not a Unix stream socket"):
        tcp.bind(("127.0.0.1", 0))
        tcp.listen(1)
        activation.match(cfg, [activation.Passed(3, "web", tcp)], activation.Adopted())


def test_two_tcp_groups_closed_in_one_retire(tmp_path):
    """Regression: a retire() that closed sockets of two groups raised KeyError on the second."""
    a, b = free_port(), free_port()
    cfg = schema.parse(f"listeners: [{{name: a, port: {a}}}, {{name: b, port: {b}}}]\n"
                       "workers: {count: 2, app: echo}\n")
    ls = sockets.ListenerSet()
    ls.ensure(cfg)
    # TTOU on two reuseport listeners: slot 1 of each closes in the same call.
    done = ls.retire({("127.0.0.1", a, "reuseport", 0), ("127.0.0.1", b, "reuseport", 0)})
    assert sorted(done.closed) == sorted([("127.0.0.1", a, "reuseport", 1), ("127.0.0.1", b, "reuseport", 1)])
    assert len(ls.keys()) == 2
    ls.close_all()


def test_a_reload_applies_new_permissions_to_the_kept_file_but_never_through_a_symlink(tmp_path):
    sock = tmp_path / "app.sock"
    ls = sockets.ListenerSet()
    ls.ensure(_cfg(sock, ", permissions: '0600'"))
    ident = unixsock.file_id(str(sock))
    opened = ls.ensure(_cfg(sock, f", permissions: '0640', group: '{os.getegid()}'"))
    assert (str(sock), 0, "shared", 0) not in opened
    assert unixsock.file_id(str(sock)) == ident                 # the same file, not re-bound
    assert stat.S_IMODE(os.lstat(sock).st_mode) == 0o640
    # Someone swaps the file for a symlink: a reload changes nothing through it.
    target = tmp_path / "target"
    target.write_text("x")
    target.chmod(0o600)
    os.rename(sock, tmp_path / "moved.sock")
    sock.symlink_to(target)
    assert ident is not None
    unixsock.set_access(_cfg(sock, ", permissions: '0666'").listeners[0], ident)
    assert stat.S_IMODE(os.stat(target).st_mode) == 0o600
    ls.close_all()
    assert sock.is_symlink()                                    # not ours: not removed
