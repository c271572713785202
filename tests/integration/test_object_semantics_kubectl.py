"""Object semantics (defaulting, validation, allocation, strategic merge, server-side apply, field
validation) through unmodified kubectl 1.27 and 1.33 against the session's kpx apiserver."""

from __future__ import annotations

import json
import subprocess
import uuid
from pathlib import Path
from typing import Any

import pytest
import yaml

pytestmark = pytest.mark.integration

KUBECTL = "/usr/lib/google-cloud-sdk/bin/kubectl.{}"


class Kubectl:
    def __init__(self, version: str, kubeconfig: Path, cache_dir: Path, ns: str) -> None:
        self.version = version
        self.ns = ns
        self.base = [KUBECTL.format(version), "--kubeconfig", str(kubeconfig), "--cache-dir", str(cache_dir)]
        self.validate = ["--validate=false"] if version == "1.27" else []

    def __call__(self, *args: str, input: str | None = None, check: bool = True) -> subprocess.CompletedProcess[str]:
        r = subprocess.run([*self.base, *args], input=input, capture_output=True, text=True, timeout=60)
        if check and r.returncode != 0:
            raise AssertionError(f"kubectl {' '.join(args)} failed ({r.returncode}): {r.stderr}{r.stdout}")
        return r

    def apply(self, obj: dict[str, Any], *extra: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        return self("apply", "-n", self.ns, *self.validate, *extra, "-f", "-", input=yaml.safe_dump(obj), check=check)

    def get(self, what: str) -> Any:
        return json.loads(self("get", "-n", self.ns, what, "-o", "json", "--show-managed-fields").stdout)


@pytest.fixture(params=["1.27", "1.33"])
def kubectl(request: pytest.FixtureRequest, apiserver: Any, tmp_path: Path) -> Any:
    ns = f"sem{request.param.replace('.', '')}-{uuid.uuid4().hex[:6]}"
    k = Kubectl(request.param, apiserver.kubeconfig, tmp_path / "cache", ns)
    k("create", "namespace", ns)
    yield k
    k("delete", "namespace", ns, "--wait=false", check=False)


def svc(name: str, ports: list[dict[str, Any]], **spec: Any) -> dict[str, Any]:
    return {"apiVersion": "v1", "kind": "Service", "metadata": {"name": name, "labels": {"app": name}},
            "spec": {"selector": {"app": name}, "ports": ports, **spec}}


def test_client_side_apply_three_way_merge(kubectl: Kubectl) -> None:
    kubectl.apply(svc("web", [{"name": "http", "port": 80, "targetPort": 8080},
                              {"name": "https", "port": 443, "targetPort": 8443}]))
    created = kubectl.get("svc/web")
    assert created["spec"]["type"] == "ClusterIP" and created["spec"]["sessionAffinity"] == "None"
    assert created["spec"]["ports"][0]["protocol"] == "TCP"
    kubectl.apply(svc("web", [{"name": "metrics", "port": 9090}, {"name": "http", "port": 80, "targetPort": 8081}],
                      type="NodePort"))
    out = kubectl.get("svc/web")
    ports = out["spec"]["ports"]
    assert [p["port"] for p in ports] == [9090, 80]  # 443 deleted, $setElementOrder honoured
    assert ports[1]["targetPort"] == 8081 and ports[0]["targetPort"] == 9090
    assert all(30000 <= p["nodePort"] <= 32767 for p in ports)
    assert out["spec"]["clusterIP"] == created["spec"]["clusterIP"]
    assert out["spec"]["externalTrafficPolicy"] == "Cluster"
    r = kubectl.apply(svc("web", [{"name": "metrics", "port": 9090}, {"name": "http", "port": 80, "targetPort": 8081}],
                          type="NodePort"))
    assert "unchanged" in r.stdout


def test_server_side_apply_ownership_and_conflicts(kubectl: Kubectl) -> None:
    cfg = svc("ssa", [{"name": "http", "port": 80, "targetPort": 8080}])
    assert "serverside-applied" in kubectl.apply(cfg, "--server-side").stdout
    kubectl.apply(cfg, "--server-side")  # idempotent, no conflict with itself
    mf = kubectl.get("svc/ssa")["metadata"]["managedFields"]
    assert [(e["manager"], e["operation"]) for e in mf] == [("kubectl", "Apply")]
    assert 'k:{"port":80,"protocol":"TCP"}' in mf[0]["fieldsV1"]["f:spec"]["f:ports"]
    # another manager setting the same value shares ownership; changing it conflicts
    kubectl.apply(cfg, "--server-side", "--field-manager=other")
    changed = svc("ssa", [{"name": "http", "port": 80, "targetPort": 9999}])
    r = kubectl.apply(changed, "--server-side", "--field-manager=other", check=False)
    assert r.returncode != 0
    assert 'Apply failed with 1 conflict: conflict with "kubectl": .spec.ports[port=80,protocol="TCP"].targetPort' in r.stderr
    kubectl.apply(changed, "--server-side", "--field-manager=other", "--force-conflicts")
    assert kubectl.get("svc/ssa")["spec"]["ports"][0]["targetPort"] == 9999


def test_validation_errors_and_strict_fields(kubectl: Kubectl) -> None:
    bad = svc("bad", [{"port": 80}, {"port": 0}])
    r = kubectl.apply(bad, check=False)
    assert r.returncode != 0
    assert 'The Service "bad" is invalid' in r.stderr
    assert "spec.ports[1].port: Invalid value: 0: must be between 1 and 65535, inclusive" in r.stderr
    assert "spec.ports[0].name: Required value" in r.stderr
    if kubectl.version != "1.27":  # 1.27 cannot use server-side field validation
        typo = svc("typo", [{"port": 80}])
        typo["spec"]["selectr"] = {"a": "b"}
        r = kubectl("create", "-n", kubectl.ns, "-f", "-", input=yaml.safe_dump(typo), check=False)
        assert r.returncode != 0 and 'unknown field "spec.selectr"' in r.stderr


def test_node_port_conflict_cluster_ip_immutable_and_release(kubectl: Kubectl) -> None:
    base = 30000 + (uuid.uuid4().int % 2000)
    kubectl.apply(svc("np1", [{"port": 80, "nodePort": base}], type="NodePort"))
    r = kubectl.apply(svc("np2", [{"port": 80, "nodePort": base}], type="NodePort"), check=False)
    assert r.returncode != 0
    assert f"spec.ports[0].nodePort: Invalid value: {base}: provided port is already allocated" in r.stderr
    ip = kubectl.get("svc/np1")["spec"]["clusterIP"]
    r = kubectl("patch", "-n", kubectl.ns, "svc", "np1", "--type=json",
                "-p", '[{"op":"replace","path":"/spec/clusterIP","value":"10.96.0.250"}]', check=False)
    assert r.returncode != 0 and "may not change once set" in r.stderr
    # type change back to ClusterIP releases the NodePort: np2 can now have it
    kubectl("patch", "-n", kubectl.ns, "svc", "np1", "--type=merge", "-p", '{"spec":{"type":"ClusterIP"}}')
    np1 = kubectl.get("svc/np1")
    assert "nodePort" not in np1["spec"]["ports"][0] and np1["spec"]["clusterIP"] == ip
    kubectl.apply(svc("np2", [{"port": 80, "nodePort": base}], type="NodePort"))
    assert kubectl.get("svc/np2")["spec"]["ports"][0]["nodePort"] == base


def test_client_side_then_server_side_apply_migrates_ownership(kubectl: Kubectl) -> None:
    """kubectl >= 1.26 moves a client-side-applied object's fields to its server-side manager with a
    managedFields-only JSON patch; later server-side applies by that manager must not conflict."""
    kubectl.apply(svc("mig", [{"name": "http", "port": 80, "targetPort": 8080}]))
    kubectl.apply(svc("mig", [{"name": "http", "port": 80, "targetPort": 8080}]), "--server-side")
    managers = {e["manager"] for e in kubectl.get("svc/mig")["metadata"]["managedFields"]}
    assert "kubectl-client-side-apply" not in managers, managers
    kubectl.apply(svc("mig", [{"name": "http", "port": 80, "targetPort": 9090}]), "--server-side")
    assert kubectl.get("svc/mig")["spec"]["ports"][0]["targetPort"] == 9090
