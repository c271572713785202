"""EndpointSlice desired state, as pure functions (upstream pkg/controller/endpointslice).

`desired_groups` turns a Service and its Pods into endpoints grouped by (address type, port set);
`plan_slices` compares that with the Service's existing managed slices and returns the writes
that get there with the least churn: existing slices are updated in place (endpoints kept where
they are), new endpoints go first into slices changed anyway, then into one slice that has room
for all of them, then into new slices; a slice that would be deleted is recycled instead of
deleting one and creating another; nothing is written when nothing changed.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

from controlplane.controllers.api import Obj
from controlplane.controllers.objects import (
    condition,
    condition_true,
    deleting,
    format_time,
    labels_of,
    meta,
    parse_time,
    pod_terminal,
    uid_of,
)
from controlplane.controllers.topology import assign_zone_hints, topology_mode_auto

SERVICE_NAME_LABEL = "kubernetes.io/service-name"
MANAGED_BY_LABEL = "endpointslice.kubernetes.io/managed-by"
CONTROLLER_NAME = "endpointslice-controller.k8s.io"
HEADLESS_LABEL = "service.kubernetes.io/headless"
TRIGGER_TIME_ANNOTATION = "endpoints.kubernetes.io/last-change-trigger-time"
ZONE_LABEL = "topology.kubernetes.io/zone"
MAX_ENDPOINTS_PER_SLICE = 100
IPV4, IPV6 = "IPv4", "IPv6"

PortsKey = tuple[tuple[str, str, int, str], ...]
GroupKey = tuple[str, PortsKey]  # (addressType, ports)
EndpointKey = tuple[str, str]  # (first address, targetRef uid or name)


# --- Services and Pods -> endpoints ---

def has_selector(svc: Mapping[str, Any]) -> bool:
    spec = svc.get("spec") or {}
    return bool(spec.get("selector")) and spec.get("type") != "ExternalName"


def address_types(svc: Mapping[str, Any]) -> list[str]:
    """The address families the Service's slices carry (spec.ipFamilies, else from clusterIP)."""
    spec = svc.get("spec") or {}
    fams = [f for f in spec.get("ipFamilies") or () if f in (IPV4, IPV6)]
    if fams:
        return list(dict.fromkeys(fams))
    ips = [ip for ip in (spec.get("clusterIPs") or [spec.get("clusterIP")]) if ip and ip != "None"]
    if ips:
        return list(dict.fromkeys(IPV6 if ":" in ip else IPV4 for ip in ips))
    return [IPV4]


def pod_in_endpoints(pod: Mapping[str, Any]) -> bool:
    """Pods with an IP that are not terminal (terminating ones stay, marked terminating)."""
    status = pod.get("status") or {}
    return bool(status.get("podIP") or status.get("podIPs")) and not pod_terminal(pod)


def pod_ip(pod: Mapping[str, Any], address_type: str) -> str | None:
    status = pod.get("status") or {}
    ips = [p.get("ip") for p in status.get("podIPs") or () if p.get("ip")] or (
        [status["podIP"]] if status.get("podIP") else []
    )
    want_v6 = address_type == IPV6
    for ip in ips:
        if (":" in ip) == want_v6:
            return str(ip)
    return None


def find_container_port(pod: Mapping[str, Any], name: str, protocol: str) -> int | None:
    for c in (pod.get("spec") or {}).get("containers") or ():
        for p in c.get("ports") or ():
            if p.get("name") == name and (p.get("protocol") or "TCP") == protocol:
                return int(p["containerPort"])
    return None


def endpoint_ports(svc: Mapping[str, Any], pod: Mapping[str, Any]) -> list[dict[str, Any]]:
    """The slice ports for this Pod: each Service port with targetPort resolved on the Pod
    (a named targetPort the Pod does not declare leaves that port out for this Pod)."""
    out = []
    for sp in (svc.get("spec") or {}).get("ports") or ():
        proto = sp.get("protocol") or "TCP"
        tp = sp.get("targetPort")
        if tp in (None, "", 0):
            tp = sp.get("port")
        if isinstance(tp, str):
            if tp.isdigit():
                port: int | None = int(tp)
            else:
                port = find_container_port(pod, tp, proto)
                if port is None:
                    continue
        else:
            port = int(tp)
        ep: dict[str, Any] = {"name": sp.get("name") or "", "port": port, "protocol": proto}
        if sp.get("appProtocol"):
            ep["appProtocol"] = sp["appProtocol"]
        out.append(ep)
    return out


def ports_key(ports: Iterable[Mapping[str, Any]]) -> PortsKey:
    return tuple(sorted(
        (p.get("name") or "", p.get("protocol") or "TCP", int(p.get("port") or 0), p.get("appProtocol") or "")
        for p in ports
    ))


def pod_endpoint(
    svc: Mapping[str, Any], pod: Mapping[str, Any], address_type: str, zone: str | None
) -> dict[str, Any] | None:
    ip = pod_ip(pod, address_type)
    if ip is None:
        return None
    pm = meta(pod)
    publish = bool((svc.get("spec") or {}).get("publishNotReadyAddresses"))
    serving = publish or condition_true(pod, "Ready")
    terminating = deleting(pod)
    ep: dict[str, Any] = {
        "addresses": [ip],
        "conditions": {"ready": publish or (serving and not terminating), "serving": serving,
                       "terminating": terminating},
        "targetRef": {"kind": "Pod", "namespace": pm.get("namespace") or "", "name": pm.get("name") or "",
                      "uid": pm.get("uid") or ""},
    }
    spec = pod.get("spec") or {}
    if spec.get("hostname") and spec.get("subdomain") == meta(svc).get("name"):
        ep["hostname"] = spec["hostname"]
    if spec.get("nodeName"):
        ep["nodeName"] = spec["nodeName"]
    if zone:
        ep["zone"] = zone
    hints = traffic_hints((svc.get("spec") or {}).get("trafficDistribution"), ep)
    if hints:
        ep["hints"] = hints
    return ep


PREFER_CLOSE = frozenset({"PreferClose", "PreferSameZone", "PreferSameNode"})


def traffic_hints(traffic_distribution: str | None, ep: Mapping[str, Any]) -> dict[str, Any] | None:
    """Hints for spec.trafficDistribution (upstream trafficdist): a ready endpoint is hinted for
    its own zone, and with PreferSameNode also for its own node; otherwise no hints."""
    if traffic_distribution not in PREFER_CLOSE or not ep["conditions"]["ready"]:
        return None
    hints: dict[str, Any] = {}
    if ep.get("zone"):
        hints["forZones"] = [{"name": ep["zone"]}]
    if traffic_distribution == "PreferSameNode" and ep.get("nodeName"):
        hints["forNodes"] = [{"name": ep["nodeName"]}]
    return hints or None


@dataclass(slots=True)
class Group:
    address_type: str
    ports: list[dict[str, Any]]
    endpoints: dict[EndpointKey, dict[str, Any]] = field(default_factory=dict)


def endpoint_key(ep: Mapping[str, Any]) -> EndpointKey:
    ref = ep.get("targetRef") or {}
    addrs = ep.get("addresses") or [""]
    return (str(addrs[0]), str(ref.get("uid") or ref.get("name") or ""))


def desired_groups(
    svc: Mapping[str, Any], pods: Iterable[Mapping[str, Any]], zone_of: Callable[[str], str | None],
    zone_ratios: Mapping[str, float] | None = None, hint_verdicts: dict[str, str] | None = None,
) -> dict[GroupKey, Group]:
    """Endpoints of the Service's Pods grouped by (address type, resolved port set); Pods in
    name order so the result does not depend on cache order. With topology-mode Auto, zone
    hints come from `zone_ratios` (the zones' CPU shares; None: unknown) and `hint_verdicts`
    gets, per address type, "" (hints set) or why not."""
    groups = _desired_groups(svc, pods, zone_of)
    if topology_mode_auto(svc):
        for at in address_types(svc):
            why = assign_zone_hints(
                (e for (t, _), g in sorted(groups.items()) if t == at for e in g.endpoints.values()), zone_ratios)
            if hint_verdicts is not None:
                hint_verdicts[at] = why
    return groups


def _desired_groups(
    svc: Mapping[str, Any], pods: Iterable[Mapping[str, Any]], zone_of: Callable[[str], str | None]
) -> dict[GroupKey, Group]:
    groups: dict[GroupKey, Group] = {}
    types = address_types(svc)
    for pod in sorted(pods, key=lambda p: meta(p).get("name") or ""):
        if not pod_in_endpoints(pod):
            continue
        ports = endpoint_ports(svc, pod)
        pk = ports_key(ports)
        node = (pod.get("spec") or {}).get("nodeName")
        zone = zone_of(node) if node else None
        for at in types:
            ep = pod_endpoint(svc, pod, at, zone)
            if ep is None:
                continue
            g = groups.get((at, pk))
            if g is None:
                g = groups[(at, pk)] = Group(at, ports)
            g.endpoints[endpoint_key(ep)] = ep
    return groups


# --- trigger time (upstream TriggerTimeTracker) ---

def pod_trigger_time(pod: Mapping[str, Any]) -> datetime | None:
    """When the Pod last changed in a way that moves its endpoint: its Ready condition's
    transition or (kpx addition) the deletion request (deletionTimestamp - grace)."""
    c = condition(pod, "Ready")
    t = parse_time(c.get("lastTransitionTime")) if c else None
    m = meta(pod)
    dt = parse_time(m.get("deletionTimestamp"))
    if dt is not None:
        dt = dt - timedelta(seconds=int(m.get("deletionGracePeriodSeconds") or 0))
        t = dt if t is None or dt > t else t
    return t


class TriggerTimeTracker:
    """Per Service, the trigger times seen at the last sync; `compute` returns the earliest
    trigger time that changed since then (the creation time for a Service seen first), or None
    (then the annotation is dropped), as upstream's ComputeEndpointLastChangeTriggerTime."""

    def __init__(self) -> None:
        self._state: dict[tuple[str, str], tuple[datetime | None, dict[str, datetime]]] = {}

    def compute(self, svc: Mapping[str, Any], pods: Iterable[Mapping[str, Any]]) -> datetime | None:
        m = meta(svc)
        key = (m.get("namespace") or "", m.get("name") or "")
        known = key in self._state
        last_svc, last_pods = self._state.get(key, (None, {}))
        earliest: datetime | None = None
        now_pods: dict[str, datetime] = {}
        for pod in pods:
            t = pod_trigger_time(pod)
            if t is None:
                continue
            name = meta(pod).get("name") or ""
            now_pods[name] = t
            prev = last_pods.get(name)
            if (prev is None or t > prev) and (earliest is None or t < earliest):
                earliest = t
        svc_t = parse_time(m.get("creationTimestamp"))
        if svc_t is not None and (last_svc is None or svc_t > last_svc) and (earliest is None or svc_t < earliest):
            earliest = svc_t
        self._state[key] = (svc_t, now_pods)
        if not known:
            return svc_t
        return earliest

    def forget(self, namespace: str, name: str) -> None:
        self._state.pop((namespace, name), None)


# --- existing slices -> writes ---

def slice_labels(svc: Mapping[str, Any]) -> dict[str, str]:
    """Service labels (minus the reserved keys), plus service-name and managed-by, plus the
    headless marker for a headless Service (upstream setEndpointSliceLabels)."""
    labels = {k: v for k, v in labels_of(svc).items() if k not in (SERVICE_NAME_LABEL, MANAGED_BY_LABEL, HEADLESS_LABEL)}
    labels[SERVICE_NAME_LABEL] = meta(svc).get("name") or ""
    labels[MANAGED_BY_LABEL] = CONTROLLER_NAME
    if (svc.get("spec") or {}).get("clusterIP") == "None":
        labels[HEADLESS_LABEL] = ""
    return labels


def owner_reference(svc: Mapping[str, Any]) -> dict[str, Any]:
    return {"apiVersion": "v1", "kind": "Service", "name": meta(svc).get("name") or "", "uid": uid_of(svc),
            "controller": True, "blockOwnerDeletion": True}


def owned_by(slc: Mapping[str, Any], svc: Mapping[str, Any]) -> bool:
    uid = uid_of(svc)
    return any(r.get("uid") == uid and r.get("kind") == "Service" and r.get("controller")
               for r in meta(slc).get("ownerReferences") or ())


def normalize_endpoint(ep: Mapping[str, Any]) -> dict[str, Any]:
    """An endpoint as this controller writes it, with API defaults applied (nil ready/serving
    = true, nil terminating = false) so server-side defaulting never looks like a change."""
    c = ep.get("conditions") or {}
    ref = ep.get("targetRef") or {}
    out: dict[str, Any] = {
        "addresses": list(ep.get("addresses") or ()),
        "conditions": {"ready": c.get("ready") is not False, "serving": c.get("serving") is not False,
                       "terminating": c.get("terminating") is True},
    }
    if ref:
        out["targetRef"] = {k: ref.get(k) or "" for k in ("kind", "namespace", "name", "uid")}
    for k in ("hostname", "nodeName", "zone"):
        if ep.get(k):
            out[k] = ep[k]
    h = ep.get("hints") or {}
    hints = {k: [{"name": x.get("name")} for x in h.get(k) or ()] for k in ("forZones", "forNodes") if h.get(k)}
    if hints:
        out["hints"] = hints
    return out


@dataclass(slots=True)
class SlicePlan:
    create: list[Obj] = field(default_factory=list)
    update: list[Obj] = field(default_factory=list)
    delete: list[Obj] = field(default_factory=list)

    @property
    def empty(self) -> bool:
        return not (self.create or self.update or self.delete)


@dataclass(slots=True)
class _Draft:
    """A slice being planned: an existing one (`base`) or a new one (`base` None)."""

    address_type: str
    ports: list[dict[str, Any]]
    endpoints: list[dict[str, Any]]
    base: Obj | None = None
    changed: bool = False


def _new_slice(svc: Mapping[str, Any], d: _Draft, labels: Mapping[str, str], trigger: str | None) -> Obj:
    m = meta(svc)
    md: dict[str, Any] = {
        "generateName": f"{m.get('name')}-",
        "namespace": m.get("namespace") or "",
        "labels": dict(labels),
        "ownerReferences": [owner_reference(svc)],
    }
    if trigger:
        md["annotations"] = {TRIGGER_TIME_ANNOTATION: trigger}
    return {"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice", "metadata": md,
            "addressType": d.address_type, "endpoints": d.endpoints, "ports": d.ports}


def _updated_slice(base: Obj, svc: Mapping[str, Any], d: _Draft, labels: Mapping[str, str],
                   trigger: str | None) -> Obj:
    md = dict(base.get("metadata") or {})
    md["labels"] = dict(labels)
    ann = dict(md.get("annotations") or {})
    if trigger:
        ann[TRIGGER_TIME_ANNOTATION] = trigger
    else:
        ann.pop(TRIGGER_TIME_ANNOTATION, None)
    md["annotations"] = ann
    refs = [r for r in md.get("ownerReferences") or () if not (r.get("kind") == "Service" and r.get("controller"))]
    md["ownerReferences"] = [owner_reference(svc), *refs]
    out = {k: v for k, v in base.items() if k not in ("metadata", "endpoints", "ports")}
    out.update({"metadata": md, "endpoints": d.endpoints, "ports": d.ports, "addressType": d.address_type})
    return out


def _meta_current(slc: Mapping[str, Any], svc: Mapping[str, Any], labels: Mapping[str, str]) -> bool:
    if dict(labels_of(slc)) != dict(labels):
        return False
    refs = meta(slc).get("ownerReferences") or ()
    return any(r.get("uid") == uid_of(svc) and r.get("blockOwnerDeletion") for r in refs)


def plan_slices(
    svc: Mapping[str, Any],
    groups: Mapping[GroupKey, Group],
    existing: Sequence[Obj],
    trigger_time: datetime | None,
    max_endpoints: int = MAX_ENDPOINTS_PER_SLICE,
) -> SlicePlan:
    """The writes that turn `existing` (this Service's managed slices) into `groups`."""
    labels = slice_labels(svc)
    trigger = format_time(trigger_time) if trigger_time else None
    plan = SlicePlan()
    types = address_types(svc)
    stale: list[Obj] = []  # slices to delete unless recycled
    by_group: dict[GroupKey, list[Obj]] = {}
    for s in sorted(existing, key=lambda s: meta(s).get("name") or ""):
        if not owned_by(s, svc) or s.get("addressType") not in types:
            (plan.delete if not owned_by(s, svc) else stale).append(s)
            continue
        gk = (str(s.get("addressType")), ports_key(s.get("ports") or ()))
        by_group.setdefault(gk, []).append(s)

    drafts: list[_Draft] = []
    if not any(g.endpoints for g in groups.values()):
        # No endpoints at all: exactly one placeholder slice (no endpoints, no ports).
        pk: GroupKey = (types[0], ())
        keep = None
        for gk, slices in by_group.items():
            for s in slices:
                if keep is None and gk == pk and not s.get("endpoints"):
                    keep = s
                else:
                    stale.append(s)
        d = _Draft(types[0], [], [], base=keep, changed=keep is None)
        drafts.append(d)
    else:
        for gk, slices in by_group.items():
            if gk not in groups:
                stale.extend(slices)
        for gk, g in groups.items():
            drafts.extend(_plan_group(g, by_group.get(gk, []), stale, max_endpoints))

    # Recycle slices that would be deleted into slices that would be created (same address type).
    for d in drafts:
        if d.base is None:
            for i, s in enumerate(stale):
                if s.get("addressType") == d.address_type:
                    d.base = stale.pop(i)
                    break
    plan.delete.extend(stale)
    for d in drafts:
        if d.base is None:
            plan.create.append(_new_slice(svc, d, labels, trigger))
        elif d.changed or not _meta_current(d.base, svc, labels):
            if not d.changed:
                d.endpoints = list(d.base.get("endpoints") or [])
                d.ports = list(d.base.get("ports") or [])
                tr = (meta(d.base).get("annotations") or {}).get(TRIGGER_TIME_ANNOTATION)
                plan.update.append(_updated_slice(d.base, svc, d, labels, tr))
            else:
                plan.update.append(_updated_slice(d.base, svc, d, labels, trigger))
    return plan


def _plan_group(g: Group, slices: list[Obj], stale: list[Obj], max_endpoints: int) -> list[_Draft]:
    placed: set[EndpointKey] = set()
    drafts: list[_Draft] = []
    unchanged: list[_Draft] = []
    for s in slices:
        eps: list[dict[str, Any]] = []
        changed = False  # same port set by construction (grouped by ports_key)
        for ep in s.get("endpoints") or ():
            k = endpoint_key(ep)
            want = g.endpoints.get(k)
            if want is None or k in placed or len(eps) >= max_endpoints:
                changed = True
                continue
            placed.add(k)
            eps.append(want)
            if normalize_endpoint(ep) != want:
                changed = True
        if not eps:
            stale.append(s)
            continue
        d = _Draft(g.address_type, g.ports, eps, base=s, changed=changed)
        drafts.append(d)
        if not changed:
            unchanged.append(d)
    remaining = [ep for k, ep in g.endpoints.items() if k not in placed]
    # 1. fill slices that are being written anyway
    for d in drafts:
        if not remaining:
            break
        if d.changed and len(d.endpoints) < max_endpoints:
            room = max_endpoints - len(d.endpoints)
            d.endpoints = d.endpoints + remaining[:room]
            remaining = remaining[room:]
    # 2. fewer left than a full slice: the fullest unchanged slice that fits them all
    if remaining and len(remaining) < max_endpoints:
        fits = [d for d in unchanged if max_endpoints - len(d.endpoints) >= len(remaining)]
        if fits:
            d = max(fits, key=lambda d: len(d.endpoints))
            d.endpoints = d.endpoints + remaining
            d.changed = True
            remaining = []
    # 3. new slices
    while remaining:
        drafts.append(_Draft(g.address_type, g.ports, remaining[:max_endpoints], changed=True))
        remaining = remaining[max_endpoints:]
    return drafts
