"""The EndpointSlice controller's loop: Services, Pods, Nodes and EndpointSlices informers feed
a queue of Service keys; `sync` computes the Service's slices (pure, `endpointslice.py`) and
writes the difference.

Scale: Pods are indexed by (namespace, label, value) and Services by one (namespace, label,
value) pair of their selector, so a Pod event finds its Services and a Service finds its Pods
without scanning a namespace — 10k Services with 10 Pods each stay linear.
"""

from __future__ import annotations

from collections.abc import Hashable, Iterable, Mapping
from typing import Any

from controlplane.controllers.api import Obj, Registry, is_not_found
from controlplane.controllers.base import Controller
from controlplane.controllers.endpointslice import (
    CONTROLLER_NAME,
    MANAGED_BY_LABEL,
    MAX_ENDPOINTS_PER_SLICE,
    SERVICE_NAME_LABEL,
    ZONE_LABEL,
    TriggerTimeTracker,
    desired_groups,
    has_selector,
    plan_slices,
)
from controlplane.controllers.events import record
from controlplane.controllers.informer import InformerFactory
from controlplane.controllers.objects import Key, condition, key_of, labels_of, meta, selector_matches
from controlplane.controllers.topology import HINTS_ENABLED, topology_mode_auto, zone_cpu_ratios

POD_LABEL_INDEX = "ns-label"
SVC_SELECTOR_INDEX = "ns-selector-anchor"
SLICE_SERVICE_INDEX = "managed-service"
POD_NODE_INDEX = "node"


def _pod_label_index(pod: Obj) -> Iterable[Hashable]:
    ns = meta(pod).get("namespace") or ""
    return [(ns, k, v) for k, v in labels_of(pod).items()]


def selector_anchor(svc: Mapping[str, Any]) -> tuple[str, str] | None:
    """One (key, value) pair of the selector every matching Pod carries: the index key."""
    sel = (svc.get("spec") or {}).get("selector") or {}
    return min(sel.items()) if sel else None


def _svc_selector_index(svc: Obj) -> Iterable[Hashable]:
    a = selector_anchor(svc)
    return [(meta(svc).get("namespace") or "", a[0], a[1])] if a else []


def _slice_service_index(slc: Obj) -> Iterable[Hashable]:
    labels = labels_of(slc)
    name = labels.get(SERVICE_NAME_LABEL)
    if not name or labels.get(MANAGED_BY_LABEL) != CONTROLLER_NAME:
        return []
    return [(meta(slc).get("namespace") or "", name)]


def _pod_node_index(pod: Obj) -> Iterable[Hashable]:
    n = (pod.get("spec") or {}).get("nodeName")
    return [n] if n else []


def _node_capacity(node: Mapping[str, Any]) -> tuple[Any, ...]:
    """What of a Node moves the zones' CPU shares (besides its zone)."""
    st = node.get("status") or {}
    ready = condition(node, "Ready")
    return ((st.get("allocatable") or {}).get("cpu"), (st.get("capacity") or {}).get("cpu"),
            ready.get("status") if ready else None,
            tuple(k for k in labels_of(node) if k.startswith("node-role.kubernetes.io/")))


def pod_fingerprint(pod: Mapping[str, Any]) -> tuple[Any, ...]:
    """What of a Pod can change its endpoints; other Pod updates are ignored."""
    m = meta(pod)
    spec = pod.get("spec") or {}
    status = pod.get("status") or {}
    ready = condition(pod, "Ready")
    ports = tuple(
        (p.get("name"), p.get("containerPort"), p.get("protocol"))
        for c in spec.get("containers") or () for p in c.get("ports") or ()
    )
    return (
        tuple(sorted(labels_of(pod).items())), status.get("podIP"), tuple(p.get("ip") for p in status.get("podIPs") or ()),
        status.get("phase"), ready.get("status") if ready else None, ready.get("lastTransitionTime") if ready else None,
        m.get("deletionTimestamp"), spec.get("nodeName"), spec.get("hostname"), spec.get("subdomain"), ports,
    )


class EndpointSliceController(Controller[Key]):
    name = "endpointslice"
    # Concurrent syncs (upstream --concurrent-service-endpoint-syncs, default 5): the store
    # group-commits concurrent writes, so a few in flight cut the fsync waits per slice.
    workers = 8
    needs = ("services", "pods", "nodes", "endpointslices")

    def __init__(self, registry: Registry, informers: InformerFactory,
                 max_endpoints: int = MAX_ENDPOINTS_PER_SLICE) -> None:
        super().__init__(registry, informers)
        self.max_endpoints = max_endpoints
        self.tracker = TriggerTimeTracker()
        self.services = informers.informer("services")
        self.pods = informers.informer("pods")
        self.nodes = informers.informer("nodes")
        self.slices = informers.informer("endpointslices")
        self.pods.add_index(POD_LABEL_INDEX, _pod_label_index)
        self.pods.add_index(POD_NODE_INDEX, _pod_node_index)
        self.services.add_index(SVC_SELECTOR_INDEX, _svc_selector_index)
        self.slices.add_index(SLICE_SERVICE_INDEX, _slice_service_index)
        self.services.add_handler(self._svc_event, lambda o, n: self._svc_event(n), self._svc_event)
        self.pods.add_handler(self._pod_added, self._pod_updated, self._pod_added)
        self.nodes.add_handler(self._node_event, self._node_updated, self._node_event)
        self.slices.add_handler(self._slice_event, lambda o, n: self._slice_event(n), self._slice_event,
                                origin=self.name)
        self.writes = 0
        self.topology_services: set[Key] = set()  # annotated topology-mode: Auto
        self._ratios: dict[str, float] | None = None
        self._ratios_stale = True
        self.hint_state: dict[tuple[Key, str], str] = {}  # (service, address type) -> "" or why no hints

    # --- handlers: only enqueue ---
    def _svc_event(self, svc: Obj) -> None:
        k = key_of(svc)
        if topology_mode_auto(svc) and self.services.get(*k) is not None:
            self.topology_services.add(k)
        else:
            self.topology_services.discard(k)
        self.queue.add(k)

    def _services_for(self, pod: Mapping[str, Any]) -> set[Key]:
        ns = meta(pod).get("namespace") or ""
        labels = labels_of(pod)
        out: set[Key] = set()
        for k, v in labels.items():
            for svc in self.services.by_index(SVC_SELECTOR_INDEX, (ns, k, v)):
                if selector_matches((svc.get("spec") or {}).get("selector") or {}, labels):
                    out.add(key_of(svc))
        return out

    def _pod_added(self, pod: Obj) -> None:
        for k in self._services_for(pod):
            self.queue.add(k)

    def _pod_updated(self, old: Obj, new: Obj) -> None:
        if pod_fingerprint(old) == pod_fingerprint(new):
            return
        for k in self._services_for(old) | self._services_for(new):
            self.queue.add(k)

    def _node_event(self, node: Obj) -> None:
        for pod in self.pods.by_index(POD_NODE_INDEX, meta(node).get("name")):
            self._pod_added(pod)
        self._topology_changed()

    def _node_updated(self, old: Obj, new: Obj) -> None:
        if labels_of(old).get(ZONE_LABEL) != labels_of(new).get(ZONE_LABEL):
            self._node_event(new)
        elif _node_capacity(old) != _node_capacity(new):
            self._topology_changed()

    def _topology_changed(self) -> None:
        """Zone CPU shares may have moved: recompute them, resync topology-aware Services."""
        self._ratios_stale = True
        for k in self.topology_services:
            self.queue.add(k)

    def zone_ratios(self) -> dict[str, float] | None:
        if self._ratios_stale:
            self._ratios = zone_cpu_ratios(self.nodes.items())
            self._ratios_stale = False
        return self._ratios

    def _slice_event(self, slc: Obj) -> None:
        labels = labels_of(slc)
        name = labels.get(SERVICE_NAME_LABEL)
        if name and labels.get(MANAGED_BY_LABEL) == CONTROLLER_NAME:
            self.queue.add((meta(slc).get("namespace") or "", name))

    def all_keys(self) -> Iterable[Key]:
        return list(self.services.keys())

    # --- reading the caches ---
    def zone_of(self, node_name: str) -> str | None:
        node = self.nodes.get(None, node_name)
        return labels_of(node).get(ZONE_LABEL) if node else None

    def pods_for(self, svc: Mapping[str, Any]) -> list[Obj]:
        ns = meta(svc).get("namespace") or ""
        sel: Mapping[str, str] = (svc.get("spec") or {}).get("selector") or {}
        if not sel:
            return []
        # start from the smallest label bucket, filter by the whole selector
        k, v = min(sel.items(), key=lambda kv: self.pods.index_size(POD_LABEL_INDEX, (ns, kv[0], kv[1])))
        return [p for p in self.pods.by_index(POD_LABEL_INDEX, (ns, k, v)) if selector_matches(sel, labels_of(p))]

    # --- sync ---
    async def sync(self, key: Key) -> None:
        ns, name = key
        svc = self.services.get(ns, name)
        existing = self.slices.by_index(SLICE_SERVICE_INDEX, (ns, name))
        if svc is not None and meta(svc).get("deletionTimestamp"):
            return  # being deleted: its slices follow the propagation policy (GC: foreground / orphan)
        if svc is None or not has_selector(svc):
            if svc is None:
                self.tracker.forget(ns, name)
            for s in existing:
                # Slices still owned by a Service go now (GC would take them too; this is faster).
                # Orphaned ones (kubectl delete --cascade=orphan removed the reference) stay.
                if svc is not None or any(r.get("kind") == "Service" for r in meta(s).get("ownerReferences") or ()):
                    await self._delete(s)
            return
        pods = self.pods_for(svc)
        verdicts: dict[str, str] = {}
        groups = desired_groups(svc, pods, self.zone_of,
                                self.zone_ratios() if topology_mode_auto(svc) else None, verdicts)
        trigger = self.tracker.compute(svc, pods)
        plan = plan_slices(svc, groups, existing, trigger, self.max_endpoints)
        for obj in plan.create:
            created = await self.registry.create("endpointslices", obj, namespace=ns)
            self.writes += 1
            if isinstance(created, dict):
                self.slices.write_through(created, self.name)
        for obj in plan.update:
            updated = await self.registry.update("endpointslices", obj)
            self.writes += 1
            if isinstance(updated, dict):
                self.slices.write_through(updated, self.name)
        for obj in plan.delete:
            await self._delete(obj)
        await self._hint_events(svc, key, verdicts)

    async def _hint_events(self, svc: Obj, key: Key, verdicts: dict[str, str]) -> None:
        """TopologyAwareHintsEnabled / Disabled Events on the Service when that state changes."""
        for at, why in verdicts.items():
            state = (key, at)
            kind = why.split(" (")[0]  # "Insufficient number of endpoints (3 endpoints, 4 zones)": one state
            if self.hint_state.get(state) == kind:
                continue
            self.hint_state[state] = kind
            if why:
                await record(self.registry, svc, "Service", "Warning", "TopologyAwareHintsDisabled",
                             f"{why}, addressType: {at}", "endpoint-slice-controller")
            else:
                await record(self.registry, svc, "Service", "Normal", "TopologyAwareHintsEnabled",
                             f"{HINTS_ENABLED}, addressType: {at}", "endpoint-slice-controller")
        if not verdicts:
            for state in [s for s in self.hint_state if s[0] == key]:
                del self.hint_state[state]

    async def _delete(self, slc: Obj) -> None:
        m = meta(slc)
        try:
            await self.registry.delete("endpointslices", m.get("namespace"), m.get("name") or "",
                                       preconditions={"uid": m.get("uid") or ""})
        except Exception as e:
            if not is_not_found(e):
                raise
        self.writes += 1
        self.slices.forget(slc, self.name)
