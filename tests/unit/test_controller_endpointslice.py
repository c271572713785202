"""EndpointSlice desired state: endpoints, conditions, ports by name, zones, splitting at 100,
minimal churn, placeholder slices, trigger times."""

from __future__ import annotations

from typing import Any

import pytest

from controlplane.controllers.endpointslice import (
    CONTROLLER_NAME,
    MANAGED_BY_LABEL,
    SERVICE_NAME_LABEL,
    TRIGGER_TIME_ANNOTATION,
    TriggerTimeTracker,
    desired_groups,
    plan_slices,
)

pytestmark = pytest.mark.unit

T0 = "2026-12-01T10:00:00Z"


def svc(name: str = "web", ports: list[dict[str, Any]] | None = None, **spec: Any) -> dict[str, Any]:
    return {
        "metadata": {"name": name, "namespace": "default", "uid": f"uid-{name}", "creationTimestamp": T0,
                     "labels": {"app": name, "tier": "front"}},
        "spec": {"selector": {"app": name}, "clusterIP": "10.96.0.10",
                 "ports": ports or [{"name": "http", "port": 80, "targetPort": 8080, "protocol": "TCP"}], **spec},
    }


def pod(name: str, ip: str, ready: bool = True, node: str = "node1", deleted: bool = False,
        phase: str = "Running", ready_at: str = T0, ports: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    m: dict[str, Any] = {"name": name, "namespace": "default", "uid": f"uid-{name}", "labels": {"app": "web"}}
    if deleted:
        m["deletionTimestamp"] = "2026-12-01T10:05:30Z"
        m["deletionGracePeriodSeconds"] = 30
    return {
        "metadata": m,
        "spec": {"nodeName": node, "containers": [{"name": "c", "ports": ports or []}]},
        "status": {"phase": phase, "podIP": ip, "podIPs": [{"ip": ip}],
                   "conditions": [{"type": "Ready", "status": "True" if ready else "False",
                                   "lastTransitionTime": ready_at}]},
    }


def zones(node: str) -> str | None:
    return {"node1": "zone-a", "node2": "zone-b"}.get(node)


def materialize(plan_create: list[dict[str, Any]], start: int = 0) -> list[dict[str, Any]]:
    """What the apiserver would store: named slices with a uid and a resourceVersion."""
    out = []
    for i, s in enumerate(plan_create, start):
        s = {**s, "metadata": {**s["metadata"], "name": f"web-{i:05d}", "uid": f"slice-{i}",
                               "resourceVersion": str(100 + i)}}
        out.append(s)
    return out


def test_endpoint_conditions_node_zone_and_target_ref() -> None:
    s = svc()
    pods = [pod("a", "10.244.1.2"), pod("b", "10.244.2.2", ready=False, node="node2"),
            pod("c", "10.244.1.3", deleted=True), pod("d", "10.244.1.4", phase="Succeeded"),
            {**pod("e", ""), "status": {"phase": "Pending"}}]
    groups = desired_groups(s, pods, zones)
    assert len(groups) == 1
    (g,) = groups.values()
    eps = {e["targetRef"]["name"]: e for e in g.endpoints.values()}
    assert set(eps) == {"a", "b", "c"}  # terminal and IP-less pods are left out
    assert eps["a"]["conditions"] == {"ready": True, "serving": True, "terminating": False}
    assert eps["b"]["conditions"] == {"ready": False, "serving": False, "terminating": False}
    assert eps["c"]["conditions"] == {"ready": False, "serving": True, "terminating": True}
    assert eps["a"]["nodeName"] == "node1" and eps["a"]["zone"] == "zone-a"
    assert eps["b"]["zone"] == "zone-b"
    assert eps["a"]["targetRef"] == {"kind": "Pod", "namespace": "default", "name": "a", "uid": "uid-a"}
    assert eps["a"]["addresses"] == ["10.244.1.2"]
    assert g.ports == [{"name": "http", "port": 8080, "protocol": "TCP"}]


def test_publish_not_ready_addresses_marks_everything_ready() -> None:
    (g,) = desired_groups(svc(publishNotReadyAddresses=True), [pod("b", "10.244.2.2", ready=False)], zones).values()
    (ep,) = g.endpoints.values()
    assert ep["conditions"]["ready"] and ep["conditions"]["serving"]


def test_named_target_port_resolves_per_pod_and_groups_by_port_set() -> None:
    s = svc(ports=[{"name": "http", "port": 80, "targetPort": "web", "protocol": "TCP"},
                   {"name": "dns", "port": 53, "targetPort": 5353, "protocol": "UDP"}])
    pods = [pod("a", "10.244.1.2", ports=[{"name": "web", "containerPort": 8080, "protocol": "TCP"}]),
            pod("b", "10.244.1.3", ports=[{"name": "web", "containerPort": 9090}]),
            pod("c", "10.244.1.4")]  # declares no "web" port: only the dns port applies
    groups = desired_groups(s, pods, zones)
    by_pod = {next(iter(g.endpoints.values()))["targetRef"]["name"]: g.ports for g in groups.values()}
    assert by_pod["a"] == [{"name": "http", "port": 8080, "protocol": "TCP"}, {"name": "dns", "port": 5353, "protocol": "UDP"}]
    assert by_pod["b"][0]["port"] == 9090
    assert by_pod["c"] == [{"name": "dns", "port": 5353, "protocol": "UDP"}]
    plan = plan_slices(s, groups, [], None)
    assert len(plan.create) == 3  # one slice per distinct port set


def test_new_slices_metadata_and_split_at_100() -> None:
    s = svc()
    pods = [pod(f"p{i:03d}", f"10.244.{i // 200}.{i % 200 + 2}") for i in range(250)]
    plan = plan_slices(s, desired_groups(s, pods, zones), [], TriggerTimeTracker().compute(s, pods))
    assert [len(x["endpoints"]) for x in plan.create] == [100, 100, 50]
    assert not plan.update and not plan.delete
    md = plan.create[0]["metadata"]
    assert md["generateName"] == "web-" and md["namespace"] == "default"
    assert md["labels"] == {"app": "web", "tier": "front", SERVICE_NAME_LABEL: "web", MANAGED_BY_LABEL: CONTROLLER_NAME}
    assert md["ownerReferences"] == [{"apiVersion": "v1", "kind": "Service", "name": "web", "uid": "uid-web",
                                      "controller": True, "blockOwnerDeletion": True}]
    assert md["annotations"][TRIGGER_TIME_ANNOTATION] == T0
    assert plan.create[0]["addressType"] == "IPv4"
    addrs = [e["addresses"][0] for x in plan.create for e in x["endpoints"]]
    assert len(set(addrs)) == 250


def test_no_write_when_nothing_changed_and_in_place_update() -> None:
    s = svc()
    pods = [pod(f"p{i:03d}", f"10.244.1.{i + 2}") for i in range(150)]
    existing = materialize(plan_slices(s, desired_groups(s, pods, zones), [], None).create)
    again = plan_slices(s, desired_groups(s, pods, zones), existing, None)
    assert again.empty
    # one pod turns unready: only the slice holding it is rewritten, in place
    pods[120] = pod("p120", "10.244.1.122", ready=False)
    p = plan_slices(s, desired_groups(s, pods, zones), existing, None)
    assert not p.create and not p.delete and len(p.update) == 1
    upd = p.update[0]
    assert upd["metadata"]["name"] == existing[1]["metadata"]["name"]
    assert upd["metadata"]["resourceVersion"] == existing[1]["metadata"]["resourceVersion"]  # CAS on it
    changed = [e for e in upd["endpoints"] if e["targetRef"]["name"] == "p120"]
    assert changed[0]["conditions"]["ready"] is False
    assert [e["targetRef"]["name"] for e in upd["endpoints"]] == [e["targetRef"]["name"] for e in existing[1]["endpoints"]]


def test_server_defaults_do_not_look_like_changes() -> None:
    s = svc()
    pods = [pod("a", "10.244.1.2")]
    (created,) = materialize(plan_slices(s, desired_groups(s, pods, zones), [], None).create)
    # what a server might return: nil conditions mean ready/serving, extra defaulted fields
    ep = dict(created["endpoints"][0])
    ep["conditions"] = {"ready": True}
    stored = {**created, "endpoints": [ep], "ports": [{"name": "http", "port": 8080, "protocol": "TCP"}]}
    assert plan_slices(s, desired_groups(s, pods, zones), [stored], None).empty


def test_added_endpoints_go_to_a_slice_with_room_not_a_new_one() -> None:
    s = svc()
    pods = [pod(f"p{i:03d}", f"10.244.1.{i + 2}") for i in range(150)]
    existing = materialize(plan_slices(s, desired_groups(s, pods, zones), [], None).create)
    pods.append(pod("zz", "10.244.3.9"))
    p = plan_slices(s, desired_groups(s, pods, zones), existing, None)
    assert not p.create and not p.delete and len(p.update) == 1
    assert len(p.update[0]["endpoints"]) == 51  # the half-full slice took it


def test_removed_pods_shrink_slices_and_empty_ones_are_recycled() -> None:
    s = svc()
    pods = [pod(f"p{i:03d}", f"10.244.1.{i + 2}") for i in range(150)]
    existing = materialize(plan_slices(s, desired_groups(s, pods, zones), [], None).create)
    p = plan_slices(s, desired_groups(s, pods[:100], zones), existing, None)
    assert not p.create and not p.update and [d["metadata"]["name"] for d in p.delete] == [existing[1]["metadata"]["name"]]
    # all pods gone: one placeholder slice remains (the first, emptied), the other is deleted
    p = plan_slices(s, desired_groups(s, [], zones), existing, None)
    assert not p.create and len(p.update) == 1 and len(p.delete) == 1
    assert p.update[0]["endpoints"] == [] and p.update[0]["ports"] == []


def test_placeholder_for_service_without_pods() -> None:
    s = svc()
    p = plan_slices(s, desired_groups(s, [], zones), [], None)
    assert len(p.create) == 1 and p.create[0]["endpoints"] == [] and p.create[0]["ports"] == []
    assert plan_slices(s, desired_groups(s, [], zones), materialize(p.create), None).empty
    # the first pod recycles the placeholder instead of creating a second slice
    p2 = plan_slices(s, desired_groups(s, [pod("a", "10.244.1.2")], zones), materialize(p.create), None)
    assert not p2.create and not p2.delete and len(p2.update) == 1 and len(p2.update[0]["endpoints"]) == 1


def test_dual_stack_one_slice_set_per_family() -> None:
    s = svc(ipFamilies=["IPv4", "IPv6"], clusterIPs=["10.96.0.10", "fd00::a"])
    p = pod("a", "10.244.1.2")
    p["status"]["podIPs"] = [{"ip": "10.244.1.2"}, {"ip": "fd00:10:244:1::2"}]
    plan = plan_slices(s, desired_groups(s, [p], zones), [], None)
    assert sorted((x["addressType"], x["endpoints"][0]["addresses"][0]) for x in plan.create) == [
        ("IPv4", "10.244.1.2"), ("IPv6", "fd00:10:244:1::2")]


def test_slices_of_a_previous_service_incarnation_are_deleted() -> None:
    s = svc()
    existing = materialize(plan_slices(s, desired_groups(s, [pod("a", "10.244.1.2")], zones), [], None).create)
    reborn = {**s, "metadata": {**s["metadata"], "uid": "uid-web-2"}}
    p = plan_slices(reborn, desired_groups(reborn, [pod("a", "10.244.1.2")], zones), existing, None)
    assert len(p.delete) == 1 and len(p.create) == 1
    assert p.create[0]["metadata"]["ownerReferences"][0]["uid"] == "uid-web-2"


def test_service_label_change_updates_slice_labels_only() -> None:
    s = svc()
    pods = [pod("a", "10.244.1.2")]
    existing = materialize(plan_slices(s, desired_groups(s, pods, zones), [], None).create)
    s2 = {**s, "metadata": {**s["metadata"], "labels": {"app": "web", "tier": "back"}}}
    p = plan_slices(s2, desired_groups(s2, pods, zones), existing, None)
    assert len(p.update) == 1 and p.update[0]["metadata"]["labels"]["tier"] == "back"
    assert p.update[0]["endpoints"] == existing[0]["endpoints"]
    # a label removed from the Service goes from its slices too
    s3 = {**s, "metadata": {**s["metadata"], "labels": {"app": "web"}}}
    p = plan_slices(s3, desired_groups(s3, pods, zones), existing, None)
    assert len(p.update) == 1 and "tier" not in p.update[0]["metadata"]["labels"]


def test_trigger_time_tracker_follows_upstream() -> None:
    tr = TriggerTimeTracker()
    s = svc()
    pods = [pod("a", "10.244.1.2", ready_at="2026-12-01T10:01:00Z")]
    first = tr.compute(s, pods)
    assert first is not None and first.isoformat() == "2026-12-01T10:00:00+00:00"  # new Service: its creation
    assert tr.compute(s, pods) is None  # nothing changed since: no annotation
    pods2 = [pod("a", "10.244.1.2", ready_at="2026-12-01T10:03:00Z"),
             pod("b", "10.244.1.3", ready_at="2026-12-01T10:02:00Z")]
    t = tr.compute(s, pods2)
    assert t is not None and t.isoformat() == "2026-12-01T10:02:00+00:00"  # earliest of the changes
    # a deletion request (deletionTimestamp - grace) counts as a change of the pod
    pods3 = [pod("a", "10.244.1.2", ready_at="2026-12-01T10:03:00Z", deleted=True), pods2[1]]
    t = tr.compute(s, pods3)
    assert t is not None and t.isoformat() == "2026-12-01T10:05:00+00:00"
    plan = plan_slices(s, desired_groups(s, pods3, zones), [], t)
    assert plan.create[0]["metadata"]["annotations"][TRIGGER_TIME_ANNOTATION] == "2026-12-01T10:05:00Z"


def test_traffic_distribution_hints() -> None:
    pods = [pod("a", "10.244.1.2"), pod("b", "10.244.2.2", node="node2"), pod("c", "10.244.3.2", node="node3"),
            pod("d", "10.244.1.3", ready=False)]
    def eps(s: dict[str, Any]) -> dict[str, Any]:
        (g,) = desired_groups(s, pods, zones).values()
        return {e["targetRef"]["name"]: e.get("hints") for e in g.endpoints.values()}
    assert eps(svc()) == {"a": None, "b": None, "c": None, "d": None}
    assert eps(svc(trafficDistribution="PreferClose")) == {
        "a": {"forZones": [{"name": "zone-a"}]}, "b": {"forZones": [{"name": "zone-b"}]},
        "c": None,  # its node has no zone
        "d": None}  # not ready
    assert eps(svc(trafficDistribution="PreferSameNode"))["a"] == {
        "forZones": [{"name": "zone-a"}], "forNodes": [{"name": "node1"}]}
    assert eps(svc(trafficDistribution="PreferSameNode"))["c"] == {"forNodes": [{"name": "node3"}]}
    # turning it on rewrites the slice; the hinted slice is then stable
    s = svc()
    existing = materialize(plan_slices(s, desired_groups(s, pods, zones), [], None).create)
    s2 = svc(trafficDistribution="PreferClose")
    p = plan_slices(s2, desired_groups(s2, pods, zones), existing, None)
    assert len(p.update) == 1
    assert plan_slices(s2, desired_groups(s2, pods, zones), [p.update[0]], None).empty
