"""Topology-aware routing hints for Services annotated `service.kubernetes.io/topology-mode: Auto`
(KEP-2433; upstream's endpointslice topologycache), as pure functions.

Each zone should receive a share of a Service's ready endpoints proportional to the allocatable
CPU of the Ready Nodes in it. Endpoints start hinted for their own zone; zones holding more than
their share then lend endpoints (re-hinted for another zone) to zones holding fewer. Hints are
left off entirely when that cannot keep every zone within the 20% overload threshold: fewer than
two zones, a Node without zone or CPU, fewer endpoints than zones, an endpoint without a zone.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, MutableMapping
from dataclasses import dataclass
from decimal import Decimal, InvalidOperation
from typing import Any

from controlplane.controllers.objects import labels_of, node_ready

TOPOLOGY_MODE = "service.kubernetes.io/topology-mode"
TOPOLOGY_HINTS_LEGACY = "service.kubernetes.io/topology-aware-hints"
ZONE_LABEL = "topology.kubernetes.io/zone"
OVERLOAD_THRESHOLD = 0.2
EXCLUDED_NODE_LABELS = ("node-role.kubernetes.io/control-plane", "node-role.kubernetes.io/master")


def topology_mode_auto(svc: Mapping[str, Any]) -> bool:
    ann = (svc.get("metadata") or {}).get("annotations") or {}
    v = ann.get(TOPOLOGY_MODE)
    if v is None:
        v = ann.get(TOPOLOGY_HINTS_LEGACY)
    return v in ("Auto", "auto")


def cpu_millis(q: Any) -> int:
    """A CPU quantity ("2", "1500m", "0.5") in millicores; 0 if absent or unparsable."""
    if q is None:
        return 0
    s = str(q).strip()
    try:
        if s.endswith("m"):
            return int(Decimal(s[:-1]))
        return int(Decimal(s) * 1000)
    except (InvalidOperation, ValueError):
        return 0


# Event messages, as upstream's topologycache words them.
NO_ZONE_SPECIFIED = "One or more endpoints do not have a zone specified"
HINTS_ENABLED = "Topology Aware Hints has been enabled"
INSUFFICIENT_NODE_INFO = "Insufficient Node information: allocatable CPU or zone not specified on one or more nodes"
ONE_ZONE_ONLY = "Nodes only ready in one zone"
INSUFFICIENT_ENDPOINTS = "Insufficient number of endpoints"
MIN_EXCEEDS_OVERLOAD = ("Unable to allocate minimum required endpoints to each zone without exceeding overload "
                        "threshold")


def zone_cpu_ratios(nodes: Iterable[Mapping[str, Any]]) -> dict[str, float] | None:
    """Each zone's share of the Ready Nodes' allocatable CPU; None when a Node lacks zone or
    CPU (a single zone gives {zone: 1.0}, which `allocations` refuses)."""
    by_zone: dict[str, int] = {}
    for n in nodes:
        labels = labels_of(n)
        if any(k in labels for k in EXCLUDED_NODE_LABELS) or not node_ready(n):
            continue
        zone = labels.get(ZONE_LABEL)
        status = n.get("status") or {}
        cpu = cpu_millis((status.get("allocatable") or status.get("capacity") or {}).get("cpu"))
        if not zone or cpu <= 0:
            return None
        by_zone[zone] = by_zone.get(zone, 0) + cpu
    total = sum(by_zone.values())
    if total <= 0:
        return None
    return {z: c / total for z, c in by_zone.items()}


@dataclass(frozen=True, slots=True)
class Allocation:
    minimum: int
    maximum: int
    desired: float


def allocations(ratios: Mapping[str, float], ready: int) -> dict[str, Allocation] | None:
    """How many of `ready` endpoints each zone should get, or None if the overload threshold
    cannot be met."""
    if len(ratios) < 2 or len(ratios) > ready:
        return None
    mins: dict[str, tuple[int, float]] = {}
    left = ready
    for zone in sorted(ratios):
        desired = ratios[zone] * ready
        minimum = math.ceil(desired / (1 + OVERLOAD_THRESHOLD))
        left -= minimum
        if left < 0:
            return None
        mins[zone] = (minimum, max(desired, float(minimum)))
    total_min = sum(m for m, _ in mins.values())
    return {z: Allocation(m, m + ready - total_min, d) for z, (m, d) in mins.items()}


def _transfers(allocs: Mapping[str, Allocation], have: Mapping[str, int]) -> tuple[dict[str, int], dict[str, int]]:
    """Whole endpoints each zone gives away / receives to approach its desired share."""
    give_f = {z: have.get(z, 0) - a.desired for z, a in allocs.items() if have.get(z, 0) > a.desired}
    take_f = {z: a.desired - have.get(z, 0) for z, a in allocs.items() if have.get(z, 0) < a.desired}
    give: dict[str, int] = {}
    take: dict[str, int] = {}
    while give_f and take_f:
        gz = max(sorted(give_f), key=lambda z: give_f[z])
        tz = max(sorted(take_f), key=lambda z: take_f[z])
        g, t = give_f[gz], take_f[tz]
        if (g < 1.0 and t < 1.0) or g < 0.5 or t < 0.5:
            break
        give[gz] = give.get(gz, 0) + 1
        take[tz] = take.get(tz, 0) + 1
        give_f[gz] -= 1
        take_f[tz] -= 1
    return give, take


def why_no_hints(ratios: Mapping[str, float] | None, ready: int) -> str:
    """Upstream's reason for leaving hints off ("" if allocations are possible)."""
    if ratios is None:
        return INSUFFICIENT_NODE_INFO
    if len(ratios) < 2:
        return ONE_ZONE_ONLY
    if len(ratios) > ready:
        return f"{INSUFFICIENT_ENDPOINTS} ({ready} endpoints, {len(ratios)} zones)"
    if allocations(ratios, ready) is None:
        return f"{MIN_EXCEEDS_OVERLOAD} ({ready} endpoints, {len(ratios)} zones)"
    return ""


def assign_zone_hints(endpoints: Iterable[MutableMapping[str, Any]], ratios: Mapping[str, float] | None) -> str:
    """Set `hints.forZones` on the ready endpoints of one address type (in the given order),
    or remove all hints; returns "" when hints were set, else why not (an Event message)."""
    eps = list(endpoints)
    for e in eps:
        e.pop("hints", None)
    ready = [e for e in eps if (e.get("conditions") or {}).get("ready")]
    why = why_no_hints(ratios, len(ready))
    if why:
        return why
    allocs = allocations(ratios or {}, len(ready))
    assert allocs is not None
    if any(not e.get("zone") for e in ready):
        return NO_ZONE_SPECIFIED
    have: dict[str, int] = {}
    for e in ready:
        have[e["zone"]] = have.get(e["zone"], 0) + 1
        e["hints"] = {"forZones": [{"name": e["zone"]}]}
    give, take = _transfers(allocs, have)
    for e in ready:
        if not give or not take:
            break
        z = e["zone"]
        if give.get(z, 0) > 0:
            to = sorted(take)[0]
            e["hints"] = {"forZones": [{"name": to}]}
            give[z] -= 1
            if not give[z]:
                del give[z]
            take[to] -= 1
            if not take[to]:
                del take[to]
    return ""
