"""A trusted giver is bounded too, and the channel lives where only our user reaches (issue 25).

Real Unix and TCP sockets in one process, a fake clock, no daemon.
"""

from __future__ import annotations

import os
import socket
import stat

import pytest

from tests.os.test_handoff_channel import MASTER, closed, connect, send_fd, taker, tcp_pair  # noqa: F401
from upgraderd.system import channeldir
from upgraderd.contract import env as contract, wire
from upgraderd.worker import handoff


def offer(t: handoff.Taker, s: socket.socket, fd: int, size: int) -> None:
    """Send one offer of `size` payload bytes, letting the taker read as it goes."""
    msgs = wire.encode_offer("web", b"", b"", b"x" * size)
    send_fd(s, msgs[0], fd)
    for msg in msgs[1:]:
        s.send(msg)
        t.poll()  # a socket buffer holds a few 32 KiB messages only


def test_a_giver_holding_more_than_the_pending_bytes_is_dropped(taker, tcp_pair):  # noqa: F811
    t, _ = taker
    s = connect(t)
    t.poll()
    for _ in range(2):  # two of the largest offers: exactly the limit
        offer(t, s, tcp_pair[1].fileno(), wire.MAX_PAYLOAD)
        assert s.recv(100) == wire.encode(wire.ACK, wire.TAKES_BATCHES)
    assert t.failures == {}
    send_fd(s, wire.encode_offer("web", b"", b"", b"y")[0], tcp_pair[1].fileno())
    assert t.poll() == []
    assert t.failures == {"malformed": 1}
    assert closed(s)


def test_an_idle_giver_is_closed_after_the_idle_timeout(taker):  # noqa: F811
    t, clock = taker
    s = connect(t)
    t.poll()
    clock.advance(9)
    t.poll()
    assert t.failures == {}
    clock.advance(2)
    t.poll()
    assert t.failures == {"idle_giver": 1}
    assert closed(s)


def test_a_full_house_makes_room_by_closing_the_longest_idle_giver(monkeypatch, tcp_pair):  # noqa: F811
    from tests.support.fakes import FakeClock
    monkeypatch.setenv("UPGRADERD_GENERATION", "2")
    monkeypatch.setenv("UPGRADERD_SLOT", "1")
    clock = FakeClock(100.0)
    t = handoff.Taker(["web"], master=MASTER, trust=lambda p: True, max_peers=2, clock=clock)
    try:
        first = connect(t)
        t.poll()
        clock.advance(1)
        second = connect(t)
        t.poll()
        third = connect(t)
        t.poll()
        assert t.failures == {"idle_giver": 1}
        assert closed(first)
        send_fd(third, wire.encode_offer("web", b"", b"", b"")[0], tcp_pair[1].fileno())
        t.poll()
        assert third.recv(100) == wire.encode(wire.ACK, wire.TAKES_BATCHES)
        second.close()
    finally:
        t.close()


def test_the_channel_directory_is_private_fresh_and_kept_only_if_ours(tmp_path, monkeypatch):
    monkeypatch.setenv("TMPDIR", str(tmp_path))
    import tempfile
    monkeypatch.setattr(tempfile, "tempdir", None)
    env: dict[str, str] = {}
    path = channeldir.prepare(env)
    try:
        st = os.lstat(path)
        assert stat.S_ISDIR(st.st_mode) and stat.S_IMODE(st.st_mode) == 0o700
        assert os.path.basename(path).startswith(f"upgraderd-{os.getpid()}-handoff-")
        assert env == {contract.HANDOFF_DIR: path}
        assert channeldir.prepare(env) == path  # a USR2 successor keeps it
        planted = tmp_path / f"upgraderd-{os.getpid()}-handoff-planted"
        planted.mkdir(mode=0o755)
        other = {contract.HANDOFF_DIR: str(planted)}
        assert channeldir.prepare(other) not in (str(planted), path)  # not 0700: not ours
        channeldir.remove(other[contract.HANDOFF_DIR])
    finally:
        channeldir.remove(path)
    assert not os.path.exists(path)


def test_a_channel_is_a_path_in_our_directory_and_only_there():
    d = "/tmp/upgraderd-42-handoff-abcd"
    name = wire.channel_name(42, 7, 3, d)
    assert name == f"{d}/handoff-7-3" and wire.address(name) == name.encode()
    assert wire.parse_name(name, 42, d) == wire.Channel(7, 3, name)
    # A worker told its directory ignores the old abstract names and every other directory.
    for bad in ("upgraderd-42-handoff-7-3", "/tmp/upgraderd-42-handoff-evil/handoff-7-3", f"{d}/other-7-3"):
        assert wire.parse_name(bad, 42, d) is None
    # Outside the master (no directory), a directory named for the master is listed.
    assert wire.parse_name(name, 42) == wire.Channel(7, 3, name)
    assert wire.parse_name(name, 43) is None


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to try the directory as another user")
def test_another_user_can_neither_bind_nor_connect_in_the_directory(tmp_path, monkeypatch):
    monkeypatch.setenv("UPGRADERD_GENERATION", "2")
    monkeypatch.setenv("UPGRADERD_SLOT", "0")
    env: dict[str, str] = {}
    import tempfile
    monkeypatch.setattr(tempfile, "tempdir", "/tmp")
    path = channeldir.prepare(env)
    monkeypatch.setenv(contract.HANDOFF_DIR, path)
    t = handoff.Taker(["web"], master=MASTER, trust=lambda p: True)
    try:
        assert t.name == f"{path}/handoff-2-0"
        pid = os.fork()
        if pid == 0:  # pragma: no cover - the child reports by its exit code
            code = 0
            try:
                os.setgid(65534)
                os.setuid(65534)
                for what in ("connect", "bind"):
                    s = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
                    try:
                        getattr(s, what)(t.name if what == "connect" else f"{path}/handoff-3-0")
                        code |= 1 if what == "connect" else 2
                    except PermissionError:
                        pass
            finally:
                os._exit(code)
        _, status = os.waitpid(pid, 0)
        assert os.waitstatus_to_exitcode(status) == 0
    finally:
        t.close()
        channeldir.remove(path)
    assert not os.path.exists(t.name)


def test_the_channel_directories_of_dead_masters_are_swept(tmp_path):
    dead = subprocess_pid_gone()
    (tmp_path / f"upgraderd-{dead}-handoff-abc").mkdir()
    (tmp_path / f"upgraderd-{os.getpid()}-handoff-def").mkdir()   # a live master's: kept
    (tmp_path / f"upgraderd-{dead}-other").mkdir()                  # not a channel directory: kept
    (tmp_path / f"upgraderd-{dead}-handoff-link").symlink_to(tmp_path)  # not a real directory: kept
    assert channeldir.sweep(str(tmp_path)) == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([
        f"upgraderd-{os.getpid()}-handoff-def", f"upgraderd-{dead}-other", f"upgraderd-{dead}-handoff-link"])


def subprocess_pid_gone() -> int:
    """Return the pid of a child that has exited and been reaped."""
    import subprocess
    import sys
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


MIB = 1 << 20


def test_givers_together_over_the_takers_total_are_refused_counted_and_keep_their_connections(monkeypatch):
    """Each giver is within its own limit; together they are not: the taker refuses what is over."""
    from tests.support.fakes import FakeClock
    monkeypatch.setenv("UPGRADERD_GENERATION", "2")
    monkeypatch.setenv("UPGRADERD_SLOT", "0")
    t = handoff.Taker(["web"], master=MASTER, trust=lambda p: True, max_held_bytes=3 * MIB, clock=FakeClock(1.0))
    with socket.create_server(("127.0.0.1", 0)) as ls:
        pairs = []
        for _ in range(5):
            client = socket.create_connection(ls.getsockname())
            pairs.append((client, ls.accept()[0]))
    peers = [connect(t) for _ in range(4)]
    try:
        t.poll()
        for s, (_, server) in zip(peers[:3], pairs):   # three givers, 1 MiB each: exactly the total
            offer(t, s, server.fileno(), MIB)
            assert s.recv(100) == wire.encode(wire.ACK, wire.TAKES_BATCHES)
        assert t.held == 3 * MIB and t.failures == {}
        offer(t, peers[3], pairs[3][1].fileno(), MIB)  # a fourth: read to its end, refused, not kept
        assert peers[3].recv(100) == wire.encode(wire.REFUSE, "over_capacity")
        assert t.held == 3 * MIB and t.failures == {"over_capacity": 1}
        # A real giver over the total: a failed give, and the connection is still its own.
        monkeypatch.setenv("UPGRADERD_GENERATION", "1")
        _, server = pairs[4]
        assert not give_polling(t, server, MIB)
        assert t.failures == {"over_capacity": 2} and t.held == 3 * MIB
        server.sendall(b"still ours")
        assert pairs[4][0].recv(100) == b"still ours"
        # Nobody was dropped for it: a COMMIT frees room, and the same connection then moves.
        peers[0].send(wire.encode(wire.COMMIT))
        moved = t.poll()
        assert [len(h.unsent) for h in moved] == [MIB] and t.held == 2 * MIB
        assert give_polling(t, server, MIB)
        assert t.failures == {"over_capacity": 2}
        for h in moved:
            h.sock.close()
    finally:
        for s in peers:
            s.close()
        for h in t.close():
            h.sock.close()
        for client, server in pairs:
            client.close()
            server.close()


def give_polling(t: handoff.Taker, server: socket.socket, size: int) -> bool:
    """Give `server` with `size` unsent bytes from a fresh giver while the taker polls; return give()'s answer."""
    import threading
    giver = handoff.Giver(master=MASTER, trust=lambda p, c: True, timeout=5)
    assert giver.find() == 1
    got: list[handoff.Handed] = []
    done = threading.Event()

    def take() -> None:
        while not done.is_set():
            got.extend(t.poll())
    th = threading.Thread(target=take)
    th.start()
    try:
        ok = giver.give(handoff.Handed(server, "web", b"", b"", b"z" * size))
    finally:
        done.set()
        th.join()
        giver.close()
    got.extend(t.poll())
    assert giver.failures == ({} if ok else {"refused": 1}), giver.failures
    assert [len(h.unsent) for h in got] == ([size] if ok else [])
    for h in got:
        h.sock.close()
    return bool(ok)


def test_a_refusal_over_capacity_is_counted_and_logged_by_the_worker(capsys):
    from upgraderd.apps.connmetrics import ConnectionMetrics
    m = ConnectionMetrics(["web"], enabled=False)
    m.handoff_failed("over_capacity", 2)
    m.handoff_failed("refused", 1)
    assert m._failures == {"over_capacity": 2, "refused": 1}
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and " WARNING refused 2 hand-off offer(s) over capacity: " in err[0], err
    assert "more than 32 MiB" in err[0] and "the givers keep those connections" in err[0]
