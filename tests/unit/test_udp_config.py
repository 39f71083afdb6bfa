"""`protocol: udp` in the config: located errors, and what a UDP listener's identity is."""

from __future__ import annotations

import subprocess
import sys

import pytest

from tests.support import ROOT
from upgraderd.config import plan, schema
from upgraderd.core.seams import is_udp, key_for, keys_for
from upgraderd.errors import ConfigError
from upgraderd.service import cli

W = "workers: {app: echo, count: 2}\n"

# (id, config text, "line:column: key.path", a phrase the message must contain)
CASES = [
    ("protocol-typo", "listeners:\n  - {name: dns, port: 5353, protocol: udpp}\n" + W,
     "2:39: listeners[0].protocol", "did you mean 'udp'?"),
    ("protocol-not-string", "listeners:\n  - {name: dns, port: 5353, protocol: 17}\n" + W,
     "2:39: listeners[0].protocol", "17"),
    ("udp-worker-bind", "listeners:\n  - name: dns\n    port: 5353\n    protocol: udp\n"
                        "    mode: worker-bind\n" + W,
     "5:11: listeners[0].mode", "protocol udp needs mode reuseport or shared"),
    ("udp-backlog", "listeners:\n  - name: dns\n    port: 5353\n    protocol: udp\n"
                    "    backlog: 64\n" + W,
     "5:14: listeners[0].backlog", "a UDP socket has none"),
    ("udp-http-app", "listeners:\n  - {name: dns, port: 5353, protocol: udp}\nworkers: {app: http}\n",
     "2:39: listeners[0].protocol", "the built-in http app does not answer UDP"),
    ("cookie-on-tcp", "listeners:\n  - {name: dns, port: 5353, flows: cookie}\n" + W,
     "2:36: listeners[0].flows", "flows is for protocol udp"),
    ("cookie-shared", "listeners:\n  - {name: dns, port: 5353, protocol: udp, mode: shared, flows: cookie}\n" + W,
     "2:65: listeners[0].flows", "flows: cookie needs mode reuseport"),
    ("udp-unix-path", "listeners:\n  - {name: app, path: /run/app.sock, protocol: udp}\n" + W,
     "2:48: listeners[0].protocol", "protocol udp needs host and port"),
    ("udp-duplicate", "listeners:\n  - {name: a, port: 53, protocol: udp}\n"
                      "  - {name: b, port: 53, protocol: udp, mode: shared}\n" + W,
     "3:5: listeners[1]", "duplicate address 127.0.0.1:53"),
]


@pytest.mark.parametrize("text, where, phrase", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_udp_config(tmp_path, capsys, text, where, phrase):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError) as e:
        schema.load(str(path))
    first = e.value.problems[0]
    assert first.startswith(f"{path}:{where}:"), first
    assert phrase in first, first
    assert cli.main(["check", "-c", str(path)]) == 1
    assert capsys.readouterr().err.splitlines()[0] == first


def test_real_check_locates_a_udp_error(tmp_path):
    text, where, phrase = next(c[1:] for c in CASES if c[0] == "udp-backlog")
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    r = subprocess.run([sys.executable, "-m", "upgraderd", "check", "-c", str(path)],
                       capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 1
    first = r.stderr.splitlines()[0]
    assert first.startswith(f"{path}:{where}:") and phrase in first, first


def test_tcp_and_udp_share_a_port_with_distinct_socket_keys():
    cfg = schema.parse("listeners:\n  - {name: dns-tcp, port: 5353}\n"
                       "  - {name: dns, port: 5353, protocol: udp}\n"
                       "  - {name: log, port: 5514, protocol: udp, mode: shared}\n" + W)
    tcp, dns, log = cfg.listeners
    assert (tcp.protocol, dns.protocol) == ("tcp", "udp")
    assert key_for(tcp, 1) == ("127.0.0.1", 5353, "reuseport", 1)
    assert key_for(dns, 1) == ("127.0.0.1", 5353, "udp/reuseport", 1)
    assert key_for(log, 1) == ("127.0.0.1", 5514, "udp/shared", 0)
    assert [is_udp(key_for(s, 0)) for s in cfg.listeners] == [False, True, True]
    assert len(keys_for(cfg, [0, 1])) == 5


def test_a_reload_that_changes_the_protocol_opens_a_new_socket():
    before = schema.parse("listeners:\n  - {name: dns, port: 5353}\n" + W)
    after = schema.parse("listeners:\n  - {name: dns, port: 5353, protocol: udp}\n" + W)
    p = plan.diff(before, after)
    assert [s.name for s in p.open] == ["dns"] and [s.name for s in p.close] == ["dns"]
    assert "open dns 127.0.0.1:5353 (reuseport, udp)" in p.describe()


def test_a_cookie_listener_keys_its_sockets_by_generation():
    cfg = schema.parse("listeners:\n  - {name: game, port: 7777, protocol: udp, flows: cookie}\n" + W)
    spec = cfg.listeners[0]
    assert key_for(spec, 1, 3) == ("127.0.0.1", 7777, "udp/cookie@3", 1)
    assert keys_for(cfg, [0, 1], 4) == {("127.0.0.1", 7777, "udp/cookie@4", 0), ("127.0.0.1", 7777, "udp/cookie@4", 1)}
    assert is_udp(key_for(spec, 0, 1))


def test_fd_store_names_tell_a_udp_socket_from_a_tcp_one_on_the_same_port():
    from upgraderd.system import fdstore
    cfg = schema.parse("listeners:\n  - {name: dns-tcp, port: 5353}\n"
                       "  - {name: dns, port: 5353, protocol: udp}\n"
                       "  - {name: game, port: 7777, protocol: udp, flows: cookie}\n" + W)
    tcp, dns, game = cfg.listeners
    keys = {key_for(tcp, 0), key_for(tcp, 1), key_for(dns, 0), key_for(dns, 1), key_for(game, 0, 3)}
    # Per-generation sockets are not stored: a restarted master binds new ones.
    assert fdstore.names(cfg, keys) == {key_for(tcp, 0): "dns-tcp", key_for(tcp, 1): "dns-tcp/1",
                                        key_for(dns, 0): "dns", key_for(dns, 1): "dns/1"}
