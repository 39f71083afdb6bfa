"""The config pipeline under fuzzing: generate, check, start, reload, over the fake process layer.

`configs` generates config documents whose every field is either a value a
real operator would write or a hostile one (NUL bytes, surrogates, non-ASCII
digits, huge or non-finite numbers, wrong types), and now and then a whole
hostile text (an alias bomb, a recursive alias, a file over the size cap).
`run_sequence` applies a list of them to one Master: the first is started,
each later one is written and rolled with SIGHUP. It asserts that

- the Master never raises out of `start()` or `step()`;
- `check` and the master agree: a config `check` accepts is never `rejected`
  by a reload, and one it rejects is rejected with exactly check's problems.

Only loopback addresses in 127.13.0.0/16 are ever bound (nobody else's port
group can be joined), and `kernel.tcp_migrate_req: set` is never generated:
it would write the host's sysctl.
"""

from __future__ import annotations

import signal
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from hypothesis import strategies as st

from tests.support.fakes import FakeClock, FakeNotify, FakeProcessAPI, fake_system
from upgraderd.config import schema as configmod
from upgraderd.core.generation import GenerationState as G, WorkerState as W
from upgraderd.core.master import Master, assemble
from upgraderd.errors import ConfigError

T0 = 100.0


def build_master(path: Path, procs: FakeProcessAPI, clock: FakeClock, notify: FakeNotify) -> Master:
    """Return a Master for `path` over the fakes (the one place that knows its constructor)."""
    return assemble(str(path), fake_system(procs, notify), clock=clock)


def check(path: Path) -> ConfigError | None:
    """Run what `upgraderd check` runs; return its error, or None if the config is accepted."""
    try:
        configmod.load(str(path))
    except ConfigError as e:
        return e
    return None


# -- values: (fine, hostile) per kind --

NUL, SURROGATE = "a\0b", "\ud800"
hostile_text = st.sampled_from([NUL, SURROGATE, "\u0663", "\u00b2", "", " ", "\x85", "\ufeff", "x" * 300])
hostile_number = st.sampled_from([0, -1, -(10 ** 30), 10 ** 30, 10 ** 400, 65536, 1.5, 1e308,
                                  float("inf"), float("-inf"), float("nan"), True, None, [], {}])
anything_bad = st.one_of(hostile_text, hostile_number)


class Mixer:
    """Draw fine values, and a hostile one with probability 1/rate (never with rate 0)."""

    def __init__(self, draw: st.DrawFn, rate: int) -> None:
        self.draw, self.rate = draw, rate

    def __call__(self, fine: st.SearchStrategy[Any], bad: st.SearchStrategy[Any] = anything_bad) -> Any:
        if self.rate and self.draw(st.integers(0, self.rate - 1)) == 0:
            return self.draw(bad)
        return self.draw(fine)


durations = st.one_of(st.integers(0, 120), st.floats(0, 60, allow_nan=False),
                      st.sampled_from(["0ms", "500ms", "1s", "2m", "1h", "8760h", "0.25s", 31536000]))
bad_durations = st.sampled_from(["8761h", "1e309", 10 ** 400, -1, "-5s", "\u0663s", float("nan"),
                                 float("inf"), 1e308, "99999999999999999999h", "1 sec", True])
env_values = st.one_of(st.text(max_size=8), st.integers(-5, 5), st.booleans(), st.floats(allow_nan=True))
commands = st.sampled_from([["/bin/true"], "/bin/true -x", [sys.executable, "-c", "pass", 3, 1.5],
                            ["/bin/true", "{slot}", "{generation}", "{{lit}}"], ["true", "caf\u00e9"]])
bad_commands = st.sampled_from([["/bin/true", NUL], [SURROGATE], ["/bin/true", SURROGATE], [], "",
                                "no-such-program-x", ["/etc/hostname"], ["/bin/true", "{fd:nope}"],
                                ["/bin/true", "{"], [["nested"]], 7])
users = st.sampled_from(["root", "nobody", "0", 0, 65534, "daemon"])
bad_users = st.sampled_from(["\u0663", "\u00b2\u00b3", "root\0", "no-such-user-x", 10 ** 20, -1, "", True])


@st.composite
def listener(draw: st.DrawFn, hosts: list[str], mix: Mixer, i: int, port: int) -> dict[str, Any]:
    doc: dict[str, Any] = {
        "name": mix(st.sampled_from([f"l{i}", f"web-{i}", f"A.b_{i}"])), "host": mix(st.sampled_from(hosts),
                                                   st.sampled_from(["::1%\0", "fe80::1%\u0663",
                                                                    "999.1.1.1", "", "localhost"])),
        "port": mix(st.just(port), hostile_number),
    }
    if draw(st.booleans()):
        doc["mode"] = mix(st.sampled_from(["reuseport", "shared", "worker-bind"]))
    if draw(st.booleans()):
        doc["backlog"] = mix(st.integers(1, 65535), hostile_number)
    return doc


@st.composite
def workers(draw: st.DrawFn, mix: Mixer) -> dict[str, Any]:
    # The maximum, 1024, now and then: a master with 1024 fake workers takes ~0.5 s a step.
    big = draw(st.integers(0, 99)) == 57  # not 0: hypothesis favours the bounds
    doc: dict[str, Any] = {"count": mix(st.just(1024) if big else st.integers(1, 4), hostile_number)}
    if draw(st.integers(0, 9)) < 8:
        doc["app"] = mix(st.sampled_from(["echo", "http"]))
        if draw(st.booleans()):
            doc["threads"] = mix(st.integers(1, 256), hostile_number)
    else:
        doc["command"] = mix(commands, bad_commands)
    if draw(st.integers(0, 3)) == 0:
        keys = draw(st.lists(st.from_regex(r"[A-Z_][A-Z0-9_]{0,6}", fullmatch=True), max_size=3))
        doc["env"] = {k: mix(env_values, hostile_text) for k in keys}
    if draw(st.integers(0, 3)) == 0:
        doc["cwd"] = mix(st.sampled_from(["/", "/tmp", "."]), st.sampled_from(["/no/such", "/tmp\0", SURROGATE]))
    if draw(st.integers(0, 3)) == 0:
        doc["user"] = mix(users, bad_users)
    if draw(st.integers(0, 3)) == 0:
        doc["group"] = mix(st.sampled_from(["root", "nogroup", 0]), bad_users)
    return doc


@st.composite
def sections(draw: st.DrawFn, mix: Mixer) -> dict[str, Any]:
    mode = mix(st.sampled_from(["notify", "notify", "delay", "http"]))
    doc: dict[str, Any] = {
        "ready": {"mode": mode, "timeout": mix(durations, bad_durations),
                  "after": mix(durations, bad_durations)},
        "drain": {"signal": mix(st.sampled_from(["TERM", "SIGQUIT", "int", "USR2"])),
                  "timeout": mix(durations, bad_durations)},
        "restart": {"backoff": mix(durations, bad_durations),
                    "max_backoff": mix(durations, bad_durations),
                    "crash_loop": mix(st.integers(1, 1000), hostile_number)},
        "metrics": {"listen": mix(st.sampled_from(["127.0.0.1:9108", "[::1]:1", "localhost:65535", None])),
                    "dir": mix(st.just("/tmp/upgraderd-fuzz-metrics"),
                                    st.sampled_from(["/etc/hostname", "/tmp/m\0", SURROGATE]))},
        "log": {"format": mix(st.sampled_from(["text", "json"])),
                "level": mix(st.sampled_from(["debug", "info", "error"])),
                "file": mix(st.sampled_from(["fuzz.log", "./fuzz.log"]), hostile_text)},
        "kernel": {"tcp_migrate_req": mix(st.sampled_from(["check", "ignore"]),
                                               st.sampled_from(["SET", "yes", NUL]))},
    }
    if mode == "http":
        doc["ready"]["url"] = mix(st.sampled_from([
            "http://127.0.0.1:{probe_port}/healthz", "http://localhost:{probe_port}/a?b=1",
            "http://[::1]:{probe_port}/"]), st.sampled_from([
                "http://127.0.0.1:1/\0", "http://127.0.0.1:1/a b", "https://127.0.0.1/",
                "http://example.invalid/", "http://127.0.0.1:{nope}/"]))
    for key in list(doc):
        if draw(st.integers(0, 2)) == 0:
            del doc[key]  # the defaults are part of what is fuzzed
    return doc


@st.composite
def configs(draw: st.DrawFn, hosts: list[str]) -> str:
    """Return the text of one config file, mostly well-formed and sometimes hostile."""
    whole = draw(st.integers(0, 39))
    if whole == 0:
        return "a0: &a0 [x, x, x, x, x, x, x, x, x, x]\n" + "".join(
            f"a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * 10)}]\n" for i in range(1, 7)) + "listeners: *a6\n"
    if whole == 1:
        return "listeners: &l [*l]\n"
    # Two configs in three are all fine; the others have one or two hostile values.
    mix = Mixer(draw, draw(st.sampled_from([0, 0, 0, 0, 12, 24])))
    ports = draw(st.lists(st.integers(1, 65535), min_size=1, max_size=3, unique=True))
    doc: dict[str, Any] = {"listeners": [draw(listener(hosts, mix, i, p)) for i, p in enumerate(ports)],
                           "workers": draw(workers(mix)), **draw(sections(mix))}
    if draw(st.integers(0, 19)) == 0:
        doc[draw(st.sampled_from(["listners", "pidfile", "extra"]))] = mix(st.just("x.pid"))
    text = yaml.safe_dump(doc, sort_keys=False, allow_unicode=draw(st.booleans()))
    if whole == 2:
        text += "#" + "x" * configmod.MAX_BYTES + "\n"
    return text


# -- driving one Master --

@dataclass
class Tally:
    """What a run applied, for the report."""

    accepted: int = 0
    rejected: int = 0
    outcomes: dict[str, int] = field(default_factory=dict)


def settle(master: Master, procs: FakeProcessAPI, notify: FakeNotify, clock: FakeClock) -> None:
    """Script READY (or the clock) for the STARTING generation and retire the old ones."""
    for _ in range(6):
        starting = master.starting
        if starting is not None:
            mode = starting.config.ready.mode
            pids = list(starting.pids())
            if mode == "notify":
                notify.ready(*pids)
            clock.advance(0.001 if mode == "notify" else
                          (starting.config.ready.after if mode == "delay" else 0.0) + 0.001)
            if mode == "http":
                clock.advance(starting.config.ready.timeout)  # nothing answers a fake worker's probe
        for g in master.generations:
            if g.state is G.ACTIVE and g.config.ready.mode == "notify":  # respawned workers
                notify.ready(*[p for p, w in g.pids().items() if w.state is W.STARTING])
            if g.state in (G.DRAINING, G.FAILED):
                for pid in g.pids():
                    if pid in procs.live():
                        procs.exit(pid, signal=signal.SIGTERM)
        master.step(set())
        if master.starting is None and all(g.state is G.ACTIVE for g in master.generations):
            return


def crash_one(master: Master, procs: FakeProcessAPI, notify: FakeNotify, clock: FakeClock) -> None:
    """Crash one worker of the ACTIVE generation and let the respawn back-off run its course."""
    gen = master.active
    if gen is None or not gen.pids():
        return
    restarts = master.stats.worker_restarts
    procs.exit(next(iter(gen.pids())), code=1)
    master.step(set())  # reaped: the slot backs off by restart.backoff (crash_loop 1 gives it up)
    clock.advance(gen.config.restart.max_backoff + 0.001)
    master.step(set())
    expected = restarts + (1 if gen.config.restart.crash_loop > 1 else 0)
    assert master.stats.worker_restarts == expected, (master.stats.worker_restarts, expected)
    settle(master, procs, notify, clock)


def run_sequence(workdir: Path, texts: list[str], tally: Tally) -> None:
    """Start the first config and reload each later one; assert the master and check agree."""
    path = workdir / "upgraderd.yaml"
    procs, clock, notify = FakeProcessAPI(), FakeClock(T0), FakeNotify()
    master = build_master(path, procs, clock, notify)
    try:
        path.write_text(texts[0], encoding="utf-8")
        verdict = check(path)
        if verdict is not None:
            tally.rejected += 1
            try:
                master.start()
            except ConfigError as e:
                assert e.problems == verdict.problems
                return
            raise AssertionError("check rejected the config, start accepted it")
        tally.accepted += 1
        master.start()
        settle(master, procs, notify, clock)
        crash_one(master, procs, notify, clock)
        for text in texts[1:]:
            if master.stopping:
                return  # generation 1 failed (e.g. ready.timeout 0): the master stops, as it should
            reload_once(master, path, text, tally, (procs, notify, clock))
    finally:
        master.system.listeners.close_all()


def reload_once(master: Master, path: Path, text: str, tally: Tally,
                fakes: tuple[FakeProcessAPI, FakeNotify, FakeClock]) -> None:
    """Write `text`, step with SIGHUP and compare the reload's outcome with check's verdict."""
    path.write_text(text, encoding="utf-8")
    verdict = check(path)
    before = dict(master.stats.reloads)
    master.step({signal.SIGHUP})
    settle(master, *fakes)
    result = master.stats.last_reload_result
    assert sum(master.stats.reloads.values()) == sum(before.values()) + 1, master.stats.reloads
    tally.outcomes[result] = tally.outcomes.get(result, 0) + 1
    if verdict is None:
        tally.accepted += 1
        assert result != "rejected", f"check accepted it, the reload rejected it:\n" \
                                     f"{master.stats.last_reload_error}"
    else:
        tally.rejected += 1
        assert result == "rejected" and master.stats.last_reload_error == str(verdict), \
            (result, master.stats.last_reload_error, str(verdict))


@st.composite
def sequences(draw: st.DrawFn) -> list[str]:
    """Return 1 to 3 config texts for one master: a start and up to two reloads."""
    net = draw(st.integers(0, 255))
    hosts = [f"127.13.{net}.1", f"127.13.{net}.2"]  # a few shared hosts: reloads keep, open and close
    return [draw(configs(hosts)) for _ in range(draw(st.integers(1, 3)))]
