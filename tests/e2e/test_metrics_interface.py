"""The metric names are an interface: promtool accepts them, docs, dashboard and alerts agree with them."""

from __future__ import annotations

import json
import re
import signal
import socket
import subprocess

import pytest
import yaml
from prometheus_client.openmetrics.parser import text_string_to_metric_families as parse_openmetrics
from prometheus_client.parser import text_string_to_metric_families

from tests.support import ROOT
from tests.support.promql import for_promtool, grafana_queries, metric_names
from tests.support.promtools import tool
from tests.support.scrape import fetch, metrics_url, parse, value
from tests.support.upgraderd_proc import Daemon, echo_config, free_port, wait_until

pytestmark = pytest.mark.e2e

DEPLOY = ROOT / "deploy"
OPENMETRICS = {"Accept": "application/openmetrics-text; version=1.0.0"}


@pytest.fixture(scope="module")
def exposition(tmp_path_factory):
    """Scrape a daemon that served a connection and did a reload (every family has samples)."""
    port = free_port()
    cfg = echo_config(port, count=2)
    # A UDP listener on the same port number: its datagram and drop metrics are part of the interface.
    cfg["listeners"].append({"name": "dns", "host": "127.0.0.1", "port": port, "protocol": "udp"})  # type: ignore[attr-defined]
    with Daemon(tmp_path_factory.mktemp("interface"), cfg).start() as d:
        with socket.create_connection(("127.0.0.1", port), timeout=5) as c:
            c.sendall(b"ping")
            assert c.recv(4) == b"ping"
        d.send(signal.SIGHUP)
        d.wait_log(r"reload done: generation 2 ACTIVE")
        wait_until(lambda: value(parse(fetch(metrics_url(cfg))[1]), "upgraderd_drain_duration_seconds_count") == 1,
                   15, "generation 1 to drain")
        # Generation 2's workers make their metric files at their first flush, within 0.5 s of READY=1.
        wait_until(lambda: all(f"\n{name}{{" in fetch(metrics_url(cfg))[1]
                               for name in ("upgraderd_connections_active", "upgraderd_udp_receive_drops")),
                   5, "generation 2's workers' series")
        text = fetch(metrics_url(cfg))[1]
        om = fetch(metrics_url(cfg), OPENMETRICS)[1]
    return text, om


def markdown_anchors(markdown: str) -> set[str]:
    """Return the anchors a Markdown renderer gives the headings (GitHub's rule)."""
    heads = re.findall(r"^#{1,6} +(.+?) *$", markdown, flags=re.M)
    return {re.sub(r"[^\w\- ]", "", h.lower()).replace(" ", "-") for h in heads}


def exposed_samples(text: str) -> set[str]:
    return {s.name for f in text_string_to_metric_families(text) for s in f.samples}


def documented_names(family: object) -> str:
    """Return the name a family is documented under (counters with _total, info with _info)."""
    name, kind = family.name, family.type  # type: ignore[attr-defined]
    return {"counter": f"{name}_total", "info": f"{name}_info"}.get(kind, name)


def test_promtool_accepts_the_exposition(exposition):
    text, _ = exposition
    out = subprocess.run([tool("promtool"), "check", "metrics"], input=text, capture_output=True,
                         text=True, timeout=60)
    assert (out.returncode, out.stdout, out.stderr) == (0, "", "")


def test_openmetrics_has_the_same_families(exposition):
    text, om = exposition
    assert om.endswith("# EOF\n")
    families = {documented_names(f) for f in text_string_to_metric_families(text)}
    om_families = {f.name: f.type for f in parse_openmetrics(om)}
    assert {documented_names(f) for f in parse_openmetrics(om)} == families
    assert om_families["upgraderd_reloads"] == "counter"
    assert om_families["upgraderd_build"] == om_families["upgraderd_listener"] == "info"


def test_every_exposed_metric_is_documented_and_every_documented_one_exposed(exposition):
    text, _ = exposition
    doc = (ROOT / "docs" / "metrics.md").read_text()
    documented = set(re.findall(r"`((?:upgraderd|process|python)_[a-z_]+)`", doc))
    exposed = {documented_names(f) for f in text_string_to_metric_families(text)}
    assert exposed - documented == set()
    # The ASGI/WSGI worker's own families exist only where such workers run: an echo daemon
    # has none. tests/e2e/test_asgi_metrics.py checks them on a web app's /metrics.
    web_only = {"upgraderd_http_requests_total", "upgraderd_http_request_duration_seconds",
                "upgraderd_websockets_open"}
    assert web_only <= documented
    assert {n for n in documented if n.startswith("upgraderd_")} - web_only - exposed == set()
    families = list(text_string_to_metric_families(text))
    assert not [f.name for f in families if f.name.startswith("upgraderd_") and not f.documentation]
    labels = {k for f in families for s in f.samples for k in s.labels}
    assert "pid" not in labels


def test_the_dashboard_queries_only_exposed_metrics(exposition):
    text, _ = exposition
    dashboard = json.loads((DEPLOY / "grafana" / "upgraderd.json").read_text())
    queries = grafana_queries(dashboard)
    names = set().union(*(metric_names(q) for q in queries))
    assert names - exposed_samples(text) == set()
    for required in ("upgraderd_generation", "upgraderd_reloads_total", "upgraderd_workers",
                     "upgraderd_connections_active", "upgraderd_reload_duration_seconds_bucket",
                     "upgraderd_drain_duration_seconds_bucket"):
        assert required in names, required
    assert {p["title"] for p in dashboard["panels"]} >= {
        "Generation timeline", "Reloads", "Workers by state", "Open connections by generation state",
        "Reload duration (HUP to ACTIVE), last hour", "Drain duration, last hour",
        "Slot sockets closed without tcp_migrate_req", "worker-bind reset risk", "net.ipv4.tcp_migrate_req"}
    for risk in ("upgraderd_slot_retire_risks_total", "upgraderd_worker_bind_reset_risk",
                 "upgraderd_kernel_tcp_migrate_req"):
        assert risk in names, risk


def test_the_dashboard_queries_are_valid_promql(tmp_path):
    dashboard = json.loads((DEPLOY / "grafana" / "upgraderd.json").read_text())
    exprs = [q for q in grafana_queries(dashboard) if not q.startswith("label_values(")]
    rules = {"groups": [{"name": "dashboard", "rules": [
        {"record": f"dashboard:query{i}", "expr": for_promtool(e)} for i, e in enumerate(exprs)]}]}
    path = tmp_path / "dashboard_rules.yml"
    path.write_text(yaml.safe_dump(rules))
    out = subprocess.run([tool("promtool"), "check", "rules", str(path)], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stdout + out.stderr
    assert f"SUCCESS: {len(exprs)} rules found" in out.stdout


def test_the_alerts_pass_their_unit_tests_and_name_exposed_metrics(exposition):
    text, _ = exposition
    out = subprocess.run([tool("promtool"), "test", "rules", "alerts_test.yml"], cwd=DEPLOY / "prometheus",
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stdout + out.stderr
    out = subprocess.run([tool("promtool"), "check", "config", "scrape.yml"], cwd=DEPLOY / "prometheus",
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stdout + out.stderr
    rules = yaml.safe_load((DEPLOY / "prometheus" / "alerts.yml").read_text())["groups"][0]["rules"]
    assert {r["alert"] for r in rules} == {"UpgraderdReloadFailed", "UpgraderdConfigNotLoaded", "UpgraderdCrashLoop",
                                           "UpgraderdDrainTimeout", "UpgraderdNoActiveGeneration",
                                           "UpgraderdSlotRetireRisk", "UpgraderdWorkerBindResetRisk",
                                           "UpgraderdTcpMigrateReqOff", "UpgraderdDown"}
    names = set().union(*(metric_names(r["expr"]) for r in rules))
    assert names - exposed_samples(text) == {"up"}  # `up` is Prometheus's own, for the target-down alert
    for risk in ("upgraderd_slot_retire_risks_total", "upgraderd_worker_bind_reset_risk",
                 "upgraderd_kernel_tcp_migrate_req"):
        assert risk in names, risk
    # Every alert links to the section of docs/operations.md that says what to do.
    anchors = markdown_anchors((ROOT / "docs" / "operations.md").read_text())
    for r in rules:
        url = r["annotations"]["runbook_url"]
        assert url.startswith("docs/operations.md#") and url.split("#", 1)[1] in anchors, (r["alert"], url)
    tests = yaml.safe_load((DEPLOY / "prometheus" / "alerts_test.yml").read_text())["tests"]
    tested = {t["alertname"] for case in tests for t in case["alert_rule_test"] if t["exp_alerts"]}
    assert tested == {r["alert"] for r in rules}  # every alert is shown to fire
