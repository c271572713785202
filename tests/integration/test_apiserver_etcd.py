"""kpx apiserver over a real etcd (Debian's etcd-server): the same REST semantics as over SQLite, and
two apiservers sharing one etcd see each other's writes, watches and conflicts."""

from __future__ import annotations

import json
import threading
import time
import uuid
from typing import Any

import pytest
from kubernetes import client, config, watch
from kubernetes.client.rest import ApiException

pytestmark = pytest.mark.integration


def core_api(srv: Any) -> tuple[client.ApiClient, client.CoreV1Api]:
    c = config.new_client_from_config(config_file=str(srv.kubeconfig))
    return c, client.CoreV1Api(c)


def svc(name: str, **spec: Any) -> dict[str, Any]:
    return {"apiVersion": "v1", "kind": "Service", "metadata": {"name": name, "labels": {"app": name}},
            "spec": {"selector": {"app": name}, "ports": [{"port": 80}], **spec}}


@pytest.fixture
def two(apiserver_factory: Any, etcd_server: Any, tmp_path: Any) -> tuple[Any, Any]:
    a = apiserver_factory("--storage", "etcd", "--etcd-servers", etcd_server.url, name="a")
    b = apiserver_factory("--storage", "etcd", "--etcd-servers", etcd_server.url, name="b")
    return a, b


def test_crud_and_watch_over_etcd(two: tuple[Any, Any]) -> None:
    a, _ = two
    c, core = core_api(a)
    ns = f"etcd-{uuid.uuid4().hex[:6]}"
    try:
        core.create_namespace({"metadata": {"name": ns}})
        created = core.create_namespaced_service(ns, svc("one"))
        assert created.spec.cluster_ip and created.metadata.uid
        rv = created.metadata.resource_version
        core.patch_namespaced_service("one", ns, {"metadata": {"labels": {"x": "y"}}})
        stale = created
        stale.metadata.labels = {"stale": "1"}
        with pytest.raises(ApiException) as e:
            core.replace_namespaced_service("one", ns, stale)
        assert e.value.status == 409
        for i in range(5):
            core.create_namespaced_service(ns, svc(f"p{i}"))
        page = core.list_namespaced_service(ns, limit=2)
        rest = core.list_namespaced_service(ns, limit=10, _continue=page.metadata._continue)
        assert [s.metadata.name for s in page.items + rest.items] == ["one"] + [f"p{i}" for i in range(5)]
        events = []
        w = watch.Watch()
        for ev in w.stream(core.list_namespaced_service, ns, resource_version=rv, timeout_seconds=3):
            events.append((ev["type"], ev["object"].metadata.name))
            if len(events) == 6:
                w.stop()
        assert events == [("MODIFIED", "one")] + [("ADDED", f"p{i}") for i in range(5)]
        core.delete_namespaced_service("one", ns)
        with pytest.raises(ApiException) as e:
            core.read_namespaced_service("one", ns)
        assert e.value.status == 404
    finally:
        c.close()


def test_two_apiservers_share_one_etcd(two: tuple[Any, Any]) -> None:
    a, b = two
    ca, core_a = core_api(a)
    cb, core_b = core_api(b)
    ns = f"two-{uuid.uuid4().hex[:6]}"
    try:
        core_a.create_namespace({"metadata": {"name": ns}})
        # a write through A is readable through B (B's cache catches up before a consistent read)
        made = core_a.create_namespaced_service(ns, svc("shared"))
        got = core_b.read_namespaced_service("shared", ns)
        assert got.metadata.uid == made.metadata.uid and got.spec.cluster_ip == made.spec.cluster_ip

        # a watch on B sees writes made through A, in order
        rv = got.metadata.resource_version
        seen: list[tuple[str, str]] = []

        def writer() -> None:
            time.sleep(0.3)
            core_a.patch_namespaced_service("shared", ns, {"metadata": {"labels": {"via": "a"}}})
            core_a.create_namespaced_service(ns, svc("second"))

        t = threading.Thread(target=writer)
        t.start()
        w = watch.Watch()
        for ev in w.stream(core_b.list_namespaced_service, ns, resource_version=rv, timeout_seconds=10):
            seen.append((ev["type"], ev["object"].metadata.name))
            if len(seen) == 2:
                w.stop()
        t.join()
        assert seen == [("MODIFIED", "shared"), ("ADDED", "second")]

        # optimistic concurrency across servers: B's update with A's old RV is a 409
        cur = core_b.read_namespaced_service("shared", ns)
        core_a.patch_namespaced_service("shared", ns, {"metadata": {"labels": {"via": "a2"}}})
        cur.metadata.labels = {"via": "b"}
        with pytest.raises(ApiException) as e:
            core_b.replace_namespaced_service("shared", ns, cur)
        assert e.value.status == 409

        # B knows the ClusterIP A allocated: asking B for it is refused
        body = json.loads(json.dumps(svc("dup", clusterIP=made.spec.cluster_ip)))
        with pytest.raises(ApiException) as e:
            core_b.create_namespaced_service(ns, body)
        assert e.value.status == 422 and "already allocated" in e.value.body
        # and after A deletes the Service, B can hand the IP out again
        core_a.delete_namespaced_service("shared", ns)
        deadline = time.monotonic() + 10
        while True:
            try:
                again = core_b.create_namespaced_service(ns, body)
                break
            except ApiException as ae:
                assert ae.status == 422 and time.monotonic() < deadline, ae.body
                time.sleep(0.2)
        assert again.spec.cluster_ip == made.spec.cluster_ip

        # deleting through B is seen by A
        core_b.delete_namespaced_service("second", ns)
        with pytest.raises(ApiException) as e:
            core_a.read_namespaced_service("second", ns)
        assert e.value.status == 404
    finally:
        ca.close()
        cb.close()


def test_apiserver_restart_keeps_state_on_etcd(apiserver_factory: Any, etcd_server: Any, tmp_path: Any) -> None:
    srv = apiserver_factory("--storage", "etcd", "--etcd-servers", etcd_server.url, name="r")
    c, core = core_api(srv)
    name = f"keep-{uuid.uuid4().hex[:6]}"
    made = core.create_namespaced_service("default", svc(name))
    c.close()
    assert srv.stop() == 0  # clean exit on SIGTERM
    srv.start()
    c, core = core_api(srv)
    try:
        got = core.read_namespaced_service(name, "default")
        assert got.metadata.uid == made.metadata.uid
        assert got.metadata.resource_version == made.metadata.resource_version
    finally:
        core.delete_namespaced_service(name, "default")
        c.close()


def test_concurrent_allocation_across_apiservers_never_duplicates(apiserver_factory: Any, etcd_server: Any) -> None:
    """Both servers create Services at once from a tiny range: every ClusterIP and NodePort is unique
    (values are reserved in etcd before the Service is written)."""
    flags = ("--storage", "etcd", "--etcd-servers", etcd_server.url, "--service-cluster-ip-range", "10.97.0.0/26",
             "--service-node-port-range", "31000-31059", "--controllers", "")
    a = apiserver_factory(*flags, name="ca")
    b = apiserver_factory(*flags, name="cb")
    ns = f"alloc-{uuid.uuid4().hex[:6]}"
    ca, core_a = core_api(a)
    cb, core_b = core_api(b)
    errors: list[str] = []
    try:
        core_a.create_namespace({"metadata": {"name": ns}})
        core_b.read_namespace(ns)

        def make(core: client.CoreV1Api, tag: str) -> None:
            for i in range(22):
                try:
                    core.create_namespaced_service(ns, svc(f"{tag}{i}", type="NodePort"))
                except ApiException as e:  # only "range is full" would be acceptable, and it must not happen
                    errors.append(e.body)

        ts = [threading.Thread(target=make, args=(core_a, "a")), threading.Thread(target=make, args=(core_b, "b"))]
        for t in ts:
            t.start()
        for t in ts:
            t.join()
        assert not errors, errors[:3]
        items = core_a.list_namespaced_service(ns).items
        ips = [s.spec.cluster_ip for s in items]
        ports = [p.node_port for s in items for p in s.spec.ports]
        assert len(items) == 44
        assert len(set(ips)) == 44, sorted(ips)
        assert len(set(ports)) == 44, sorted(ports)
        # deleting through one server frees the values for the other (reservation released)
        for s in items[:10]:
            core_a.delete_namespaced_service(s.metadata.name, ns)
        for i in range(10):
            core_b.create_namespaced_service(ns, svc(f"c{i}", type="NodePort"))
        items = core_b.list_namespaced_service(ns).items
        assert len({s.spec.cluster_ip for s in items}) == len(items) == 44
    finally:
        try:
            for s in core_a.list_namespaced_service(ns).items:
                core_a.delete_namespaced_service(s.metadata.name, ns)
        except ApiException:
            pass
        ca.close()
        cb.close()
