"""Node lifecycle (the part of upstream's node lifecycle controller kpx needs): a Node whose agent
stopped posting status — its Ready condition's lastHeartbeatTime is older than the grace period
(upstream --node-monitor-grace-period) — gets every condition set to Unknown, reason
NodeStatusUnknown, "Kubelet stopped posting node status.". The scheduler then skips it and the
pod lifecycle controller force-deletes its terminating Pods. Nodes that never posted a heartbeat
(static test Nodes) are left alone; the agent's next heartbeat makes the Node Ready again."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from datetime import datetime, timedelta
from typing import Any

from controlplane.controllers.api import Obj, Registry, is_conflict, is_not_found
from controlplane.controllers.base import Controller
from controlplane.controllers.informer import InformerFactory
from controlplane.controllers.objects import condition, format_time, meta, now, parse_time

DEFAULT_GRACE = 40.0  # seconds (upstream default before 1.32; 50 s since)
REASON = "NodeStatusUnknown"
MESSAGE = "Kubelet stopped posting node status."


def heartbeat_deadline(node: Mapping[str, Any], grace: float) -> datetime | None:
    """When the Node counts as lost if no newer status arrives; None: not monitored (no
    heartbeat ever, or already Unknown)."""
    c = condition(node, "Ready")
    if c is None or c.get("status") == "Unknown":
        return None
    hb = parse_time(c.get("lastHeartbeatTime"))
    return None if hb is None else hb + timedelta(seconds=grace)


def unknown_status(node: Mapping[str, Any], at: datetime) -> dict[str, Any]:
    """The Node's status with every condition Unknown (transition time = `at`)."""
    status = dict(node.get("status") or {})
    ts = format_time(at)
    conds = []
    for c in status.get("conditions") or ():
        c = dict(c)
        if c.get("status") != "Unknown":
            c.update(status="Unknown", reason=REASON, message=MESSAGE, lastTransitionTime=ts)
        conds.append(c)
    status["conditions"] = conds
    return status


class NodeLifecycleController(Controller[str]):
    name = "nodelifecycle"
    needs = ("nodes",)
    resync_period = 30.0

    def __init__(self, registry: Registry, informers: InformerFactory, grace: float = DEFAULT_GRACE) -> None:
        super().__init__(registry, informers)
        self.grace = grace
        self.nodes = informers.informer("nodes")
        self.nodes.add_handler(self._event, lambda o, n: self._event(n), origin=self.name)
        self.marked = 0

    def _event(self, node: Obj) -> None:
        if heartbeat_deadline(node, self.grace) is not None:
            self.queue.add(meta(node).get("name") or "")

    def all_keys(self) -> Iterable[str]:
        return [meta(n).get("name") or "" for n in self.nodes.items()]

    async def sync(self, name: str) -> None:
        node = self.nodes.get(None, name)
        if node is None:
            return
        deadline = heartbeat_deadline(node, self.grace)
        if deadline is None:
            return
        at = now()
        if at < deadline:
            self.queue.add_after(name, (deadline - at).total_seconds() + 0.1)
            return
        try:
            await self.registry.update_status("nodes", {**node, "status": unknown_status(node, at)})
        except Exception as e:
            if is_not_found(e) or is_conflict(e):  # gone, or a heartbeat just arrived
                return
            raise
        self.marked += 1
        self.log.info("controller=%s node=%s Ready=Unknown: no status for %.0fs",
                      self.name, name, self.grace)
