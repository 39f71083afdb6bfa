"""net.ipv4.tcp_migrate_req: read, set where asked, warn when worker-bind is at risk (on a plain file)."""

from __future__ import annotations

from upgraderd.system import kernel


def _file(tmp_path, text: str):
    path = tmp_path / "tcp_migrate_req"
    path.write_text(text)
    return str(path)


def test_check_warns_about_worker_bind_listeners_and_names_the_fix(tmp_path):
    path = _file(tmp_path, "0\n")
    state = kernel.ensure_migrate_req("check", ["web", "api"], path)
    assert state.value == 0 and state.info == []
    assert state.warnings == [
        "net.ipv4.tcp_migrate_req=0: draining the worker-bind listener(s) web, api can reset "
        f"connections still queued on them. Fix: {kernel.FIX}"]
    assert open(path).read() == "0\n"


def test_check_is_quiet_without_worker_bind_or_when_already_1(tmp_path):
    assert kernel.ensure_migrate_req("check", [], _file(tmp_path, "0\n")).warnings == []
    state = kernel.ensure_migrate_req("check", ["web"], _file(tmp_path, "1\n"))
    assert state.value == 1 and state.warnings == []


def test_set_writes_1_and_says_so(tmp_path):
    path = _file(tmp_path, "0\n")
    state = kernel.ensure_migrate_req("set", ["web"], path)
    assert state.value == 1
    assert open(path).read() == "1\n"
    assert state.info == ["set net.ipv4.tcp_migrate_req=1 (was 0) in this network namespace"]
    assert state.warnings == []


def test_set_that_cannot_write_warns():
    # A read-only sysctl (mode 0444): writing it fails even for root, so nothing changes.
    path = "/proc/sys/kernel/ngroups_max"
    before = open(path).read()
    state = kernel.ensure_migrate_req("set", [], path)
    assert state.value == int(before)
    assert state.warnings == ["cannot set net.ipv4.tcp_migrate_req=1: Permission denied "
                              "(it needs root in this network namespace)"]
    assert open(path).read() == before


def test_missing_setting_is_reported_for_worker_bind(tmp_path):
    state = kernel.ensure_migrate_req("check", ["web"], str(tmp_path / "absent"))
    assert state.value is None
    assert state.warnings == [
        "net.ipv4.tcp_migrate_req is not available (Linux before 5.14?): draining the worker-bind "
        "listener(s) web can reset connections still queued on them"]


def test_ignore_reads_but_never_writes_or_warns(tmp_path):
    path = _file(tmp_path, "0\n")
    state = kernel.ensure_migrate_req("ignore", ["web"], path)
    assert (state.value, state.info, state.warnings) == (0, [], [])
    assert open(path).read() == "0\n"
