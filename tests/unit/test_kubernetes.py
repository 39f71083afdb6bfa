"""deploy/kubernetes/, validated offline: the schemas, and what must agree across the manifests."""

from __future__ import annotations

import os
import shlex
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.support import ROOT
from upgraderd.config import schema

K8S = ROOT / "deploy" / "kubernetes"
KUBE_VERSION = "1.30.0"   # the oldest release whose schema has the native preStop `sleep` action
PRESTOP_MARGIN = 10       # seconds to reap the workers and exit after drain.timeout


def docs() -> dict[str, dict[str, Any]]:
    """Return every manifest listed in the kustomization, by kind."""
    kustomization = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    out = {}
    for name in kustomization["resources"]:
        doc = yaml.safe_load((K8S / name).read_text())
        out[doc["kind"]] = doc
    return out


def pod_spec() -> dict[str, Any]:
    return docs()["Deployment"]["spec"]["template"]["spec"]  # type: ignore[no-any-return]


def container() -> dict[str, Any]:
    return pod_spec()["containers"][0]  # type: ignore[no-any-return]


def config_text() -> str:
    return docs()["ConfigMap"]["data"]["upgraderd.yaml"]  # type: ignore[no-any-return]


def test_the_kustomization_lists_every_manifest() -> None:
    listed = set(yaml.safe_load((K8S / "kustomization.yaml").read_text())["resources"])
    on_disk = {p.name for p in K8S.glob("*.yaml")} - {"kustomization.yaml"}
    assert listed == on_disk
    assert set(docs()) == {"ConfigMap", "Deployment", "Service", "PodDisruptionBudget", "ServiceMonitor",
                           "NetworkPolicy"}


@pytest.mark.parametrize("kind", ["ConfigMap", "Deployment", "Service", "PodDisruptionBudget", "NetworkPolicy"])
def test_each_builtin_manifest_validates_against_the_kubernetes_schema(kind: str) -> None:
    kubernetes_validate = pytest.importorskip("kubernetes_validate")
    kubernetes_validate.validate(docs()[kind], KUBE_VERSION, strict=True)


def test_a_broken_manifest_is_refused_by_the_same_validation() -> None:
    kubernetes_validate = pytest.importorskip("kubernetes_validate")
    bad = docs()["Deployment"]
    bad["spec"]["template"]["spec"]["terminationGracePeriodSeconds"] = "forty-five"
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(bad, KUBE_VERSION, strict=True)


def test_the_servicemonitor_scrapes_the_services_metrics_port() -> None:
    d = docs()
    sm, svc = d["ServiceMonitor"], d["Service"]
    assert sm["apiVersion"] == "monitoring.coreos.com/v1"
    labels = svc["metadata"]["labels"]
    assert sm["spec"]["selector"]["matchLabels"].items() <= labels.items()
    port_names = {p["name"] for p in svc["spec"]["ports"]}
    assert [e["port"] for e in sm["spec"]["endpoints"]] == ["metrics"] and "metrics" in port_names
    assert sm["spec"]["endpoints"][0]["path"] == "/metrics"


def test_the_service_and_the_budget_select_the_pods() -> None:
    d = docs()
    pod_labels = d["Deployment"]["spec"]["template"]["metadata"]["labels"]
    assert d["Service"]["spec"]["selector"].items() <= pod_labels.items()
    assert d["PodDisruptionBudget"]["spec"]["selector"]["matchLabels"].items() <= pod_labels.items()
    assert d["Deployment"]["spec"]["selector"]["matchLabels"].items() <= pod_labels.items()
    ports = {p["name"]: p["containerPort"] for p in container()["ports"]}
    assert {p["targetPort"] for p in d["Service"]["spec"]["ports"]} <= set(ports)


def test_the_configmap_config_passes_upgraderd_check_and_watches_itself() -> None:
    cfg = schema.parse(config_text(), "configmap.yaml:upgraderd.yaml")
    assert cfg.reload.watch == ("config",)
    host, port = (cfg.metrics.listen or "").rsplit(":", 1)
    assert host == "0.0.0.0", "kubelet probes and Prometheus reach the pod IP"
    ports = {p["name"]: p["containerPort"] for p in container()["ports"]}
    assert ports["metrics"] == int(port)
    assert ports["http"] == cfg.listeners[0].port


def test_upgraderd_is_the_main_process_and_reads_the_mounted_directory() -> None:
    c = container()
    argv = c["command"]
    assert argv[:2] == ["upgraderd", "run"], "exec form: upgraderd is PID 1 and gets the kubelet's SIGTERM"
    assert "args" not in c and not any(a in ("sh", "/bin/sh", "bash") for a in argv)
    config_path = argv[argv.index("-c") + 1]
    mounts = {m["name"]: m for m in c["volumeMounts"]}
    vol = next(v for v in pod_spec()["volumes"] if "configMap" in v)
    mount = mounts[vol["name"]]
    assert "subPath" not in mount, "a subPath mount never sees ConfigMap updates"
    assert mount["mountPath"] == os.path.dirname(config_path)
    assert vol["configMap"]["name"] == docs()["ConfigMap"]["metadata"]["name"]
    assert os.path.basename(config_path) in docs()["ConfigMap"]["data"]
    pidfile = argv[argv.index("--pidfile") + 1]
    assert any(pidfile.startswith(m["mountPath"] + "/") for m in c["volumeMounts"] if m["name"] != vol["name"])


def test_the_grace_period_covers_the_prestop_and_the_drain() -> None:
    cfg = schema.parse(config_text(), "upgraderd.yaml")
    prestop = container()["lifecycle"]["preStop"]["sleep"]["seconds"]
    assert pod_spec()["terminationGracePeriodSeconds"] >= prestop + cfg.drain.timeout + PRESTOP_MARGIN
    assert container()["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert container()["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert {container()[p]["httpGet"]["port"] for p in ("readinessProbe", "livenessProbe")} == {"metrics"}


def test_no_configmap_generator_rolls_the_pods_on_a_config_edit() -> None:
    kustomization = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    assert "configMapGenerator" not in kustomization


@pytest.mark.skipif(shutil.which("kubectl") is None, reason="kubectl is not installed")
def test_kubectl_kustomize_builds_the_same_five_objects() -> None:
    out = subprocess.run(["kubectl", "kustomize", str(K8S)], capture_output=True, text=True, timeout=60)
    if out.returncode != 0 and "unknown command" in out.stderr:
        pytest.skip(f"this kubectl has no kustomize: {shlex.quote(out.stderr.strip())}")
    assert out.returncode == 0, out.stderr
    built = list(yaml.safe_load_all(out.stdout))
    assert sorted(d["kind"] for d in built) == sorted(docs())
    assert all(d["metadata"]["labels"]["app.kubernetes.io/name"] == "upgraderd" for d in built)


def test_only_prometheus_reaches_the_port_the_probes_use() -> None:
    """A stranger in the cluster must not be able to starve /healthz and /readyz (issue 25)."""
    policy = docs()["NetworkPolicy"]["spec"]
    pod_labels = docs()["Deployment"]["spec"]["template"]["metadata"]["labels"]
    assert policy["podSelector"]["matchLabels"].items() <= pod_labels.items()
    assert policy["policyTypes"] == ["Ingress"]
    probed = {container()[p]["httpGet"]["port"] for p in ("readinessProbe", "livenessProbe")}
    assert probed == {"metrics"}
    for rule in policy["ingress"]:
        ports = {p["port"] for p in rule["ports"]}
        if ports & probed:
            # Restricted to named peers: no empty `from`, no ipBlock open to every address.
            assert rule.get("from") and all("ipBlock" not in peer for peer in rule["from"]), rule
        else:
            assert ports == {"http"}, rule
    assert any({p["port"] for p in r["ports"]} == {"http"} and "from" not in r for r in policy["ingress"])
