"""Topology-aware hints (topology-mode: Auto): zone CPU shares, allocations, redistribution."""

from __future__ import annotations

from typing import Any

import pytest

from controlplane.controllers.endpointslice import desired_groups
from controlplane.controllers.topology import allocations, assign_zone_hints, cpu_millis, zone_cpu_ratios

pytestmark = pytest.mark.unit


def node(name: str, zone: str | None, cpu: str | None = "2", ready: bool = True, **labels: str) -> dict[str, Any]:
    lab = dict(labels)
    if zone:
        lab["topology.kubernetes.io/zone"] = zone
    st: dict[str, Any] = {"conditions": [{"type": "Ready", "status": "True" if ready else "False"}]}
    if cpu:
        st["allocatable"] = {"cpu": cpu}
    return {"metadata": {"name": name, "labels": lab}, "status": st}


def ep(zone: str | None, ready: bool = True) -> dict[str, Any]:
    e: dict[str, Any] = {"addresses": ["10.0.0.1"], "conditions": {"ready": ready}}
    if zone:
        e["zone"] = zone
    return e


def hinted(eps: list[dict[str, Any]]) -> dict[str, int]:
    out: dict[str, int] = {}
    for e in eps:
        for z in (e.get("hints") or {}).get("forZones") or ():
            out[z["name"]] = out.get(z["name"], 0) + 1
    return out


def test_cpu_quantities() -> None:
    assert (cpu_millis("2"), cpu_millis("1500m"), cpu_millis("0.5"), cpu_millis(None), cpu_millis("x")) == (
        2000, 1500, 500, 0, 0)


def test_zone_shares_from_ready_worker_nodes() -> None:
    nodes = [node("a1", "a", "4"), node("a2", "a", "2"), node("b1", "b", "3"),
             node("cp", "c", "8", **{"node-role.kubernetes.io/control-plane": ""}), node("down", "c", "8", ready=False)]
    assert zone_cpu_ratios(nodes) == {"a": 6 / 9, "b": 3 / 9}
    assert zone_cpu_ratios([*nodes, node("nozone", None)]) is None
    assert zone_cpu_ratios([*nodes, node("nocpu", "b", None)]) is None
    assert zone_cpu_ratios([node("a1", "a"), node("a2", "a")]) == {"a": 1.0}  # one zone: allocations refuse it


def test_allocations_and_overload_threshold() -> None:
    a = allocations({"a": 2 / 3, "b": 1 / 3}, 6)
    assert a is not None
    assert (a["a"].minimum, a["a"].maximum, round(a["a"].desired, 6)) == (4, 4, 4.0)
    assert (a["b"].minimum, a["b"].maximum) == (2, 2)
    assert allocations({"a": 0.5, "b": 0.5}, 1) is None  # fewer endpoints than zones
    assert allocations({"a": 0.9, "b": 0.05, "c": 0.05}, 3) is None  # minimums exceed the endpoints


def test_surplus_zone_lends_endpoints() -> None:
    eps = [ep("a") for _ in range(5)] + [ep("b"), ep("a", ready=False)]
    assert assign_zone_hints(eps, {"a": 2 / 3, "b": 1 / 3}) == ""
    assert hinted(eps) == {"a": 4, "b": 2}  # one zone-a endpoint now serves zone b
    assert "hints" not in eps[-1]  # not ready: no hint


def test_hints_off_when_they_cannot_be_fair() -> None:
    eps = [ep("a"), ep(None), ep("b"), ep("a")]
    assert assign_zone_hints(eps, {"a": 0.5, "b": 0.5}) == "One or more endpoints do not have a zone specified"
    assert hinted(eps) == {}
    eps = [ep("a"), ep("b")]
    assert assign_zone_hints(eps, None).startswith("Insufficient Node information")
    assert assign_zone_hints(eps, {"a": 1.0}) == "Nodes only ready in one zone"
    assert assign_zone_hints([ep("a")], {"a": 0.5, "b": 0.5}) == "Insufficient number of endpoints (1 endpoints, 2 zones)"
    assert assign_zone_hints([ep("a")] * 3, {"a": 0.9, "b": 0.05, "c": 0.05}).startswith("Unable to allocate minimum")


def test_desired_groups_with_the_annotation() -> None:
    svc = {"metadata": {"name": "web", "namespace": "default", "uid": "u",
                        "annotations": {"service.kubernetes.io/topology-mode": "Auto"}},
           "spec": {"selector": {"app": "web"}, "ports": [{"port": 80, "targetPort": 8080}]}}
    pods = []
    for i, n in enumerate(["n1", "n1", "n1", "n2"]):
        pods.append({"metadata": {"name": f"p{i}", "namespace": "default", "uid": f"p{i}", "labels": {"app": "web"}},
                     "spec": {"nodeName": n, "containers": [{"name": "c"}]},
                     "status": {"phase": "Running", "podIP": f"10.244.0.{i + 2}",
                                "conditions": [{"type": "Ready", "status": "True"}]}})
    zone_of = {"n1": "a", "n2": "b"}.get
    (g,) = desired_groups(svc, pods, zone_of, {"a": 0.5, "b": 0.5}).values()
    assert hinted(list(g.endpoints.values())) == {"a": 2, "b": 2}
    (g,) = desired_groups(svc, pods, zone_of, None).values()
    assert hinted(list(g.endpoints.values())) == {}
