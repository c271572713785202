"""The proxy's model: plain data shared by every mode, the tracer, the bench and the
EndpointSlice controller. No mode parses API objects; they all take a `ProxyState`.

Names follow upstream's pkg/proxy: a `ServicePortName` identifies one port of one Service,
`ServicePort` is what the data plane needs to know about it, `Endpoint` is one backend of it.
"""

from __future__ import annotations

import base64
import hashlib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

TCP, UDP, SCTP = "TCP", "UDP", "SCTP"
DEFAULT_AFFINITY_TIMEOUT = 10800  # seconds; core/v1 DefaultClientIPServiceAffinitySeconds
MAX_AFFINITY_TIMEOUT = 86400


@dataclass(frozen=True, slots=True, order=True)
class ServicePortName:
    """`<ns>/<name>:<port name>` plus the protocol, like upstream's proxy.ServicePortName."""

    namespace: str
    name: str
    port: str = ""  # the port's name; "" for a single unnamed port
    protocol: str = TCP

    def __str__(self) -> str:  # upstream's ServicePortName.String()
        return f"{self.namespace}/{self.name}:{self.port}" if self.port else f"{self.namespace}/{self.name}"

    @property
    def service(self) -> tuple[str, str]:
        return (self.namespace, self.name)


@dataclass(frozen=True, slots=True)
class ServicePort:
    """Everything the data plane needs about one Service port (upstream's ServicePort interface)."""

    name: ServicePortName
    cluster_ip: str | None  # None for headless (which the tracker drops before a mode sees it)
    port: int
    protocol: str = TCP
    service_type: str = "ClusterIP"  # ClusterIP | NodePort | LoadBalancer (ExternalName never gets here)
    node_port: int = 0  # 0: none
    external_ips: tuple[str, ...] = ()
    load_balancer_ips: tuple[str, ...] = ()  # status.loadBalancer.ingress[].ip (ipMode VIP only)
    load_balancer_source_ranges: tuple[str, ...] = ()
    affinity_timeout: int = 0  # seconds of ClientIP affinity; 0 = sessionAffinity None
    external_policy_local: bool = False  # externalTrafficPolicy: Local
    internal_policy_local: bool = False  # internalTrafficPolicy: Local
    health_check_node_port: int = 0

    @property
    def has_external(self) -> bool:
        """Whether the port is reachable from outside: NodePort, externalIPs or LB IPs."""
        return bool(self.node_port or self.external_ips or self.load_balancer_ips)

    @property
    def protocol_lower(self) -> str:
        return self.protocol.lower()


@dataclass(frozen=True, slots=True)
class Endpoint:
    """One backend of a ServicePort, from EndpointSlice conditions (KEP-1669 semantics)."""

    ip: str
    port: int
    ready: bool = True
    serving: bool = True
    terminating: bool = False
    node_name: str | None = None
    zone: str | None = None
    # EndpointSlice hints (topology-aware routing, KEP-2433/4444/3015): the zones / nodes this
    # endpoint should serve; empty = no hint.
    zone_hints: tuple[str, ...] = ()
    node_hints: tuple[str, ...] = ()

    @property
    def addr(self) -> str:
        """`ip:port`, the form upstream hashes into KUBE-SEP- names."""
        return f"{self.ip}:{self.port}"


@dataclass(frozen=True, slots=True)
class ProxyConfig:
    """The node-level settings that change what a mode renders (flags of `kpx proxy`)."""

    node_name: str
    node_ips: tuple[str, ...] = ()
    cluster_cidr: str | None = None  # pod network; traffic from outside it to a ClusterIP is masqueraded
    masquerade_all: bool = False
    masquerade_bit: int = 14
    nodeport_addresses: tuple[str, ...] = ()  # CIDRs; empty = all local addresses
    tcp_be_liberal: bool = False  # when set, no INVALID-drop rule
    localhost_nodeports: bool = True  # v1alpha1 iptables.localhostNodePorts (route_localnet)

    @property
    def masq_mark(self) -> str:
        return f"{1 << self.masquerade_bit:#08x}"


@dataclass(slots=True)
class ProxyState:
    """Desired state handed to `mode.render`. `changed` is None for a full sync; otherwise the
    ServicePortNames whose Service or endpoints changed since the last successful sync."""

    config: ProxyConfig
    services: Mapping[ServicePortName, ServicePort] = field(default_factory=dict)
    endpoints: Mapping[ServicePortName, tuple[Endpoint, ...]] = field(default_factory=dict)
    changed: frozenset[ServicePortName] | None = None
    node_labels: Mapping[str, str] = field(default_factory=dict)  # this node's labels (topology)

    @property
    def full(self) -> bool:
        return self.changed is None


@dataclass(frozen=True, slots=True)
class CategorizedEndpoints:
    """Upstream's CategorizeEndpoints result for one ServicePort."""

    cluster: tuple[Endpoint, ...]  # used for Cluster traffic policy
    local: tuple[Endpoint, ...]  # used for Local traffic policy (on this node)
    all_reachable: tuple[Endpoint, ...]  # union of the above that this node may pick
    # upstream's hasAnyEndpoints: a usable (ready, or serving+terminating) endpoint anywhere in
    # the cluster. False -> REJECT ("has no endpoints"); True but no local -> DROP for Local policy.
    has_any: bool


def _usable(eps: Iterable[Endpoint]) -> tuple[Endpoint, ...]:
    """Ready endpoints; if there are none, the serving+terminating ones (KEP-1669 fallback)."""
    eps = tuple(eps)
    ready = tuple(e for e in eps if e.ready)
    if ready:
        return ready
    return tuple(e for e in eps if e.serving and e.terminating)


LABEL_TOPOLOGY_ZONE = "topology.kubernetes.io/zone"
PREFER_SAME_NODE, PREFER_SAME_ZONE = "PreferSameNode", "PreferSameZone"


def topology_mode(eps: tuple[Endpoint, ...], node_name: str, zone: str) -> str:
    """Upstream's topologyModeFromHints: use node hints if every ready endpoint has some and one
    is for this node; else zone hints likewise; else no topology filtering ("")."""
    ready = [e for e in eps if e.ready]
    if ready and all(e.node_hints for e in ready) and any(node_name in e.node_hints for e in ready):
        return PREFER_SAME_NODE
    if ready and all(e.zone_hints for e in ready) and zone and any(zone in e.zone_hints for e in ready):
        return PREFER_SAME_ZONE
    return ""


def categorize_endpoints(
    svc: ServicePort,
    eps: Iterable[Endpoint],
    node_name: str,
    node_labels: Mapping[str, str] | None = None,
) -> CategorizedEndpoints:
    """Split a ServicePort's endpoints as upstream's proxy.CategorizeEndpoints does.

    Cluster policy uses all ready endpoints (narrowed by topology hints when every ready endpoint
    has them and some are for this node/zone; pass `node_labels`, e.g. state.node_labels, to use
    zone hints), falling back to serving-terminating ones; Local policy does the same over this
    node's endpoints only (the fallback is per node).
    """
    eps = tuple(eps)
    # Upstream's UsesClusterEndpoints: an externally reachable port always needs the Cluster set,
    # because pod and host traffic to its external IPs short-circuits to KUBE-SVC even with ETP=Local.
    need_cluster = not svc.internal_policy_local or svc.has_external
    need_local = svc.internal_policy_local or (svc.has_external and svc.external_policy_local)
    cluster: tuple[Endpoint, ...] = ()
    if need_cluster:
        mode = topology_mode(eps, node_name, (node_labels or {}).get(LABEL_TOPOLOGY_ZONE, ""))
        if mode == PREFER_SAME_NODE:
            cluster = tuple(e for e in eps if e.ready and node_name in e.node_hints)
        elif mode == PREFER_SAME_ZONE:
            zone = (node_labels or {}).get(LABEL_TOPOLOGY_ZONE, "")
            cluster = tuple(e for e in eps if e.ready and zone in e.zone_hints)
        else:
            cluster = _usable(eps)
        if not cluster:  # (with topology: no ready endpoint at all) -> serving+terminating ones
            cluster = tuple(e for e in eps if e.serving and e.terminating)
    local = _usable(e for e in eps if e.node_name == node_name) if need_local else ()
    if not need_local:
        reachable = cluster
    elif not need_cluster:
        reachable = local
    else:
        seen = {e.addr for e in cluster}
        reachable = cluster + tuple(e for e in local if e.addr not in seen)
    has_any = bool(cluster) or any(e.ready or (e.serving and e.terminating) for e in eps)
    return CategorizedEndpoints(cluster=cluster, local=local, all_reachable=reachable, has_any=has_any)


def port_proto_hash(spn: ServicePortName, protocol: str | None = None) -> str:
    """Upstream's portProtoHash: base32(sha256(str(spn) + lower(proto)))[:16]."""
    proto = (protocol or spn.protocol).lower()
    digest = hashlib.sha256((str(spn) + proto).encode()).digest()
    return base64.b32encode(digest[:10]).decode()  # 10 bytes = exactly 16 base32 chars


def endpoint_hash(spn: ServicePortName, ep_addr: str, protocol: str | None = None) -> str:
    """Upstream's servicePortEndpointChainName hash: base32(sha256(spn + proto + ip:port))[:16]."""
    proto = (protocol or spn.protocol).lower()
    digest = hashlib.sha256((str(spn) + proto + ep_addr).encode()).digest()
    return base64.b32encode(digest[:10]).decode()  # 10 bytes = exactly 16 base32 chars
