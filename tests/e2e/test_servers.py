"""Real servers upgraded again and again under load: not one request may fail.

Each test runs an example from config/examples/ (moved to a free port), sends
HUPs one after the other under HTTP load, and checks that no request failed and
that, once each old generation has retired, every answer comes from the new one.
The load is either a new connection per request (10 reloads), or keep-alive
connections (5 reloads) on which every answer must be to the request just sent
(sequence number and client port, echoed by the app) and every close must be
announced by `Connection: close`. The worker-bind example runs in its own
network namespace (tests/e2e/test_worker_bind.py).
"""

from __future__ import annotations

import shutil
import socket

import pytest

from tests.support.keepalive import Answer, KeepAliveLoad, read_response
from tests.support.reloads import Report, example_config, reload_under_load, start_example
from tests.support.upgraderd_proc import Daemon, free_port

pytestmark = pytest.mark.e2e

# Each zero-drop test reloads 10 times (20 before, twice the time for the same checks);
# long reload runs are bench/examples_drain.py's and bench/soak.py's.
RELOADS = 10
KEEPALIVE_RELOADS = 5
KEEPALIVE_CLIENTS = 16
LOOP_MODULE = {"asyncio": "asyncio.unix_events", "uvloop": "uvloop"}
needs_node = pytest.mark.skipif(shutil.which("node") is None,
                                reason="node is not installed (scripts/test installs it)")


def assert_zero_drop(report: Report, server: str, reloads: int = RELOADS) -> None:
    """Assert no failed request, `reloads` reloads, and only new-generation answers after each."""
    result = report.result
    assert result.failures == {}, (result.failures, result.examples)
    assert len(report.generations) == reloads
    for gen in report.generations:
        assert report.stale[gen] == {}, f"generation {gen}: answers from an old generation"
        assert report.fresh[gen] > 0
    assert result.bodies and all(f"server={server} " in body for body in result.bodies)
    print(f"\n{server}: {result.ok} requests over {reloads} reloads, failures {result.failures}")


@pytest.mark.parametrize("name, server, args", [
    ("gunicorn", "gunicorn", {}),
    ("uvicorn", "uvicorn", {"loop": "uvloop"}),
    ("uvicorn", "uvicorn", {"loop": "asyncio"}),
    ("python_worker", "python-worker", {}),
], ids=["gunicorn", "uvicorn-uvloop", "uvicorn-asyncio", "python_worker"])
def test_python_server_zero_drop(tmp_path, name, server, args):
    port = free_port()
    with start_example(tmp_path, name, port, **args) as d:
        assert_zero_drop(reload_under_load(d, port, RELOADS), server)
        log = d.log()
        assert "SIGKILL" not in log
        if "loop" in args:
            assert f" on {LOOP_MODULE[args['loop']]}\n" in log, "uvicorn ran on another loop"


def assert_keepalive_drain(tmp_path, name: str, server: str, **args: str) -> str:
    """Reload under keep-alive load; assert nothing lost and only announced closes; return the log."""
    port = free_port()
    with start_example(tmp_path, name, port, **args) as d:
        load = KeepAliveLoad("127.0.0.1", port, clients=KEEPALIVE_CLIENTS, max_seconds=300)
        report = reload_under_load(d, port, KEEPALIVE_RELOADS, load=load)
        log = d.log()
    assert_zero_drop(report, server, KEEPALIVE_RELOADS)
    assert load.unannounced == 0, "a connection ended without Connection: close"
    # Each drain tells every client to reconnect, through the answer to its next request.
    assert load.announced >= KEEPALIVE_CLIENTS * KEEPALIVE_RELOADS, load.announced
    assert load.connections == KEEPALIVE_CLIENTS + load.announced
    assert "SIGKILL" not in log
    print(f"{server} keep-alive: {load.announced} announced closes, 0 unannounced")
    return log


@pytest.mark.parametrize("loop", ["asyncio", "uvloop"])
def test_uvicorn_keepalive_drain_loses_nothing(tmp_path, loop):
    log = assert_keepalive_drain(tmp_path, "uvicorn", "uvicorn", loop=loop)
    assert f" on {LOOP_MODULE[loop]}\n" in log, "uvicorn ran on another loop"


@needs_node
def test_node_keepalive_drain_loses_nothing(tmp_path):
    assert_keepalive_drain(tmp_path, "node", "node")


@needs_node
def test_node_zero_drop_with_http_readiness(tmp_path):
    port = free_port()
    with start_example(tmp_path, "node", port) as d:
        assert_zero_drop(reload_under_load(d, port, RELOADS), "node")
        log = d.log()
        assert "SIGKILL" not in log
        # Readiness came from the HTTP probes: each generation became ACTIVE with no READY=1.
        assert "notify message" not in log


GRACE = 3.0


def with_idle_grace(name: str, port: int, seconds: float, **args: str) -> dict[str, object]:
    """Return the example's config with its idle grace set to `seconds`."""
    if name == "uvicorn":
        return example_config(name, port, idle_grace=str(seconds), **args)
    cfg = example_config(name, port, **args)
    cfg["workers"]["command"][-1] = str(int(seconds * 1000))  # type: ignore[index]
    return cfg


def keepalive_request(sock: socket.socket, seq: int) -> Answer:
    """Send request `seq` on `sock` and return its answer."""
    sock.sendall(f"GET /seq/0/{seq} HTTP/1.1\r\nHost: test\r\n\r\n".encode())
    return read_response(sock, bytearray())


@pytest.mark.parametrize("name, args", [
    ("uvicorn", {"loop": "uvloop"}),
    ("uvicorn", {"loop": "asyncio"}),
    pytest.param("node", {}, marks=needs_node),
], ids=["uvicorn-uvloop", "uvicorn-asyncio", "node"])
def test_draining_keeps_idle_connections_for_the_grace_then_closes_them(tmp_path, name, args):
    """An idle keep-alive connection still gets an answer after the drain starts; a silent one gets EOF."""
    port = free_port()
    with Daemon(tmp_path, with_idle_grace(name, port, GRACE, **args)).start() as d:
        talker, silent = (socket.create_connection(("127.0.0.1", port), timeout=30) for _ in range(2))
        for sock in (talker, silent):
            first = keepalive_request(sock, 1)
            assert not first.closes and b"generation=1 " in first.body
        d.hup()
        d.wait_log(r"generation 1 ACTIVE -> DRAINING")
        # Idle when the drain began, yet requests sent during the grace are answered by
        # the old generation, the first one after the worker got its drain signal with the
        # announcement that the connection closes. (The signal is asynchronous: a request
        # or two may still get a keep-alive answer.)
        seq = 2
        while not (last := keepalive_request(talker, seq)).closes and seq < 5000:
            assert b"generation=1 " in last.body
            seq += 1
        assert last.closes and b"generation=1 " in last.body and f" path=/seq/0/{seq}".encode() in last.body
        assert talker.recv(1) == b""
        assert silent.recv(1) == b"", "the silent connection was not closed cleanly"
        d.wait_log(r"generation 1 DRAINING -> RETIRED", timeout=20)   # drain.timeout is 30 s
        talker.close()
        silent.close()
        assert "SIGKILL" not in d.log()
