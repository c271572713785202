"""Pod lifecycle: the apiserver marks a Pod bound to a node deleted (deletionTimestamp = request
time + grace, deletionGracePeriodSeconds = grace) and its node agent removes it with grace 0
once its containers stopped. When the node cannot do that, this controller force-deletes:
- the Pod's Node object was deleted (orphan, as upstream PodGC), confirmed by a live read;
- the Pod is terminating, its deadline (deletionTimestamp) passed, and its Node is missing, or
  NotReady for longer than the Pod's grace period.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from datetime import datetime, timedelta
from typing import Any

from controlplane.controllers.api import Obj, Registry, is_conflict, is_not_found
from controlplane.controllers.base import Controller
from controlplane.controllers.informer import InformerFactory
from controlplane.controllers.objects import (
    Key,
    condition,
    deleting,
    key_of,
    meta,
    node_ready,
    now,
    parse_time,
    uid_of,
)

NODE_INDEX = "podgc-node"


def force_delete_after(
    pod: Mapping[str, Any], node: Mapping[str, Any] | None, node_deleted: bool, at: datetime
) -> float | None:
    """Seconds from `at` until `pod` should be force-deleted (<= 0: now), None: never (the
    node agent handles it, or nothing is wrong)."""
    node_name = (pod.get("spec") or {}).get("nodeName")
    if not node_name:
        return None
    if node is None and node_deleted:
        return 0.0
    if not deleting(pod):
        return None
    m = meta(pod)
    deadline = parse_time(m.get("deletionTimestamp")) or at
    if at < deadline:
        return (deadline - at).total_seconds()
    if node is None:
        return 0.0
    if node_ready(node):
        return None
    grace = timedelta(seconds=int(m.get("deletionGracePeriodSeconds") or 0))
    c = condition(node, "Ready")
    since = (parse_time(c.get("lastTransitionTime")) if c else None) or deadline
    return max((since + grace - at).total_seconds(), 0.0)


class PodLifecycleController(Controller[Key]):
    name = "podgc"
    needs = ("pods", "nodes")
    resync_period = 30.0

    def __init__(self, registry: Registry, informers: InformerFactory) -> None:
        super().__init__(registry, informers)
        self.pods = informers.informer("pods")
        self.nodes = informers.informer("nodes")
        self.pods.add_index(NODE_INDEX, lambda p: [n] if (n := (p.get("spec") or {}).get("nodeName")) else [])
        self.pods.add_handler(self._pod_event, lambda o, n: self._pod_event(n), origin=self.name)
        self.nodes.add_handler(self._node_added, self._node_updated, self._node_deleted, origin=self.name)
        self.deleted_nodes: set[str] = set()
        self.force_deleted = 0

    def _pod_event(self, pod: Obj) -> None:
        if (pod.get("spec") or {}).get("nodeName") and (deleting(pod) or
                                                        pod["spec"]["nodeName"] in self.deleted_nodes):
            self.queue.add(key_of(pod))

    def _node_added(self, node: Obj) -> None:
        self.deleted_nodes.discard(meta(node).get("name") or "")

    def _node_updated(self, old: Obj, new: Obj) -> None:
        if node_ready(old) and not node_ready(new):
            for k in self.pods.index_keys(NODE_INDEX, meta(new).get("name")):
                self.queue.add(k)

    def _node_deleted(self, node: Obj) -> None:
        name = meta(node).get("name") or ""
        self.deleted_nodes.add(name)
        for k in self.pods.index_keys(NODE_INDEX, name):
            self.queue.add(k)

    def all_keys(self) -> Iterable[Key]:
        return [key_of(p) for p in self.pods.items() if deleting(p)
                or (p.get("spec") or {}).get("nodeName") in self.deleted_nodes]

    async def sync(self, key: Key) -> None:
        pod = self.pods.get(*key)
        if pod is None:
            return
        node_name = (pod.get("spec") or {}).get("nodeName") or ""
        node = self.nodes.get(None, node_name) if node_name else None
        wait = force_delete_after(pod, node, node_name in self.deleted_nodes, now())
        if wait is None:
            return
        if wait > 0:
            self.queue.add_after(key, wait + 0.05)
            return
        if node is None and await self.registry.get("nodes", None, node_name) is not None:
            return  # the node is back (cache behind): nothing to do
        try:
            await self.registry.delete("pods", key[0], key[1], preconditions={"uid": uid_of(pod)},
                                       grace_period_seconds=0)
            self.force_deleted += 1
            self.log.info("controller=%s force-deleted pod %s/%s (node %s %s)",
                          self.name, key[0], key[1], node_name, "gone" if node is None else "NotReady")
        except Exception as e:
            if not (is_not_found(e) or is_conflict(e)):
                raise
