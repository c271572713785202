"""Node lifecycle: when a Node without fresh status turns Unknown, and what that status is."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import pytest

from controlplane.controllers.nodelifecycle import MESSAGE, REASON, heartbeat_deadline, unknown_status

pytestmark = pytest.mark.unit


def node(status: str = "True", heartbeat: str | None = "2026-12-01T10:00:00Z") -> dict[str, Any]:
    ready: dict[str, Any] = {"type": "Ready", "status": status, "reason": "KubeletReady",
                             "lastTransitionTime": "2026-12-01T09:00:00Z"}
    if heartbeat:
        ready["lastHeartbeatTime"] = heartbeat
    return {"metadata": {"name": "n1"}, "status": {"conditions": [
        ready, {"type": "MemoryPressure", "status": "False", "lastHeartbeatTime": heartbeat}],
        "addresses": [{"type": "InternalIP", "address": "192.168.56.11"}]}}


def test_deadline_is_last_heartbeat_plus_grace() -> None:
    assert heartbeat_deadline(node(), 40) == datetime(2026, 12, 1, 10, 0, 40, tzinfo=UTC)
    assert heartbeat_deadline(node("False"), 40) is not None  # NotReady but posting: still monitored
    assert heartbeat_deadline(node(heartbeat=None), 40) is None  # never posted: not monitored
    assert heartbeat_deadline(node("Unknown"), 40) is None  # already marked


def test_unknown_status_marks_every_condition_and_keeps_the_rest() -> None:
    n = node()
    at = datetime(2026, 12, 1, 10, 1, 0, tzinfo=UTC)
    st = unknown_status(n, at)
    assert [(c["type"], c["status"], c["reason"], c["message"], c["lastTransitionTime"]) for c in st["conditions"]] == [
        ("Ready", "Unknown", REASON, MESSAGE, "2026-12-01T10:01:00Z"),
        ("MemoryPressure", "Unknown", REASON, MESSAGE, "2026-12-01T10:01:00Z")]
    assert st["addresses"] == n["status"]["addresses"]
    assert n["status"]["conditions"][0]["status"] == "True"  # input untouched
