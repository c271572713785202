"""The controllers inside a real `kpx apiserver` process, driven through the official Python
client the way users and node agents drive them: EndpointSlices from Pods whose Ready condition is
set through the status subresource, namespace deletion, garbage collection, scheduling, node IPAM
and force-deletion of pods on a deleted node."""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

import pytest
from kubernetes import client, config
from kubernetes.client.rest import ApiException

pytestmark = pytest.mark.integration
T = TypeVar("T")


def eventually(probe: Callable[[], T], ok: Callable[[T], bool], timeout: float = 15.0) -> T:
    deadline = time.monotonic() + timeout
    while True:
        v = probe()
        if ok(v):
            return v
        if time.monotonic() > deadline:
            raise AssertionError(f"not reached in {timeout}s; last: {v!r}")
        time.sleep(0.1)


def gone(fn: Callable[[], Any]) -> Callable[[], bool]:
    def probe() -> bool:
        try:
            fn()
        except ApiException as e:
            if e.status == 404:
                return True
            raise
        return False
    return probe


class Api:
    def __init__(self, srv: Any) -> None:
        self.client = config.new_client_from_config(config_file=str(srv.kubeconfig))
        self.core = client.CoreV1Api(self.client)
        self.disc = client.DiscoveryV1Api(self.client)

    def slices(self, ns: str, svc: str) -> list[Any]:
        return list(self.disc.list_namespaced_endpoint_slice(
            ns, label_selector=f"kubernetes.io/service-name={svc}").items)


@pytest.fixture
def api(apiserver: Any) -> Iterator[Api]:
    a = Api(apiserver)
    try:
        yield a
    finally:
        a.client.close()


@pytest.fixture
def ns(api: Api) -> Iterator[str]:
    name = f"ctl-{uuid.uuid4().hex[:8]}"
    api.core.create_namespace(client.V1Namespace(metadata=client.V1ObjectMeta(name=name)))
    yield name
    try:
        api.core.delete_namespace(name)
    except ApiException:
        pass


def pod(name: str, app: str, node: str | None = None) -> client.V1Pod:
    return client.V1Pod(
        metadata=client.V1ObjectMeta(name=name, labels={"app": app}),
        spec=client.V1PodSpec(node_name=node, containers=[client.V1Container(
            name="c", image="kpx/echo", ports=[client.V1ContainerPort(name="echo", container_port=8080)])]))


def report_ready(api: Api, ns: str, name: str, ip: str, ready: bool = True) -> None:
    """What a node agent does: status subresource with podIP and the Ready condition."""
    now = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    api.core.patch_namespaced_pod_status(name, ns, {"status": {
        "phase": "Running", "podIP": ip, "podIPs": [{"ip": ip}],
        "conditions": [{"type": "Ready", "status": "True" if ready else "False", "lastTransitionTime": now}]}})


def by_pod(slices: list[Any]) -> dict[str, Any]:
    return {e.target_ref.name: e for s in slices for e in (s.endpoints or [])}


def test_endpointslices_through_the_api(api: Api, ns: str) -> None:
    node = f"ghost-{uuid.uuid4().hex[:6]}"  # no Node object: nothing schedules onto it
    svc = api.core.create_namespaced_service(ns, client.V1Service(
        metadata=client.V1ObjectMeta(name="web", labels={"team": "net"}),
        spec=client.V1ServiceSpec(selector={"app": "web"}, ports=[
            client.V1ServicePort(name="echo", port=80, target_port="echo")])))
    for i in range(3):
        api.core.create_namespaced_pod(ns, pod(f"web-{i}", "web", node))
        report_ready(api, ns, f"web-{i}", f"10.244.9.{i + 10}")
    api.core.create_namespaced_pod(ns, pod("other", "other", node))
    sl = eventually(lambda: api.slices(ns, "web"), lambda s: len(by_pod(s)) == 3
                    and all(e.conditions.ready for e in by_pod(s).values()))
    (s,) = sl
    assert s.address_type == "IPv4" and s.metadata.generate_name == "web-"
    assert s.metadata.labels == {"team": "net", "kubernetes.io/service-name": "web",
                                 "endpointslice.kubernetes.io/managed-by": "endpointslice-controller.k8s.io"}
    (ref,) = s.metadata.owner_references
    assert (ref.kind, ref.name, ref.uid, ref.controller, ref.block_owner_deletion) == (
        "Service", "web", svc.metadata.uid, True, True)
    assert [(p.name, p.port, p.protocol) for p in s.ports] == [("echo", 8080, "TCP")]
    assert "endpoints.kubernetes.io/last-change-trigger-time" in s.metadata.annotations
    e = by_pod(sl)["web-1"]
    assert e.addresses == ["10.244.9.11"] and e.node_name == node and e.target_ref.kind == "Pod"
    # a pod turning unready
    report_ready(api, ns, "web-2", "10.244.9.12", ready=False)
    eventually(lambda: by_pod(api.slices(ns, "web"))["web-2"].conditions,
               lambda c: (c.ready, c.serving, c.terminating) == (False, False, False))
    # graceful deletion (bound pod): terminating until the node agent confirms with grace 0
    api.core.delete_namespaced_pod("web-0", ns)
    eventually(lambda: by_pod(api.slices(ns, "web"))["web-0"].conditions,
               lambda c: (c.ready, c.serving, c.terminating) == (False, True, True))
    api.core.delete_namespaced_pod("web-0", ns, grace_period_seconds=0)
    eventually(lambda: set(by_pod(api.slices(ns, "web"))), lambda names: names == {"web-1", "web-2"})
    # the Service goes: so do its slices
    api.core.delete_namespaced_service("web", ns)
    eventually(lambda: api.slices(ns, "web"), lambda s: s == [])


def test_namespace_deletion_and_gc(api: Api) -> None:
    name = f"ctl-gone-{uuid.uuid4().hex[:6]}"
    api.core.create_namespace(client.V1Namespace(metadata=client.V1ObjectMeta(name=name)))
    owner = api.core.create_namespaced_service(name, client.V1Service(
        metadata=client.V1ObjectMeta(name="owner"),
        spec=client.V1ServiceSpec(selector={"app": "x"}, ports=[client.V1ServicePort(port=80)])))
    dep = pod("dependent", "x")
    dep.metadata.owner_references = [client.V1OwnerReference(
        api_version="v1", kind="Service", name="owner", uid=owner.metadata.uid)]
    api.core.create_namespaced_pod(name, dep)
    api.core.create_namespaced_pod(name, pod("free", "y"))
    eventually(lambda: api.slices(name, "owner"), lambda s: len(s) == 1)
    api.core.delete_namespaced_service("owner", name, propagation_policy="Background")
    eventually(gone(lambda: api.core.read_namespaced_pod("dependent", name)), bool)
    assert api.core.read_namespaced_pod("free", name).metadata.name == "free"
    api.core.delete_namespace(name)
    eventually(gone(lambda: api.core.read_namespace(name)), bool)
    assert api.core.list_namespaced_pod(name).items == []


@pytest.fixture
def private(apiserver_factory: Any) -> Iterator[Api]:
    """An apiserver of our own: Nodes are cluster-wide, and ours must not attract others' pods."""
    srv = apiserver_factory("--cluster-cidr", "10.250.0.0/23", name="controllers")
    a = Api(srv)
    try:
        yield a
    finally:
        a.client.close()


def ready_node(name: str) -> client.V1Node:
    return client.V1Node(metadata=client.V1ObjectMeta(name=name, labels={"topology.kubernetes.io/zone": f"z-{name}"}),
                         status=client.V1NodeStatus(conditions=[client.V1NodeCondition(type="Ready", status="True")]))


def test_scheduling_ipam_and_lost_node(private: Api) -> None:
    api = private
    api.core.create_namespaced_pod("default", pod("early", "s"))
    p = eventually(lambda: api.core.read_namespaced_pod("early", "default"),
                   lambda p: any(c.type == "PodScheduled" for c in (p.status.conditions or [])))
    (c,) = [c for c in p.status.conditions if c.type == "PodScheduled"]
    assert (c.status, c.reason) == ("False", "Unschedulable") and p.status.phase == "Pending"
    for n in ("n1", "n2"):
        api.core.create_node(ready_node(n))
    cidrs = eventually(lambda: {n.metadata.name: n.spec.pod_cidr for n in api.core.list_node().items},
                       lambda m: all(m.values()))
    assert sorted(cidrs.values()) == ["10.250.0.0/24", "10.250.1.0/24"]
    assert api.core.read_node("n1").spec.pod_cidrs == [cidrs["n1"]]
    for i in range(5):
        api.core.create_namespaced_pod("default", pod(f"s{i}", "s"))
    pods = eventually(lambda: api.core.list_namespaced_pod("default").items,
                      lambda ps: all(p.spec.node_name for p in ps))
    placed = [p.spec.node_name for p in pods]
    assert sorted((placed.count("n1"), placed.count("n2"))) == [3, 3]
    early = api.core.read_namespaced_pod("early", "default")
    assert [(c.type, c.status) for c in early.status.conditions if c.type == "PodScheduled"] == [("PodScheduled", "True")]
    # the zone label reaches the endpoints
    api.core.create_namespaced_service("default", client.V1Service(
        metadata=client.V1ObjectMeta(name="s"),
        spec=client.V1ServiceSpec(selector={"app": "s"}, ports=[client.V1ServicePort(port=80, target_port=8080)])))
    for i, p in enumerate(pods):
        report_ready(api, "default", p.metadata.name, f"10.250.{0 if p.spec.node_name == 'n1' else 1}.{i + 2}")
    eps = eventually(lambda: by_pod(api.slices("default", "s")), lambda m: len(m) == 6)
    assert {e.node_name: e.zone for e in eps.values()} == {"n1": "z-n1", "n2": "z-n2"}
    # a Node deleted: its pods are force-deleted, its CIDR goes to the next Node
    on_n1 = {p.metadata.name for p in pods if p.spec.node_name == "n1"}
    api.core.delete_node("n1")
    eventually(lambda: {p.metadata.name for p in api.core.list_namespaced_pod("default").items},
               lambda names: not (names & on_n1))
    api.core.create_node(ready_node("n3"))
    assert eventually(lambda: api.core.read_node("n3").spec.pod_cidr, bool) == cidrs["n1"]
