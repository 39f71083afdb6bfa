"""Real servers, unchanged, upgraded 20 times under load: not one request may fail.

Each test runs an example from config/examples/ (moved to a free port), sends 20
HUPs one after the other under connection-per-request HTTP load, and checks that
no request failed and that, once each old generation has retired, every answer
comes from the new one. The worker-bind example runs in its own network
namespace (tests/e2e/test_worker_bind.py).
"""

from __future__ import annotations

import shutil

import pytest

from tests.support.reloads import Report, reload_under_load, start_example
from tests.support.upgraderd_proc import free_port

pytestmark = pytest.mark.e2e

RELOADS = 20


def assert_zero_drop(report: Report, server: str) -> None:
    """Assert no failed request, 20 reloads, and only new-generation answers after each."""
    result = report.result
    assert result.failures == {}, (result.failures, result.examples)
    assert len(report.generations) == RELOADS
    for gen in report.generations:
        assert report.stale[gen] == {}, f"generation {gen}: answers from an old generation"
        assert report.fresh[gen] > 0
    assert result.bodies and all(f"server={server} " in body for body in result.bodies)
    print(f"\n{server}: {result.ok} requests over {RELOADS} reloads, failures {result.failures}")


@pytest.mark.parametrize("name, server", [
    ("gunicorn", "gunicorn"),
    ("uvicorn", "uvicorn"),
    ("python_worker", "python-worker"),
])
def test_python_server_zero_drop(tmp_path, name, server):
    port = free_port()
    with start_example(tmp_path, name, port) as d:
        assert_zero_drop(reload_under_load(d, port, RELOADS), server)
        assert "SIGKILL" not in d.log()


@pytest.mark.skipif(shutil.which("node") is None, reason="node is not installed (scripts/test installs it)")
def test_node_zero_drop_with_http_readiness(tmp_path):
    port = free_port()
    with start_example(tmp_path, "node", port) as d:
        assert_zero_drop(reload_under_load(d, port, RELOADS), "node")
        log = d.log()
        assert "SIGKILL" not in log
        # Readiness came from the HTTP probes: each generation became ACTIVE with no READY=1.
        assert "notify message" not in log
