"""The official `kubernetes` Python client against kpx apiserver: CRUD, watch from a resourceVersion,
bookmarks, and a 410 after compaction followed by a relist that catches up."""

from __future__ import annotations

import datetime
import threading
import time
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
from kubernetes import client, config, watch
from kubernetes.client.rest import ApiException

pytestmark = pytest.mark.integration


def api_client(srv: Any) -> client.ApiClient:
    return config.new_client_from_config(config_file=str(srv.kubeconfig))


@pytest.fixture
def core(apiserver: Any) -> Iterator[client.CoreV1Api]:
    c = api_client(apiserver)
    try:
        yield client.CoreV1Api(c)
    finally:
        c.close()


@pytest.fixture
def ns(core: client.CoreV1Api) -> Iterator[str]:
    name = f"py-{uuid.uuid4().hex[:8]}"
    core.create_namespace(client.V1Namespace(metadata=client.V1ObjectMeta(name=name)))
    yield name
    try:
        core.delete_namespace(name)
    except ApiException:
        pass


def svc(name: str, port: int = 80, labels: dict[str, str] | None = None) -> client.V1Service:
    return client.V1Service(
        metadata=client.V1ObjectMeta(name=name, labels=labels or {"app": name}),
        spec=client.V1ServiceSpec(selector={"app": name}, ports=[client.V1ServicePort(port=port, target_port=8080)]),
    )


def test_crud(core: client.CoreV1Api, ns: str) -> None:
    created = core.create_namespaced_service(ns, svc("py"))
    assert created.metadata.uid and created.spec.cluster_ip and created.spec.ports[0].protocol == "TCP"
    got = core.read_namespaced_service("py", ns)
    assert got.metadata.resource_version == created.metadata.resource_version
    items = core.list_namespaced_service(ns).items
    assert [s.metadata.name for s in items] == ["py"]

    patched = core.patch_namespaced_service("py", ns, {"metadata": {"labels": {"extra": "1"}}})
    assert patched.metadata.labels == {"app": "py", "extra": "1"}
    assert int(patched.metadata.resource_version) > int(created.metadata.resource_version)

    # replace with the current RV works; with a stale one is a 409 Conflict
    patched.spec.ports[0].port = 81
    replaced = core.replace_namespaced_service("py", ns, patched)
    assert replaced.spec.ports[0].port == 81 and replaced.spec.cluster_ip == created.spec.cluster_ip
    with pytest.raises(ApiException) as e:
        core.replace_namespaced_service("py", ns, patched)
    assert e.value.status == 409 and "the object has been modified" in e.value.body

    with pytest.raises(ApiException) as e:
        core.create_namespaced_service(ns, svc("py"))
    assert e.value.status == 409 and '"AlreadyExists"' in e.value.body

    core.delete_namespaced_service("py", ns)
    with pytest.raises(ApiException) as e:
        core.read_namespaced_service("py", ns)
    assert e.value.status == 404 and '"NotFound"' in e.value.body


def test_generate_name_and_labels(core: client.CoreV1Api, ns: str) -> None:
    names = set()
    for i in range(3):
        s = svc("", labels={"grp": "g", "i": str(i)})
        s.metadata.name = None
        s.metadata.generate_name = "gen-"
        names.add(core.create_namespaced_service(ns, s).metadata.name)
    assert len(names) == 3 and all(n.startswith("gen-") and len(n) == 9 for n in names)
    sel = core.list_namespaced_service(ns, label_selector="grp=g,i!=1").items
    assert sorted(s.metadata.labels["i"] for s in sel) == ["0", "2"]


def test_pagination(core: client.CoreV1Api, ns: str) -> None:
    for i in range(7):
        core.create_namespaced_service(ns, svc(f"page-{i}"))
    seen: list[str] = []
    token = None
    rvs = set()
    while True:
        page = core.list_namespaced_service(ns, limit=3, _continue=token)
        seen += [s.metadata.name for s in page.items]
        rvs.add(page.metadata.resource_version)
        token = page.metadata._continue
        if not token:
            break
        assert page.metadata.remaining_item_count is not None
    assert seen == sorted(f"page-{i}" for i in range(7))
    assert len(rvs) == 1  # every page is the same snapshot


def test_watch_from_resource_version(core: client.CoreV1Api, ns: str) -> None:
    first = core.create_namespaced_service(ns, svc("w1"))
    rv = first.metadata.resource_version
    core.patch_namespaced_service("w1", ns, {"metadata": {"labels": {"step": "2"}}})
    core.create_namespaced_service(ns, svc("w2"))
    core.delete_namespaced_service("w1", ns)
    w = watch.Watch()
    events = []
    for ev in w.stream(core.list_namespaced_service, ns, resource_version=rv, timeout_seconds=2):
        events.append((ev["type"], ev["object"].metadata.name))
        if len(events) == 3:
            w.stop()
    assert events == [("MODIFIED", "w1"), ("ADDED", "w2"), ("DELETED", "w1")]


def test_watch_without_rv_starts_with_current_state(core: client.CoreV1Api, ns: str) -> None:
    core.create_namespaced_service(ns, svc("s1"))
    w = watch.Watch()
    got = []
    for ev in w.stream(core.list_namespaced_service, ns, timeout_seconds=2):
        got.append((ev["type"], ev["object"].metadata.name))
        w.stop()
    assert got == [("ADDED", "s1")]


def test_watch_selector_enter_and_leave(core: client.CoreV1Api, ns: str) -> None:
    rv = core.create_namespaced_service(ns, svc("sel", labels={"app": "sel"})).metadata.resource_version
    core.patch_namespaced_service("sel", ns, {"metadata": {"labels": {"watched": "yes"}}})  # enters
    core.patch_namespaced_service("sel", ns, {"metadata": {"labels": {"other": "x"}}})  # still in
    core.patch_namespaced_service("sel", ns, {"metadata": {"labels": {"watched": None}}})  # leaves
    w = watch.Watch()
    got = []
    for ev in w.stream(core.list_namespaced_service, ns, resource_version=rv, label_selector="watched=yes",
                       timeout_seconds=2):
        got.append(ev["type"])
        if len(got) == 3:
            w.stop()
    assert got == ["ADDED", "MODIFIED", "DELETED"]


def test_bookmarks(apiserver_factory: Any) -> None:
    srv = apiserver_factory("--bookmark-interval", "0.3", "--controllers", "")
    c = api_client(srv)
    try:
        core = client.CoreV1Api(c)
        rv = core.list_namespace().metadata.resource_version
        w = watch.Watch()
        types = []
        for ev in w.stream(core.list_namespace, resource_version=rv, allow_watch_bookmarks=True, timeout_seconds=2):
            types.append(ev["type"])
            assert ev["raw_object"]["kind"] == "Namespace"
            if len(types) >= 2:
                w.stop()
        assert types[:2] == ["BOOKMARK", "BOOKMARK"]
        assert int(w.resource_version) >= int(rv)
        # without allowWatchBookmarks: none, the stream just times out
        assert [e["type"] for e in watch.Watch().stream(core.list_namespace, resource_version=rv,
                                                         timeout_seconds=1)] == []
    finally:
        c.close()


def test_410_after_compaction_then_relist_catches_up(apiserver_factory: Any) -> None:
    srv = apiserver_factory(
        "--watch-cache-history", "5", "--watch-cache-history-seconds", "0",
        "--compaction-retain-revisions", "5", "--compaction-retain-seconds", "0",
        "--etcd-compaction-interval", "0.2", "--controllers", "",
    )
    c = api_client(srv)
    try:
        core = client.CoreV1Api(c)
        old_rv = core.create_namespaced_service("default", svc("c0")).metadata.resource_version
        for i in range(1, 30):
            core.create_namespaced_service("default", svc(f"c{i}"))
        # the watch from the old RV answers HTTP 200 with one ERROR event: 410 Expired
        with pytest.raises(ApiException) as e:
            for _ in watch.Watch().stream(core.list_namespaced_service, "default", resource_version=old_rv,
                                          timeout_seconds=2):
                pass
        assert e.value.status == 410 and "Expired" in str(e.value.reason)
        # continue tokens from before compaction expire too
        deadline = time.monotonic() + 10
        page = core.list_namespaced_service("default", limit=2)
        for i in range(30, 45):
            core.create_namespaced_service("default", svc(f"c{i}"))
        while True:
            try:
                core.list_namespaced_service("default", limit=2, _continue=page.metadata._continue)
            except ApiException as ce:
                assert ce.status == 410 and '"Expired"' in ce.body
                break
            assert time.monotonic() < deadline, "continue token never expired"
            time.sleep(0.2)
        # the client's recovery: relist, then watch from the list's RV, and see later changes
        listing = core.list_namespaced_service("default")
        names = {s.metadata.name for s in listing.items}
        assert {f"c{i}" for i in range(45)} <= names
        seen: list[str] = []

        def later() -> None:
            time.sleep(0.3)
            core.create_namespaced_service("default", svc("after"))

        t = threading.Thread(target=later)
        t.start()
        w = watch.Watch()
        for ev in w.stream(core.list_namespaced_service, "default", resource_version=listing.metadata.resource_version,
                           timeout_seconds=5):
            seen.append(ev["object"].metadata.name)
            w.stop()
        t.join()
        assert seen == ["after"]
    finally:
        c.close()


def test_events_both_apis(core: client.CoreV1Api, apiserver: Any, ns: str) -> None:
    c = api_client(apiserver)
    try:
        ev_api = client.EventsV1Api(c)
        ref = client.V1ObjectReference(kind="Service", namespace=ns, name="x", api_version="v1")
        core.create_namespaced_event(ns, client.CoreV1Event(
            metadata=client.V1ObjectMeta(name="e1"), involved_object=ref, reason="Tested", message="hello",
            type="Normal", event_time=datetime.datetime.now(datetime.UTC),
            reporting_component="kpx/test", reporting_instance="i0", action="Test"))
        new = ev_api.list_namespaced_event(ns).items
        assert [(e.metadata.name, e.note, e.regarding.name) for e in new] == [("e1", "hello", "x")]
        ev_api.create_namespaced_event(ns, client.EventsV1Event(
            metadata=client.V1ObjectMeta(name="e2"), regarding=ref, reason="Tested", note="second",
            event_time=datetime.datetime.now(datetime.UTC), type="Normal", action="Test", reporting_controller="kpx/test",
            reporting_instance="i1"))
        old = core.list_namespaced_event(ns, field_selector="involvedObject.name=x").items
        assert sorted((e.metadata.name, e.message) for e in old) == [("e1", "hello"), ("e2", "second")]
        ev_api.patch_namespaced_event("e2", ns, {"note": "patched"})
        assert core.read_namespaced_event("e2", ns).message == "patched"
    finally:
        c.close()
