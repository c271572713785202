"""core/v1 Event <-> events.k8s.io/v1 Event (one stored object, two API shapes).

Field mapping as k/k pkg/apis/events/v1/conversion.go: involvedObject<->regarding, message<->note,
source.component<->deprecatedSource.component, first/lastTimestamp<->deprecatedFirst/LastTimestamp,
count<->deprecatedCount, reportingComponent<->reportingController. Objects are stored in the core shape.
"""

from __future__ import annotations

from typing import Any

_CORE_TO_NEW = (
    ("involvedObject", "regarding"),
    ("message", "note"),
    ("source", "deprecatedSource"),
    ("firstTimestamp", "deprecatedFirstTimestamp"),
    ("lastTimestamp", "deprecatedLastTimestamp"),
    ("count", "deprecatedCount"),
    ("reportingComponent", "reportingController"),
)
_SAME = ("metadata", "eventTime", "series", "reportingInstance", "action", "reason", "related", "type")


def to_events_v1(core: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {"kind": "Event", "apiVersion": "events.k8s.io/v1"}
    for k in _SAME:
        if k in core:
            out[k] = core[k]
    for old, new in _CORE_TO_NEW:
        if old in core:
            out[new] = core[old]
    return out


def to_core(ev: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {"kind": "Event", "apiVersion": "v1"}
    for k in _SAME:
        if k in ev:
            out[k] = ev[k]
    for old, new in _CORE_TO_NEW:
        if new in ev:
            out[old] = ev[new]
    return out
