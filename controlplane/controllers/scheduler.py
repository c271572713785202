"""Scheduler: binds Pending Pods without spec.nodeName (schedulerName default-scheduler) to a
Ready, schedulable Node that passes nodeSelector and NoSchedule/NoExecute taints, spreading
them: the Node with the fewest (non-terminal) Pods first, ties broken by name. Binding goes
through pods/binding. With no feasible Node the Pod stays Pending with PodScheduled=False,
reason Unschedulable, and is retried when a Node changes."""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from controlplane.controllers.api import Obj, Registry, is_conflict, is_not_found
from controlplane.controllers.base import Controller
from controlplane.controllers.events import record
from controlplane.controllers.informer import InformerFactory
from controlplane.controllers.objects import (
    Key,
    condition,
    deleting,
    format_time,
    key_of,
    labels_of,
    meta,
    node_ready,
    now,
    pod_terminal,
    selector_matches,
)

DEFAULT_SCHEDULER = "default-scheduler"
UNSCHEDULED_INDEX = "sched-unscheduled"
NODE_INDEX = "sched-node"


def needs_scheduling(pod: Mapping[str, Any]) -> bool:
    spec = pod.get("spec") or {}
    return (not spec.get("nodeName") and not deleting(pod) and not pod_terminal(pod)
            and (spec.get("schedulerName") or DEFAULT_SCHEDULER) == DEFAULT_SCHEDULER)


def tolerates(pod: Mapping[str, Any], taint: Mapping[str, Any]) -> bool:
    for t in (pod.get("spec") or {}).get("tolerations") or ():
        if t.get("effect") and t.get("effect") != taint.get("effect"):
            continue
        op = t.get("operator") or "Equal"
        if not t.get("key") and op == "Exists":
            return True
        if t.get("key") != taint.get("key"):
            continue
        if op == "Exists" or (t.get("value") or "") == (taint.get("value") or ""):
            return True
    return False


def unfit_reason(pod: Mapping[str, Any], node: Mapping[str, Any]) -> str | None:
    """Why `pod` cannot go to `node` (upstream's filter messages), None if it can."""
    if (node.get("spec") or {}).get("unschedulable"):
        return "node(s) were unschedulable"
    if not node_ready(node):
        return "node(s) were not ready"
    for taint in (node.get("spec") or {}).get("taints") or ():
        if taint.get("effect") in ("NoSchedule", "NoExecute") and not tolerates(pod, taint):
            return "node(s) had untolerated taint"
    sel = (pod.get("spec") or {}).get("nodeSelector") or {}
    if sel and not selector_matches(sel, labels_of(node)):
        return "node(s) didn't match Pod's node affinity/selector"
    return None


def pick_node(pod: Mapping[str, Any], nodes: Sequence[Mapping[str, Any]],
              pod_counts: Mapping[str, int]) -> tuple[str | None, str]:
    """(node name, "") or (None, upstream-style "0/N nodes are available: ..." message)."""
    best: tuple[int, str] | None = None
    reasons: Counter[str] = Counter()
    for n in nodes:
        name = meta(n).get("name") or ""
        why = unfit_reason(pod, n)
        if why:
            reasons[why] += 1
            continue
        cand = (pod_counts.get(name, 0), name)
        if best is None or cand < best:
            best = cand
    if best is not None:
        return best[1], ""
    detail = ", ".join(f"{c} {r}" for r, c in sorted(reasons.items()))
    return None, f"0/{len(nodes)} nodes are available" + (f": {detail}." if detail else ".")


class Scheduler(Controller[Key]):
    name = "scheduler"
    needs = ("pods", "nodes")
    resync_period = 30.0

    def __init__(self, registry: Registry, informers: InformerFactory) -> None:
        super().__init__(registry, informers)
        self.pods = informers.informer("pods")
        self.nodes = informers.informer("nodes")
        self.pods.add_index(UNSCHEDULED_INDEX, lambda p: [True] if needs_scheduling(p) else [])
        self.pods.add_index(NODE_INDEX, lambda p: [n] if (n := (p.get("spec") or {}).get("nodeName"))
                            and not pod_terminal(p) else [])
        self.pods.add_handler(self._pod_event, lambda o, n: self._pod_event(n), self._pod_gone, origin=self.name)
        self.nodes.add_handler(self._node_event, self._node_updated, self._node_event, origin=self.name)
        self.assumed: dict[Key, str] = {}  # bound by us, not yet seen bound in the cache
        self.bound = 0

    def _pod_event(self, pod: Obj) -> None:
        k = key_of(pod)
        if (pod.get("spec") or {}).get("nodeName"):
            self.assumed.pop(k, None)
        elif needs_scheduling(pod):
            self.queue.add(k)

    def _pod_gone(self, pod: Obj) -> None:
        self.assumed.pop(key_of(pod), None)

    def _node_event(self, node: Obj) -> None:
        for k in self.pods.index_keys(UNSCHEDULED_INDEX, True):
            self.queue.add(k)

    def _node_updated(self, old: Obj, new: Obj) -> None:
        if (node_ready(old), (old.get("spec") or {}).get("unschedulable"), (old.get("spec") or {}).get("taints"),
                labels_of(old)) != (node_ready(new), (new.get("spec") or {}).get("unschedulable"),
                                    (new.get("spec") or {}).get("taints"), labels_of(new)):
            self._node_event(new)

    def all_keys(self) -> Iterable[Key]:
        return list(self.pods.index_keys(UNSCHEDULED_INDEX, True))

    def pod_counts(self) -> dict[str, int]:
        counts = {meta(n).get("name") or "": 0 for n in self.nodes.items()}
        for name in counts:
            counts[name] = self.pods.index_size(NODE_INDEX, name)
        for node in self.assumed.values():
            counts[node] = counts.get(node, 0) + 1
        return counts

    async def sync(self, key: Key) -> None:
        pod = self.pods.get(*key)
        if pod is None or not needs_scheduling(pod) or key in self.assumed:
            return
        nodes = sorted(self.nodes.items(), key=lambda n: meta(n).get("name") or "")
        node, why = pick_node(pod, nodes, self.pod_counts())
        ns, name = key
        if node is None:
            await self._mark_unschedulable(pod, why)
            return
        binding = {"apiVersion": "v1", "kind": "Binding", "metadata": {"name": name, "namespace": ns},
                   "target": {"apiVersion": "v1", "kind": "Node", "name": node}}
        try:
            await self.registry.bind(ns, name, binding)
        except Exception as e:
            if is_not_found(e) or is_conflict(e):
                return  # gone, or bound/deleted meanwhile: the next event tells
            raise
        self.assumed[key] = node
        self.bound += 1
        await record(self.registry, pod, "Pod", "Normal", "Scheduled",
                     f"Successfully assigned {ns}/{name} to {node}", DEFAULT_SCHEDULER)

    async def _mark_unschedulable(self, pod: Obj, message: str) -> None:
        c = condition(pod, "PodScheduled")
        if c and c.get("status") == "False" and c.get("reason") == "Unschedulable" and c.get("message") == message:
            return
        status = dict(pod.get("status") or {})
        conds = [x for x in status.get("conditions") or () if x.get("type") != "PodScheduled"]
        conds.append({"type": "PodScheduled", "status": "False", "reason": "Unschedulable", "message": message,
                      "lastProbeTime": None, "lastTransitionTime": format_time(now())})
        status["conditions"] = conds
        status.setdefault("phase", "Pending")
        try:
            await self.registry.update_status("pods", {**pod, "status": status})
        except Exception as e:
            if not is_not_found(e):
                raise
            return
        await record(self.registry, pod, "Pod", "Warning", "FailedScheduling", message, DEFAULT_SCHEDULER)
