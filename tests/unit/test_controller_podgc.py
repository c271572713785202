"""Pod lifecycle: when a terminating or orphaned pod is force-deleted."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import pytest

from controlplane.controllers.podgc import force_delete_after

pytestmark = pytest.mark.unit

AT = datetime(2026, 12, 1, 10, 0, 0, tzinfo=UTC)


def pod(deleted_at: str | None = None, grace: int = 30, node: str | None = "n1") -> dict[str, Any]:
    m: dict[str, Any] = {"name": "p", "namespace": "default"}
    if deleted_at:
        m["deletionTimestamp"] = deleted_at
        m["deletionGracePeriodSeconds"] = grace
    return {"metadata": m, "spec": {"nodeName": node} if node else {}}


def node(ready: bool, since: str = "2026-12-01T09:59:00Z") -> dict[str, Any]:
    return {"metadata": {"name": "n1"},
            "status": {"conditions": [{"type": "Ready", "status": "True" if ready else "False",
                                       "lastTransitionTime": since}]}}


def test_running_pod_on_live_node_is_left_alone() -> None:
    assert force_delete_after(pod(), node(True), False, AT) is None
    assert force_delete_after(pod(node=None), None, False, AT) is None


def test_orphan_of_deleted_node_goes_at_once() -> None:
    assert force_delete_after(pod(), None, True, AT) == 0.0
    # a node never seen (pod created with a preset nodeName ahead of its node) is not an orphan
    assert force_delete_after(pod(), None, False, AT) is None


def test_terminating_waits_for_deadline_then_needs_a_lost_node() -> None:
    assert force_delete_after(pod("2026-12-01T10:00:20Z"), None, False, AT) == 20.0
    assert force_delete_after(pod("2026-12-01T09:59:59Z"), None, False, AT) == 0.0
    assert force_delete_after(pod("2026-12-01T09:59:59Z"), node(True), False, AT) is None  # the node agent's job


def test_notready_node_must_be_notready_for_the_grace_period() -> None:
    p = pod("2026-12-01T09:59:50Z", grace=30)
    assert force_delete_after(p, node(False, since="2026-12-01T09:59:45Z"), False, AT) == 15.0
    assert force_delete_after(p, node(False, since="2026-12-01T09:59:00Z"), False, AT) == 0.0
