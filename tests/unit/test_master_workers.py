"""Master.spawn_worker and readiness with fake processes: argv, env, probes, stranger notify."""

from __future__ import annotations

from pathlib import Path

from tests.support.fakes import FakeNotify, FakeProcessAPI, fake_system
from tests.support.upgraderd_proc import free_port as _free_port
from upgraderd.core.generation import GenerationState, WorkerState
from upgraderd.core.master import Master, assemble


def _master(tmp_path, ready: str):
    port = _free_port()
    path = tmp_path / "u.yaml"
    path.write_text(f"""\
listeners:
  - {{name: web, port: {port}}}
  - {{name: pub, port: {port + 1 if port < 65535 else port - 1}, mode: worker-bind}}
workers:
  count: 2
  command: [/bin/true, "--fd={{fd:web}}", "--bind={{addr:pub}}", "s{{slot}}g{{generation}}"]
ready: {ready}
kernel: {{tcp_migrate_req: ignore}}
""")
    procs, note = FakeProcessAPI(), FakeNotify()
    clock = [100.0]
    m = assemble(str(path), fake_system(procs, note), clock=lambda: clock[0])
    m.start()
    return m, procs, note


def test_spawn_expands_argv_and_sets_the_worker_env(tmp_path):
    m, procs, _ = _master(tmp_path, "{mode: notify}")
    try:
        assert procs.pids() == [1000, 1001]
        for sp in procs.spawns:
            argv, env, fds, cwd = list(sp.argv), sp.env, sp.fds, sp.cwd
            slot = env["UPGRADERD_SLOT"]
            pub = m.config.listeners[1].address
            assert argv == ["/bin/true", "--fd=3", f"--bind={pub}", f"s{slot}g1"]
            assert env["LISTEN_FDS"] == "1" and env["LISTEN_FDNAMES"] == "web"
            assert env["UPGRADERD_WORKER_BIND"] == "pub" and env["UPGRADERD_ADDR_PUB"] == pub
            assert env["NOTIFY_SOCKET"] == FakeNotify.address
            assert len(fds) == 1 and cwd is None
        assert m.system.probes.pids() == set()
        # `ignore` still reads the setting (for the metric), and the config has a worker-bind listener.
        host_value = int(Path("/proc/sys/net/ipv4/tcp_migrate_req").read_text())  # not via kernel.read_int
        assert m.slots.tcp_migrate_req == host_value
        assert m.snapshot(100.0).worker_bind_reset_risk is (host_value != 1)
    finally:
        m.system.listeners.close_all()
        m.system.probes.close()


def test_stranger_and_garbage_notify_are_counted_and_ignored(tmp_path):
    m, procs, note = _master(tmp_path, "{mode: notify}")
    try:
        gen = m.starting
        note.send(4242)
        note.send(1000, b"\x00garbage")
        note.send(1000)
        m.fleet.read_notify(101.0)
        assert m.stats.notify_rejected == 2
        assert gen.workers[0].state is WorkerState.READY
        assert gen.workers[1].state is WorkerState.STARTING
        note.send(4242)
        m.fleet.read_notify(101.0)
        assert m.stats.notify_rejected == 3
        assert gen.state is GenerationState.STARTING
    finally:
        m.system.listeners.close_all()
        m.system.probes.close()


def test_http_mode_probes_each_worker_and_ignores_ready_1(tmp_path):
    m, procs, note = _master(tmp_path, "{mode: http, url: 'http://127.0.0.1:{probe_port}/h'}")
    try:
        assert m.system.probes.pids() == {1000, 1001}
        ports = {procs.spawn_of(pid).env["UPGRADERD_PROBE_PORT"] for pid in (1000, 1001)}
        assert len(ports) == 2
        note.ready(1000, 1001)
        m.fleet.read_notify(101.0)
        assert m.stats.notify_rejected == 0
        assert m.starting is not None and m.starting.workers[0].state is WorkerState.STARTING
        # A worker that is no longer starting is no longer probed.
        m.starting.workers[0].state = WorkerState.DRAINING
        m.fleet.poll_probes(101.0)
        assert m.system.probes.pids() == {1001}
    finally:
        m.system.listeners.close_all()
        m.system.probes.close()
