"""Unmodified kubectl 1.27 (with --validate=false: it only knows OpenAPI v2) and 1.33 against kpx apiserver.

For Services, EndpointSlices, Pods, Nodes and Namespaces: create, apply (create, change,
unchanged), get / -o yaml / -w, label, patch (strategic, merge, json), describe, apply
--server-side, delete.
"""

from __future__ import annotations

import json
import queue
import subprocess
import threading
import time
import uuid
from pathlib import Path
from typing import Any

import pytest
import yaml

pytestmark = pytest.mark.integration

KUBECTL = "/usr/lib/google-cloud-sdk/bin/kubectl.{}"
VERSIONS = ["1.27", "1.33"]


class Kubectl:
    def __init__(self, version: str, kubeconfig: Path, cache_dir: Path) -> None:
        self.version = version
        self.base = [KUBECTL.format(version), "--kubeconfig", str(kubeconfig), "--cache-dir", str(cache_dir)]
        # kubectl < 1.29 validates with OpenAPI v2 (protobuf) only, which this server does not serve
        self.validate = ["--validate=false"] if version in ("1.27", "1.28") else []

    def __call__(self, *args: str, input: str | None = None, check: bool = True) -> subprocess.CompletedProcess[str]:
        r = subprocess.run([*self.base, *args], input=input, capture_output=True, text=True, timeout=60)
        if check and r.returncode != 0:
            raise AssertionError(f"kubectl {' '.join(args)} failed ({r.returncode}): {r.stderr}{r.stdout}")
        return r

    def json(self, *args: str) -> Any:
        return json.loads(self("get", *args, "-o", "json").stdout)


@pytest.fixture(params=VERSIONS)
def kubectl(request: pytest.FixtureRequest, apiserver: Any, tmp_path: Path) -> Kubectl:
    return Kubectl(request.param, apiserver.kubeconfig, tmp_path / "kubectl-cache")


@pytest.fixture
def ns(kubectl: Kubectl) -> Any:
    name = f"kc{kubectl.version.replace('.', '')}-{uuid.uuid4().hex[:6]}"
    kubectl("create", "namespace", name)
    yield name
    kubectl("delete", "namespace", name, "--wait=false", check=False)


def manifest(kind: str, name: str, ns: str, variant: int = 0) -> dict[str, Any]:
    labels = {"app": name, "tier": f"t{variant}"}
    if kind == "Service":
        return {"apiVersion": "v1", "kind": "Service", "metadata": {"name": name, "namespace": ns, "labels": labels},
                "spec": {"selector": {"app": name},
                         "ports": [{"name": "http", "port": 80 + variant, "targetPort": 8080}]}}
    if kind == "EndpointSlice":
        return {"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
                "metadata": {"name": name, "namespace": ns,
                             "labels": {**labels, "kubernetes.io/service-name": name}},
                "addressType": "IPv4",
                "endpoints": [{"addresses": [f"10.244.1.{5 + variant}"], "conditions": {"ready": True}}],
                "ports": [{"name": "http", "port": 8080, "protocol": "TCP"}]}
    if kind == "Pod":
        return {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": name, "namespace": ns, "labels": labels},
                "spec": {"containers": [{"name": "c", "image": "kpx/echo",
                                         "args": ["--port", str(8080 + variant)]}]}}
    if kind == "Node":
        return {"apiVersion": "v1", "kind": "Node", "metadata": {"name": name, "labels": labels}}
    if kind == "Namespace":
        return {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": name, "labels": labels}}
    raise AssertionError(kind)


RESOURCE = {"Service": "service", "EndpointSlice": "endpointslice.discovery.k8s.io", "Pod": "pod",
            "Node": "node", "Namespace": "namespace"}
KINDS = list(RESOURCE)


def _y(doc: dict[str, Any]) -> str:
    return yaml.safe_dump(doc)


@pytest.mark.parametrize("kind", KINDS)
def test_kubectl_lifecycle(kubectl: Kubectl, ns: str, kind: str) -> None:
    k = kubectl
    name = f"{kind.lower()}-{uuid.uuid4().hex[:5]}"
    cluster = kind in ("Node", "Namespace")
    nsargs = [] if cluster else ["-n", ns]
    res = RESOURCE[kind]
    short = res.split(".")[0]

    # create, then AlreadyExists
    r = k("create", *k.validate, "-f", "-", input=_y(manifest(kind, name, ns)))
    assert f"{res}/{name} created" in r.stdout
    r = k("create", *k.validate, "-f", "-", input=_y(manifest(kind, name, ns)), check=False)
    assert r.returncode != 0 and "AlreadyExists" in r.stderr

    # get (Table), -o yaml
    r = k("get", short, name, *nsargs)
    header = r.stdout.splitlines()[0]
    assert header.split()[0] == "NAME" and name in r.stdout
    obj = yaml.safe_load(k("get", short, name, *nsargs, "-o", "yaml").stdout)
    assert obj["metadata"]["uid"] and obj["metadata"]["creationTimestamp"] and obj["metadata"]["resourceVersion"]
    if kind == "Service":
        assert obj["spec"]["clusterIP"].startswith("10.") and obj["spec"]["ports"][0]["protocol"] == "TCP"
        assert "CLUSTER-IP" in header and "PORT(S)" in header
    if kind == "Namespace":
        assert obj["status"]["phase"] == "Active"
        assert obj["metadata"]["labels"]["kubernetes.io/metadata.name"] == name
    if kind == "Pod":
        assert obj["spec"]["restartPolicy"] == "Always" and obj["status"]["phase"] in ("Pending", "Running")

    # label / patch x3
    r = k("label", short, name, *nsargs, "color=blue")
    assert "labeled" in r.stdout
    k("patch", short, name, *nsargs, "-p", json.dumps({"metadata": {"labels": {"smp": "yes"}}}))
    k("patch", short, name, *nsargs, "--type=merge", "-p", json.dumps({"metadata": {"labels": {"merge": "yes"}}}))
    k("patch", short, name, *nsargs, "--type=json", "-p",
      json.dumps([{"op": "add", "path": "/metadata/labels/jsonp", "value": "yes"}]))
    labels = k.json(short, name, *nsargs)["metadata"]["labels"]
    assert {labels.get(x) for x in ("smp", "merge", "jsonp")} == {"yes"} and labels["color"] == "blue"

    # describe
    r = k("describe", short, name, *nsargs)
    assert "Name:" in r.stdout and name in r.stdout and "color=blue" in r.stdout

    # delete; gone
    r = k("delete", short, name, *nsargs, "--timeout=30s")
    assert "deleted" in r.stdout
    if kind != "Namespace":
        r = k("get", short, name, *nsargs, check=False)
        assert r.returncode != 0 and "NotFound" in r.stderr


@pytest.mark.parametrize("kind", KINDS)
def test_kubectl_apply(kubectl: Kubectl, ns: str, kind: str) -> None:
    k = kubectl
    name = f"ap-{kind.lower()}-{uuid.uuid4().hex[:5]}"
    cluster = kind in ("Node", "Namespace")
    nsargs = [] if cluster else ["-n", ns]
    res = RESOURCE[kind]
    short = res.split(".")[0]
    r = k("apply", *k.validate, "-f", "-", input=_y(manifest(kind, name, ns, 0)))
    assert f"{res}/{name} created" in r.stdout
    first = k.json(short, name, *nsargs)
    assert "kubectl.kubernetes.io/last-applied-configuration" in first["metadata"]["annotations"]
    if kind == "Pod":  # pod specs are mostly immutable: change a label only
        changed = manifest(kind, name, ns, 0)
        changed["metadata"]["labels"]["tier"] = "t1"
    else:
        changed = manifest(kind, name, ns, 1)
    r = k("apply", *k.validate, "-f", "-", input=_y(changed))
    assert f"{res}/{name} configured" in r.stdout
    second = k.json(short, name, *nsargs)
    assert second["metadata"]["labels"]["tier"] == "t1"
    assert int(second["metadata"]["resourceVersion"]) > int(first["metadata"]["resourceVersion"])
    if kind == "Service":
        assert [p["port"] for p in second["spec"]["ports"]] == [81]
        assert second["spec"]["clusterIP"] == first["spec"]["clusterIP"]
    r = k("apply", *k.validate, "-f", "-", input=_y(changed))
    assert f"{res}/{name} unchanged" in r.stdout
    assert k.json(short, name, *nsargs)["metadata"]["resourceVersion"] == second["metadata"]["resourceVersion"]

    # server-side apply: update the existing object, then create another
    ssa = manifest(kind, name, ns, 0 if kind == "Pod" else 1)
    ssa["metadata"]["labels"]["ssa"] = "yes"
    r = k("apply", "--server-side", "--force-conflicts", *k.validate, "-f", "-", input=_y(ssa))
    assert f"{res}/{name} serverside-applied" in r.stdout, r.stdout + r.stderr
    assert k.json(short, name, *nsargs)["metadata"]["labels"]["ssa"] == "yes"
    other = manifest(kind, name + "-ssa", ns, 0)
    r = k("apply", "--server-side", *k.validate, "-f", "-", input=_y(other))
    assert f"{res}/{name}-ssa serverside-applied" in r.stdout
    assert k.json(short, name + "-ssa", *nsargs)["metadata"]["uid"]
    k("delete", short, name, name + "-ssa", *nsargs, "--wait=false")


class LineReader:
    """Lines of a child's stdout through a thread (select() on a buffered pipe misses buffered lines)."""

    def __init__(self, proc: subprocess.Popen[str]) -> None:
        self.lines: queue.Queue[str | None] = queue.Queue()
        self.seen = ""
        threading.Thread(target=self._pump, args=(proc,), daemon=True).start()

    def _pump(self, proc: subprocess.Popen[str]) -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            self.lines.put(line)
        self.lines.put(None)

    def until(self, needle: str, timeout: float = 20.0) -> str:
        deadline = time.monotonic() + timeout
        buf = ""
        while time.monotonic() < deadline:
            try:
                line = self.lines.get(timeout=max(0.01, deadline - time.monotonic()))
            except queue.Empty:
                break
            if line is None:
                break
            buf += line
            self.seen += line
            if needle in line:
                return buf
        raise AssertionError(f"{needle!r} not seen in kubectl -w output within {timeout}s: {self.seen!r}")


@pytest.mark.parametrize("kind", ["Service", "Pod", "EndpointSlice"])
def test_kubectl_get_watch_sees_change(kubectl: Kubectl, ns: str, kind: str) -> None:
    k = kubectl
    name = f"w-{kind.lower()}-{uuid.uuid4().hex[:5]}"
    short = RESOURCE[kind].split(".")[0]
    k("create", *k.validate, "-f", "-", input=_y(manifest(kind, name, ns)))
    proc = subprocess.Popen([*k.base, "get", short, "-n", ns, "-w", "--show-labels"], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    lines = LineReader(proc)
    try:
        lines.until(name)  # the initial list
        k("label", short, name, "-n", ns, "watched=yes")
        out = lines.until("watched=yes")
        assert name in out
        second = f"{name}-b"
        k("create", *k.validate, "-f", "-", input=_y(manifest(kind, second, ns)))
        lines.until(second)
    finally:
        proc.kill()
        proc.wait(5)


def test_kubectl_get_all_namespaces_and_selectors(kubectl: Kubectl, ns: str) -> None:
    k = kubectl
    for i in range(3):
        svc = manifest("Service", f"sel-{i}", ns)
        svc["metadata"]["labels"]["idx"] = str(i)
        k("create", *k.validate, "-f", "-", input=_y(svc))
    r = k("get", "svc", "-A")
    assert r.stdout.splitlines()[0].split()[:2] == ["NAMESPACE", "NAME"]
    assert all(f"sel-{i}" in r.stdout for i in range(3))
    r = k("get", "svc", "-n", ns, "-l", "idx in (0,2)", "-o", "name")
    assert sorted(r.stdout.split()) == ["service/sel-0", "service/sel-2"]
    r = k("get", "svc", "-n", ns, "--field-selector", "metadata.name=sel-1", "-o", "name")
    assert r.stdout.split() == ["service/sel-1"]
    r = k("get", "svc", "-n", ns, "--chunk-size=1", "-o", "name")
    assert sorted(r.stdout.split()) == ["service/sel-0", "service/sel-1", "service/sel-2"]
    r = k("get", "svc", "-n", ns, "-l", "bad key!", check=False)
    assert r.returncode != 0 and "BadRequest" in r.stderr


def test_kubectl_namespace_terminates(kubectl: Kubectl) -> None:
    k = kubectl
    name = f"term-{uuid.uuid4().hex[:6]}"
    k("create", "namespace", name)
    k("create", *k.validate, "-f", "-", input=_y(manifest("Service", "inside", name)))
    k("delete", "namespace", name, "--wait=false")
    r = k("create", *k.validate, "-f", "-", input=_y(manifest("Service", "late", name)), check=False)
    # refused while Terminating (403), or the namespace is already gone (404)
    assert r.returncode != 0 and ("Forbidden" in r.stderr or "NotFound" in r.stderr), r.stderr
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        r = k("get", "namespace", name, check=False)
        if r.returncode != 0 and "NotFound" in r.stderr:
            break
        time.sleep(0.3)
    else:
        raise AssertionError(f"namespace {name} not deleted by the namespace controller: {r.stdout}")


def test_kubectl_version_and_api_resources(kubectl: Kubectl) -> None:
    r = kubectl("version", "-o", "json")
    assert json.loads(r.stdout)["serverVersion"]["major"] == "1"
    r = kubectl("api-resources")
    names = {line.split()[0] for line in r.stdout.splitlines()[1:]}
    assert {"namespaces", "nodes", "pods", "services", "endpointslices", "events"} <= names
