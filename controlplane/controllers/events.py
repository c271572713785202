"""Core v1 Events from the controllers (what `kubectl describe` and `kubectl get events` show),
named like client-go's recorder: `<object name>.<hex timestamp>`. Recording never fails a sync."""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping
from typing import Any

from controlplane.controllers.api import Registry
from controlplane.controllers.objects import format_time, meta, now

log = logging.getLogger("kpx.controllers.events")


def event_for(obj: Mapping[str, Any], kind: str, etype: str, reason: str, message: str,
              component: str) -> dict[str, Any]:
    m = meta(obj)
    ts = format_time(now())
    ns = m.get("namespace") or "default"
    return {
        "apiVersion": "v1", "kind": "Event",
        "metadata": {"name": f"{m.get('name')}.{time.time_ns():x}", "namespace": ns},
        "involvedObject": {"apiVersion": "v1", "kind": kind, "namespace": m.get("namespace") or "",
                           "name": m.get("name") or "", "uid": m.get("uid") or "",
                           "resourceVersion": m.get("resourceVersion") or ""},
        "reason": reason, "message": message, "type": etype,
        "source": {"component": component},
        "firstTimestamp": ts, "lastTimestamp": ts, "count": 1,
        "reportingComponent": component, "reportingInstance": f"{component}-kpx",
    }


async def record(registry: Registry, obj: Mapping[str, Any], kind: str, etype: str, reason: str, message: str,
                 component: str) -> None:
    ev = event_for(obj, kind, etype, reason, message, component)
    try:
        await registry.create("events", ev, namespace=ev["metadata"]["namespace"])
    except Exception as e:  # e.g. the namespace is terminating
        log.debug("event %s %s not recorded: %s", reason, ev["metadata"]["name"], e)
