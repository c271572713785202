"""API objects -> the shared model, with change tracking (upstream's ServiceChangeTracker,
EndpointsChangeTracker and EndpointSliceCache in one place).

Informer callbacks (`on_service`, `on_endpoint_slice`, `on_node`) update the tracker; the sync
loop takes `snapshot()` -> (ProxyState, token), renders and applies it, then `commit(token)`.
Only changes that were in the snapshot are cleared, so an event that arrives while a sync runs
is kept for the next one. Everything here is pure logic: no I/O, injectable clock.
"""

from __future__ import annotations

import ipaddress
import logging
import socket
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from proxy.model import (
    DEFAULT_AFFINITY_TIMEOUT,
    MAX_AFFINITY_TIMEOUT,
    SCTP,
    TCP,
    UDP,
    Endpoint,
    ProxyConfig,
    ProxyState,
    ServicePort,
    ServicePortName,
)

log = logging.getLogger("kpx.proxy.tracker")

JSON = dict[str, Any]
ServiceKey = tuple[str, str]  # (namespace, name)

LABEL_SERVICE_PROXY_NAME = "service.kubernetes.io/service-proxy-name"
LABEL_HEADLESS = "service.kubernetes.io/headless"
LABEL_SERVICE_NAME = "kubernetes.io/service-name"
ANNOTATION_TRIGGER_TIME = "endpoints.kubernetes.io/last-change-trigger-time"
ANNOTATION_LB_SOURCE_RANGES = "service.beta.kubernetes.io/load-balancer-source-ranges"
LABEL_ZONE = "topology.kubernetes.io/zone"
TAINT_TO_BE_DELETED = "ToBeDeletedByClusterAutoscaler"
# What upstream's informers ask the apiserver for (both Services and EndpointSlices).
INFORMER_LABEL_SELECTOR = f"!{LABEL_SERVICE_PROXY_NAME},!{LABEL_HEADLESS}"

_PROTOCOLS = (TCP, UDP, SCTP)


# --------------------------------------------------------------------------- parsing


def _ipv4(addr: Any) -> str | None:
    """The address if it is dotted-quad IPv4 (inet_pton: strict, and ~20x ipaddress's speed)."""
    s = str(addr)
    try:
        socket.inet_pton(socket.AF_INET, s)
    except (OSError, ValueError):
        return None
    return s


def _ipv4_cidr(c: Any) -> str | None:
    try:
        net = ipaddress.ip_network(str(c).strip(), strict=False)
    except ValueError:
        return None
    return str(net) if net.version == 4 else None


def service_ignored(svc: Mapping[str, Any]) -> str | None:
    """Why kube-proxy ignores this Service, or None if it programs it."""
    md = svc.get("metadata") or {}
    labels = md.get("labels") or {}
    spec = svc.get("spec") or {}
    if LABEL_SERVICE_PROXY_NAME in labels:
        return "service-proxy-name label"
    if LABEL_HEADLESS in labels:
        return "headless label"
    if spec.get("type") == "ExternalName":
        return "ExternalName"
    cip = spec.get("clusterIP")
    if not cip or cip == "None":
        return "headless"
    return None


def parse_service(svc: Mapping[str, Any]) -> dict[ServicePortName, ServicePort]:
    """A v1 Service -> its ServicePorts (empty if the proxy ignores it). IPv4 family only."""
    if service_ignored(svc):
        return {}
    md = svc.get("metadata") or {}
    spec = svc.get("spec") or {}
    ns, name = str(md.get("namespace") or "default"), str(md.get("name"))
    ips = [spec.get("clusterIP"), *(spec.get("clusterIPs") or [])]
    cluster_ip = next((ip for ip in map(_ipv4, ips) if ip), None)
    if cluster_ip is None:
        return {}
    stype = str(spec.get("type") or "ClusterIP")
    external_ips = tuple(sorted({ip for ip in map(_ipv4, spec.get("externalIPs") or []) if ip}))
    lb_ips: tuple[str, ...] = ()
    ranges: tuple[str, ...] = ()
    if stype == "LoadBalancer":
        ingress = ((svc.get("status") or {}).get("loadBalancer") or {}).get("ingress") or []
        # ipMode Proxy (KEP-1860): the LB proxies, so the node must not capture the VIP
        lb_ips = tuple(
            sorted({ip for ing in ingress if ing.get("ipMode") != "Proxy" and (ip := _ipv4(ing.get("ip")))})
        )
        raw = spec.get("loadBalancerSourceRanges") or []
        if not raw:
            ann = (md.get("annotations") or {}).get(ANNOTATION_LB_SOURCE_RANGES, "")
            raw = [r for r in ann.split(",") if r.strip()]
        ranges = tuple(sorted({c for c in map(_ipv4_cidr, raw) if c}))
    affinity = 0
    if spec.get("sessionAffinity") == "ClientIP":
        cfg = ((spec.get("sessionAffinityConfig") or {}).get("clientIP") or {}).get("timeoutSeconds")
        affinity = int(cfg) if cfg else DEFAULT_AFFINITY_TIMEOUT
        affinity = max(1, min(affinity, MAX_AFFINITY_TIMEOUT))
    externally = stype in ("NodePort", "LoadBalancer") or bool(external_ips)
    etp_local = externally and spec.get("externalTrafficPolicy") == "Local"
    itp_local = spec.get("internalTrafficPolicy") == "Local"
    hcnp = int(spec.get("healthCheckNodePort") or 0) if stype == "LoadBalancer" and etp_local else 0
    out: dict[ServicePortName, ServicePort] = {}
    for p in spec.get("ports") or []:
        proto = str(p.get("protocol") or TCP).upper()
        if proto not in _PROTOCOLS or not p.get("port"):
            continue
        spn = ServicePortName(ns, name, str(p.get("name") or ""), proto)
        node_port = int(p.get("nodePort") or 0) if stype in ("NodePort", "LoadBalancer") else 0
        out[spn] = ServicePort(
            name=spn,
            cluster_ip=cluster_ip,
            port=int(p["port"]),
            protocol=proto,
            service_type=stype,
            node_port=node_port,
            external_ips=external_ips,
            load_balancer_ips=lb_ips,
            load_balancer_source_ranges=ranges,
            affinity_timeout=affinity,
            external_policy_local=etp_local,
            internal_policy_local=itp_local,
            health_check_node_port=hcnp,
        )
    return out


@dataclass(frozen=True, slots=True)
class ParsedSlice:
    """One EndpointSlice as the proxy sees it: (port name, protocol) -> endpoints."""

    service: ServiceKey
    ports: Mapping[tuple[str, str], tuple[Endpoint, ...]]
    trigger_time: float | None  # endpoints.kubernetes.io/last-change-trigger-time (epoch s)


def parse_trigger_time(value: Any) -> float | None:
    if not value:
        return None
    try:
        return datetime.fromisoformat(str(value).replace("Z", "+00:00")).timestamp()
    except ValueError:
        return None


def parse_endpoint_slice(es: Mapping[str, Any]) -> ParsedSlice | None:
    """discovery.k8s.io/v1 (or v1beta1) EndpointSlice -> ParsedSlice; None if the proxy ignores it
    (no service-name label, FQDN or IPv6 address type)."""
    md = es.get("metadata") or {}
    svc_name = (md.get("labels") or {}).get(LABEL_SERVICE_NAME)
    if not svc_name or es.get("addressType", "IPv4") != "IPv4":
        return None
    eps: list[Endpoint] = []
    for ep in es.get("endpoints") or []:
        addrs = ep.get("addresses") or []
        ip = _ipv4(addrs[0]) if addrs else None  # upstream uses the first address only
        if ip is None:
            continue
        cond = ep.get("conditions") or {}
        ready = cond.get("ready") is not False  # nil ready = true
        serving = cond.get("serving") is not False if cond.get("serving") is not None else ready
        terminating = cond.get("terminating") is True
        topo = ep.get("topology") or {}  # v1beta1
        hints = ep.get("hints") or {}
        eps.append(
            Endpoint(
                ip=ip,
                port=0,
                ready=ready,
                serving=serving,
                terminating=terminating,
                node_name=ep.get("nodeName") or topo.get("kubernetes.io/hostname"),
                zone=ep.get("zone") or topo.get(LABEL_ZONE),
                zone_hints=tuple(str(z.get("name")) for z in hints.get("forZones") or [] if z.get("name")),
                node_hints=tuple(str(n.get("name")) for n in hints.get("forNodes") or [] if n.get("name")),
            )
        )
    ports: dict[tuple[str, str], tuple[Endpoint, ...]] = {}
    for p in es.get("ports") or []:
        if p.get("port") is None:
            continue
        proto = str(p.get("protocol") or TCP).upper()
        port = int(p["port"])
        ports[(str(p.get("name") or ""), proto)] = tuple(
            Endpoint(e.ip, port, e.ready, e.serving, e.terminating, e.node_name, e.zone, e.zone_hints, e.node_hints)
            for e in eps
        )
    ns = str(md.get("namespace") or "default")
    trig = parse_trigger_time((md.get("annotations") or {}).get(ANNOTATION_TRIGGER_TIME))
    return ParsedSlice(service=(ns, str(svc_name)), ports=ports, trigger_time=trig)


def _rank(e: Endpoint) -> tuple[bool, bool]:
    return (e.ready, e.serving)


def merge_slices(slices: Iterable[ParsedSlice]) -> dict[tuple[str, str], tuple[Endpoint, ...]]:
    """All slices of one Service -> (port name, protocol) -> endpoints, deduplicated by ip:port
    (a ready copy wins over a not-ready one) and sorted by address for stable rendering."""
    merged: dict[tuple[str, str], dict[str, Endpoint]] = {}
    for sl in slices:
        for key, eps in sl.ports.items():
            bucket = merged.setdefault(key, {})
            for e in eps:
                cur = bucket.get(e.addr)
                if cur is None or _rank(e) > _rank(cur):
                    bucket[e.addr] = e
    return {
        key: tuple(sorted(b.values(), key=lambda e: (socket.inet_pton(socket.AF_INET, e.ip), e.port)))
        for key, b in merged.items()
    }


# --------------------------------------------------------------------------- tracker


@dataclass(slots=True)
class SyncToken:
    """What a snapshot included, so commit() clears exactly that."""

    generations: dict[ServiceKey, int]
    trigger_times: dict[ServiceKey, float]
    service_changes: int
    endpoint_changes: int
    full: bool
    conntrack_cleanup: bool
    full_requests: int = 0  # force_full_sync() calls seen when the snapshot was taken


@dataclass(slots=True)
class _Pending:
    gen: int = 0
    service: bool = False
    endpoints: bool = False
    udp: bool = False  # a UDP port or UDP endpoints were involved: stale flows possible
    names: set[ServicePortName] = field(default_factory=set)  # incl. ports removed since


@dataclass(slots=True)
class NodeInfo:
    name: str
    labels: dict[str, str] = field(default_factory=dict)
    eligible: bool = True  # False once deleting / ToBeDeletedByClusterAutoscaler (KEP-3836)
    addresses: tuple[str, ...] = ()  # InternalIP/ExternalIP (IPv4)


class ChangeTracker:
    """Holds the current model and what changed since the last successful sync."""

    def __init__(
        self,
        config: ProxyConfig,
        *,
        on_change: Callable[[], None] | None = None,
        on_full_sync_needed: Callable[[], None] | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.config = config
        self.on_change = on_change
        self.on_full_sync_needed = on_full_sync_needed
        self.clock = clock
        self.service_ports: dict[ServicePortName, ServicePort] = {}
        self.endpoints: dict[ServicePortName, tuple[Endpoint, ...]] = {}
        self._ports_by_service: dict[ServiceKey, dict[ServicePortName, ServicePort]] = {}
        self._slices: dict[ServiceKey, dict[tuple[str, str], ParsedSlice]] = {}
        self._slice_owner: dict[tuple[str, str], ServiceKey] = {}  # (ns, slice name) -> Service
        self._eps_by_service: dict[ServiceKey, dict[tuple[str, str], tuple[Endpoint, ...]]] = {}
        self._pending: dict[ServiceKey, _Pending] = {}
        self._svc_pending = 0  # len of pending entries with .service / .endpoints (kept in step)
        self._eps_pending = 0
        self._trigger: dict[ServiceKey, float] = {}
        self._gen = 0
        self.node = NodeInfo(config.node_name)
        self.service_changes_total = 0
        self.endpoint_changes_total = 0
        self._full_needed = True  # the first sync is full
        self._full_requests = 0  # a forced full sync asked for during a sync must survive its commit

    # ------------------------------------------------------------------ informer handlers

    def on_service(self, typ: str, old: JSON | None, new: JSON | None) -> None:
        obj = new if new is not None else old
        if obj is None:
            return
        md = obj.get("metadata") or {}
        key: ServiceKey = (str(md.get("namespace") or "default"), str(md.get("name")))
        ports = parse_service(new) if new is not None and typ != "DELETED" else {}
        prev = self._ports_by_service.get(key, {})
        if ports == prev:
            return
        for spn in prev:
            if spn not in ports:
                self.service_ports.pop(spn, None)
                self.endpoints.pop(spn, None)
        if ports:
            self._ports_by_service[key] = ports
        else:
            self._ports_by_service.pop(key, None)
        self.service_ports.update(ports)
        self._refresh_endpoints(key)
        udp = any(p.protocol == UDP for p in (*prev.values(), *ports.values()))
        self._mark(key, set(prev) | set(ports), service=True, udp=udp)

    def on_endpoint_slice(self, typ: str, old: JSON | None, new: JSON | None) -> None:
        obj = new if new is not None else old
        if obj is None:
            return
        md = obj.get("metadata") or {}
        skey = (str(md.get("namespace") or "default"), str(md.get("name")))
        new_p = parse_endpoint_slice(new) if new is not None and typ != "DELETED" else None
        touched: set[ServiceKey] = set()
        # The slice leaves its old Service when deleted, ignored now (FQDN...), or relabelled.
        owner = self._slice_owner.get(skey)
        if owner is not None and (new_p is None or new_p.service != owner):
            self._slices.get(owner, {}).pop(skey, None)
            del self._slice_owner[skey]
            touched.add(owner)
        if new_p is not None:
            self._slices.setdefault(new_p.service, {})[skey] = new_p
            self._slice_owner[skey] = new_p.service
            touched.add(new_p.service)
        for key in touched:
            if not self._slices.get(key):
                self._slices.pop(key, None)
            before = self._eps_by_service.get(key, {})
            after = merge_slices(self._slices.get(key, {}).values())
            if before == after:
                continue
            if after:
                self._eps_by_service[key] = after
            else:
                self._eps_by_service.pop(key, None)
            self._refresh_endpoints(key)
            udp = any(proto == UDP for (_, proto) in (*before, *after))
            trig = new_p.trigger_time if new_p is not None and new_p.service == key else None
            if trig is not None:  # the earliest trigger of the changes pending for this Service
                cur = self._trigger.get(key)
                self._trigger[key] = min(cur, trig) if cur is not None else trig
            self._mark(key, set(self._ports_by_service.get(key, {})), endpoints=True, udp=udp)

    def on_node(self, typ: str, old: JSON | None, new: JSON | None) -> None:
        if new is None or typ == "DELETED":
            self.node.eligible = False
            return
        md = new.get("metadata") or {}
        if md.get("name") != self.config.node_name:
            return
        labels = dict(md.get("labels") or {})
        taints = (new.get("spec") or {}).get("taints") or []
        self.node.eligible = not md.get("deletionTimestamp") and not any(
            t.get("key") == TAINT_TO_BE_DELETED for t in taints
        )
        addrs = [
            a.get("address")
            for a in ((new.get("status") or {}).get("addresses") or [])
            if a.get("type") in ("InternalIP", "ExternalIP")
        ]
        self.node.addresses = tuple(ip for ip in map(_ipv4, addrs) if ip)
        if labels != self.node.labels:
            topo_changed = self.node.labels.get(LABEL_ZONE) != labels.get(LABEL_ZONE)
            self.node.labels = labels
            if topo_changed:  # upstream: node label changes force a full sync
                self.force_full_sync()

    # ------------------------------------------------------------------ internals

    def _refresh_endpoints(self, key: ServiceKey) -> None:
        by_port = self._eps_by_service.get(key, {})
        for spn in self._ports_by_service.get(key, {}):
            eps = by_port.get((spn.port, spn.protocol), ())
            if eps:
                self.endpoints[spn] = eps
            else:
                self.endpoints.pop(spn, None)

    def _mark(
        self,
        key: ServiceKey,
        names: set[ServicePortName],
        *,
        service: bool = False,
        endpoints: bool = False,
        udp: bool = False,
    ) -> None:
        self._gen += 1
        p = self._pending.setdefault(key, _Pending())
        p.gen = self._gen
        p.names |= names
        if service and not p.service:
            p.service = True
            self._svc_pending += 1
        if endpoints and not p.endpoints:
            p.endpoints = True
            self._eps_pending += 1
        self.service_changes_total += service
        self.endpoint_changes_total += endpoints
        p.udp = p.udp or udp
        if self.on_change is not None:
            self.on_change()

    def force_full_sync(self) -> None:
        self._full_needed = True
        self._full_requests += 1
        if self.on_full_sync_needed is not None:
            self.on_full_sync_needed()
        elif self.on_change is not None:
            self.on_change()

    # ------------------------------------------------------------------ sync interface

    @property
    def service_changes_pending(self) -> int:
        """Services with a Service change not yet synced."""
        return self._svc_pending

    @property
    def endpoint_changes_pending(self) -> int:
        """Services with an endpoints change not yet synced."""
        return self._eps_pending

    @property
    def has_pending(self) -> bool:
        return bool(self._pending) or self._full_needed

    def changed_service_port_names(self) -> frozenset[ServicePortName]:
        """Every ServicePortName whose Service or endpoints changed since the last successful
        sync, including ports that are gone (so a partial render deletes their chains)."""
        out: set[ServicePortName] = set()
        for p in self._pending.values():
            out |= p.names
        return frozenset(out)

    def snapshot(self, full: bool = False) -> tuple[ProxyState, SyncToken]:
        """The desired state now. Partial unless `full`, a failed sync or a forced full sync."""
        full = full or self._full_needed
        keys = list(self._pending)
        changed = None if full else self.changed_service_port_names()
        state = ProxyState(
            config=self.config,
            services=dict(self.service_ports),
            endpoints=dict(self.endpoints),
            changed=changed,
            node_labels=dict(self.node.labels),
        )
        token = SyncToken(
            generations={k: p.gen for k, p in self._pending.items()},
            trigger_times={k: self._trigger[k] for k in keys if k in self._trigger},
            service_changes=self._svc_pending,
            endpoint_changes=self._eps_pending,
            full=full,
            conntrack_cleanup=full or any(p.udp for p in self._pending.values()),
            full_requests=self._full_requests,
        )
        return state, token

    def commit(self, token: SyncToken) -> None:
        """The sync of `token`'s snapshot succeeded: forget what it covered."""
        for key, gen in token.generations.items():
            p = self._pending.get(key)
            if p is not None and p.gen == gen:
                del self._pending[key]
                self._svc_pending -= p.service
                self._eps_pending -= p.endpoints
                self._trigger.pop(key, None)
        if token.full and token.full_requests == self._full_requests:
            self._full_needed = False

    def failed(self) -> None:
        """The sync failed: the next one is full (everything pending stays)."""
        self._full_needed = True

    def local_endpoint_counts(self) -> dict[ServiceKey, tuple[int, int]]:
        """For Services with a healthCheckNodePort: (port, ready local endpoints) per Service."""
        return health_check_counts(self.service_ports, self.endpoints, self.config.node_name)


def health_check_counts(
    services: Mapping[ServicePortName, ServicePort],
    endpoints: Mapping[ServicePortName, tuple[Endpoint, ...]],
    node_name: str,
) -> dict[ServiceKey, tuple[int, int]]:
    """Service -> (healthCheckNodePort, ready endpoints on this node), as upstream's
    LocalReadyEndpoints feeds the service health servers (terminating ones do not count)."""
    hc: dict[ServiceKey, int] = {}
    addrs: dict[ServiceKey, set[str]] = {}
    for spn, sp in services.items():
        if not sp.health_check_node_port:
            continue
        key = spn.service
        hc[key] = sp.health_check_node_port
        addrs.setdefault(key, set()).update(
            e.ip for e in endpoints.get(spn, ()) if e.node_name == node_name and e.ready)
    return {key: (port, len(addrs[key])) for key, port in hc.items()}
