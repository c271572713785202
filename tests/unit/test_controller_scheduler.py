"""Scheduler decisions: feasibility (Ready, unschedulable, taints, nodeSelector) and spreading."""

from __future__ import annotations

from typing import Any

import pytest

from controlplane.controllers.scheduler import needs_scheduling, pick_node, tolerates, unfit_reason

pytestmark = pytest.mark.unit


def node(name: str, ready: bool = True, **spec: Any) -> dict[str, Any]:
    return {"metadata": {"name": name, "labels": {"kubernetes.io/hostname": name}}, "spec": spec,
            "status": {"conditions": [{"type": "Ready", "status": "True" if ready else "False"}]}}


def pod(**spec: Any) -> dict[str, Any]:
    return {"metadata": {"name": "p", "namespace": "default"}, "spec": {"containers": [{"name": "c"}], **spec},
            "status": {"phase": "Pending"}}


def test_fewest_pods_first_then_name() -> None:
    nodes = [node("n3"), node("n1"), node("n2")]
    assert pick_node(pod(), nodes, {"n1": 2, "n2": 1, "n3": 1}) == ("n2", "")
    assert pick_node(pod(), nodes, {}) == ("n1", "")


def test_spreading_a_burst_is_even() -> None:
    nodes = [node("a"), node("b"), node("c")]
    counts: dict[str, int] = {}
    for _ in range(9):
        n, _why = pick_node(pod(), nodes, counts)
        assert n is not None
        counts[n] = counts.get(n, 0) + 1
    assert counts == {"a": 3, "b": 3, "c": 3}


def test_no_ready_node_gives_unschedulable_message() -> None:
    nodes = [node("n1", ready=False), node("n2", unschedulable=True)]
    n, why = pick_node(pod(), nodes, {})
    assert n is None
    assert why == "0/2 nodes are available: 1 node(s) were not ready, 1 node(s) were unschedulable."
    assert pick_node(pod(), [], {}) == (None, "0/0 nodes are available.")


def test_taints_and_tolerations() -> None:
    taint = {"key": "dedicated", "value": "gpu", "effect": "NoSchedule"}
    n = node("n1", taints=[taint])
    assert unfit_reason(pod(), n) == "node(s) had untolerated taint"
    assert unfit_reason(pod(tolerations=[{"key": "dedicated", "value": "gpu", "effect": "NoSchedule"}]), n) is None
    assert tolerates(pod(tolerations=[{"key": "dedicated", "operator": "Exists"}]), taint)
    assert tolerates(pod(tolerations=[{"operator": "Exists"}]), taint)
    assert not tolerates(pod(tolerations=[{"key": "dedicated", "value": "cpu"}]), taint)
    assert unfit_reason(pod(), node("n2", taints=[{"key": "x", "effect": "PreferNoSchedule"}])) is None


def test_node_selector() -> None:
    assert pick_node(pod(nodeSelector={"kubernetes.io/hostname": "n2"}), [node("n1"), node("n2")], {}) == ("n2", "")


def test_which_pods_need_scheduling() -> None:
    assert needs_scheduling(pod())
    assert not needs_scheduling(pod(nodeName="n1"))  # preset nodeName is kept
    assert not needs_scheduling(pod(schedulerName="other"))
    done = pod()
    done["status"]["phase"] = "Succeeded"
    assert not needs_scheduling(done)
    gone = pod()
    gone["metadata"]["deletionTimestamp"] = "2026-12-01T10:00:00Z"
    assert not needs_scheduling(gone)
