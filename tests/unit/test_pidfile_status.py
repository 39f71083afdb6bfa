"""The pidfile and its lock, the status document, the start-up report and JSON log lines."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys

import pytest

from tests.support.upgraderd_proc import wait_until
from upgraderd.service import status
from upgraderd.config.schema import LogSpec
from upgraderd.service.logsetup import JsonFormatter, LogSetup
from upgraderd.service.pidfile import AlreadyRunning, NotRunning, PidFile, find_master, read_pid
from upgraderd.service.reporting import StartupReport


def test_lock_refuses_a_second_master_and_names_the_first(tmp_path):
    first = PidFile(str(tmp_path / "u.pid"))
    assert first.acquire() is None
    assert (tmp_path / "u.pid.lock").read_text() == f"{os.getpid()}\n"
    assert not (tmp_path / "u.pid").exists()  # written only once serving
    with pytest.raises(AlreadyRunning) as e:
        PidFile(str(tmp_path / "u.pid")).acquire()
    assert e.value.pid == os.getpid()
    assert str(e.value) == f"already running (pid {os.getpid()}); pidfile {tmp_path / 'u.pid'}"
    first.write()
    assert read_pid(str(tmp_path / "u.pid")) == os.getpid()
    first.remove()
    assert not (tmp_path / "u.pid").exists()
    assert PidFile(str(tmp_path / "u.pid")).acquire() is None  # the lock was released


def test_stale_pidfile_is_reported_and_not_removed_if_not_ours(tmp_path):
    (tmp_path / "u.pid").write_text("999999999\n")
    p = PidFile(str(tmp_path / "u.pid"))
    assert p.acquire() == (f"stale pidfile {tmp_path / 'u.pid'} (pid 999999999 is not running); "
                           "it will be replaced once this master serves")
    p.remove()
    assert (tmp_path / "u.pid").read_text() == "999999999\n"


@pytest.mark.parametrize("content, why", [
    (None, "does not exist"),
    ("garbage\n", "does not hold a pid"),
    ("999999999\n", "pid 999999999 in {p} does not hold {p}.lock (stale pidfile)"),
])
def test_find_master_explains_why_none_is_running(tmp_path, content, why):
    p = tmp_path / "u.pid"
    if content is not None:
        p.write_text(content)
    with pytest.raises(NotRunning) as e:
        find_master(str(p))
    assert str(e.value).endswith(why.format(p=p))


DOC = {
    "pid": 42, "version": "1.0", "config": "/etc/upgraderd.yaml", "started_at": 1000.0,
    "listeners": [{"name": "web", "address": "127.0.0.1:80", "mode": "reuseport"}],
    "generations": [
        {"number": 3, "state": "DRAINING", "since": 4590.0, "created_at": 4000.0, "reason": "",
         "workers": [{"slot": 0, "pid": 300, "state": "DRAINING", "started_at": 4000.0},
                     {"slot": 1, "pid": None, "state": "EXITED", "started_at": 4000.0}]},
        {"number": 4, "state": "ACTIVE", "since": 4590.0, "created_at": 4589.0, "reason": "",
         "workers": [{"slot": 0, "pid": 400, "state": "READY", "started_at": 4589.0}]},
    ],
    "reloads": {"success": 3, "failed": 1, "rejected": 0}, "hups": 5,
    "last_reload": {"result": "failed", "generation": 5, "covers": 5,
                    "error": "generation 5: slot 0 (pid 500) exited at start-up: exit code 3"},
}


def test_status_renders_generations_workers_ages_and_the_last_reload():
    assert status.render(DOC, now=4600.0) == (
        "master pid 42, up 1h00m (upgraderd 1.0)\n"
        "config /etc/upgraderd.yaml\n"
        "listener web 127.0.0.1:80 (reuseport)\n"
        "generation 3 DRAINING for 10s, age 10m00s, 1 worker(s)\n"
        "  slot 0  pid 300  DRAINING  age 10m00s\n"
        "  slot 1  pid -  EXITED  age 10m00s\n"
        "generation 4 ACTIVE for 10s, age 11s, 1 worker(s)\n"
        "  slot 0  pid 400  READY  age 11s\n"
        "last reload: failed: generation 5 did not become ACTIVE (the old one keeps serving)\n"
        "generation 5: slot 0 (pid 500) exited at start-up: exit code 3\n"
        "reloads: 3 succeeded, 1 failed, 0 rejected\n")


def test_status_file_is_replaced_atomically(tmp_path):
    path = str(tmp_path / "s.json")
    status.write(path, DOC)
    assert status.read(path) == DOC
    assert sorted(os.listdir(tmp_path)) == ["s.json"]  # no temporary file left behind
    (tmp_path / "s.json").write_text("{truncated")
    assert status.read(path) is None


def test_a_starting_workers_readiness_alone_waits_for_the_next_write():
    starting = {**DOC, "generations": [*DOC["generations"], {
        "number": 5, "state": "STARTING", "since": 4590.0, "created_at": 4590.0, "reason": "",
        "workers": [{"slot": 0, "pid": None, "state": "STARTING", "started_at": 4590.0}]}]}

    def change(doc, **kv):
        gens = [dict(g) for g in doc["generations"]]
        gens[-1] = {**gens[-1], **kv}
        return {**doc, "generations": gens}

    def worker(doc, **kv):
        return change(doc, workers=[{**doc["generations"][-1]["workers"][0], **kv}])

    spawned = worker(starting, pid=501)
    ready = worker(spawned, state="READY")
    assert not status.only_readiness_changed(None, starting)
    assert not status.only_readiness_changed(starting, spawned)    # a pid is written at once
    assert status.only_readiness_changed(spawned, ready)            # READY waits ...
    assert not status.only_readiness_changed(spawned, change(ready, state="ACTIVE"))   # ... for ACTIVE
    assert not status.only_readiness_changed(ready, {**ready, "hups": 8})
    older = [dict(g) for g in ready["generations"]]
    older[0] = {**older[0], "workers": [{**older[0]["workers"][0], "state": "EXITED"}]}
    assert not status.only_readiness_changed(ready, {**ready, "generations": older})


def test_startup_report_sends_one_line_once():
    r, w = os.pipe()
    report = StartupReport(w)
    report.fail(1, "the first generation failed: why")
    report.ok()  # too late: the report is sent once
    assert report.done
    data = os.read(r, 4096)
    assert os.read(r, 4096) == b""  # the write end is closed
    os.close(r)
    assert json.loads(data) == {"ok": False, "code": 1, "error": "the first generation failed: why"}


def test_json_log_lines():
    rec = logging.LogRecord("upgraderd", logging.ERROR, __file__, 1, "reload failed:\n%s", ("a.yaml:1:2: x",), None)
    rec.created, rec.msecs = 0.0, 5.0
    doc = json.loads(JsonFormatter().format(rec))
    assert doc == {"time": "1970-01-01T00:00:00.005Z", "level": "error", "pid": os.getpid(),
                   "message": "reload failed:\na.yaml:1:2: x"}


def test_log_setup_switches_files_and_levels(tmp_path):
    root = logging.getLogger()
    saved = root.level, list(root.handlers)
    logs = LogSetup()
    try:
        logs.apply(LogSpec(file=str(tmp_path / "a.log"), level="warning"))
        logging.getLogger("upgraderd").info("hidden")
        logging.getLogger("upgraderd").warning("shown")
        logs.apply(LogSpec(file=str(tmp_path / "b.log"), format="json"))
        logging.getLogger("upgraderd").info("now json")
        with pytest.raises(OSError):
            logs.apply(LogSpec(file=str(tmp_path / "missing" / "c.log")))
        logging.getLogger("upgraderd").info("still b")
    finally:
        logs.close()
        root.setLevel(saved[0])
    assert (tmp_path / "a.log").read_text().endswith(" WARNING shown\n")
    assert "hidden" not in (tmp_path / "a.log").read_text()
    assert [json.loads(line)["message"] for line in (tmp_path / "b.log").read_text().splitlines()] == \
        ["now json", "still b"]
