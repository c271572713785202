"""Pure render of the userspace mode: the listener table and ONE iptables-restore transaction.

Upstream's userspace proxier (pkg/proxy/userspace, removed in v1.26) opened one listener per
Service port on a proxy port and sent the Service's traffic there with nat "portal" rules:

    KUBE-PORTALS-CONTAINER  (from PREROUTING)  -d <clusterIP|externalIP|lbIP>/32 --dport P -j REDIRECT --to-ports <proxy port>
    KUBE-PORTALS-HOST       (from OUTPUT)      the same, -j DNAT --to-destination <host IP>:<proxy port>
    KUBE-NODEPORT-CONTAINER (from PREROUTING, -m addrtype --dst-type LOCAL)  --dport <nodePort> -j REDIRECT
    KUBE-NODEPORT-HOST      (from OUTPUT, -m addrtype --dst-type LOCAL)      --dport <nodePort> -j DNAT
    filter KUBE-NODEPORT-NON-LOCAL (from INPUT)  --dport <proxy port> -m state --state NEW -j ACCEPT

Locally generated traffic is DNATed to the host IP rather than REDIRECTed (REDIRECT in OUTPUT
goes to 127.0.0.1, and replies from another address "make DNS unhappy", upstream's comment).

Every sync rewrites the (few) rules of these chains whole: declaring a chain in a --noflush
restore flushes it, so the restore is one atomic replace that never touches other chains.

Proxy ports come from a range (default 20000-29999: below the node's ephemeral ports and the
NodePort range) and are sticky: a port keeps its number for as long as its Service port
exists, across syncs (`prior`) and across proxy restarts (the mode seeds `prior` from the rules
a previous instance left), so rules and listeners never point at different ports.

A Service port without usable endpoints keeps its portal rules and its proxy port but gets no
listener, so the kernel refuses its connections (TCP RST / ICMP port unreachable), like the
kernel modes' REJECT.
"""

from __future__ import annotations

import ipaddress
import shlex
from collections.abc import Mapping
from dataclasses import dataclass, field

from proxy.model import (
    SCTP,
    TCP,
    UDP,
    ProxyConfig,
    ProxyState,
    ServicePort,
    ServicePortName,
    categorize_endpoints,
)

PORTALS_CONTAINER = "KUBE-PORTALS-CONTAINER"
PORTALS_HOST = "KUBE-PORTALS-HOST"
NODEPORT_CONTAINER = "KUBE-NODEPORT-CONTAINER"
NODEPORT_HOST = "KUBE-NODEPORT-HOST"
NODEPORT_NON_LOCAL = "KUBE-NODEPORT-NON-LOCAL"
NAT_CHAINS = (PORTALS_CONTAINER, PORTALS_HOST, NODEPORT_CONTAINER, NODEPORT_HOST)
FILTER_CHAINS = (NODEPORT_NON_LOCAL,)
DEFAULT_PORT_RANGE = (20000, 29999)

_CLUSTERIP_NOTE = '-m comment --comment "handle ClusterIPs; NOTE: this must be before the NodePort rules"'
_NODEPORT_NOTE = (
    '-m addrtype --dst-type LOCAL -m comment --comment '
    '"handle service NodePorts; NOTE: this must be the last rule in the chain"'
)


@dataclass(frozen=True, slots=True)
class Jump:
    table: str
    source: str
    target: str
    spec: str

    def rule(self) -> str:
        return f"-A {self.source} {self.spec} -j {self.target}"


# In this order (portals before NodePorts), appended to the builtin chains when missing.
JUMPS = (
    Jump("nat", "PREROUTING", PORTALS_CONTAINER, _CLUSTERIP_NOTE),
    Jump("nat", "OUTPUT", PORTALS_HOST, _CLUSTERIP_NOTE),
    Jump("nat", "PREROUTING", NODEPORT_CONTAINER, _NODEPORT_NOTE),
    Jump("nat", "OUTPUT", NODEPORT_HOST, _NODEPORT_NOTE),
    Jump("filter", "INPUT", NODEPORT_NON_LOCAL, '-m comment --comment "Ensure that non-local NodePort traffic can flow"'),
)


@dataclass(frozen=True, slots=True)
class Listener:
    """One Service port's proxy socket. `endpoints` is the round-robin set (ip, port), in order;
    empty means no listener is open (connections are refused)."""

    name: ServicePortName
    protocol: str  # TCP | UDP
    proxy_port: int
    endpoints: tuple[tuple[str, int], ...]
    affinity_timeout: int = 0  # seconds of ClientIP affinity; 0 = None

    @property
    def open(self) -> bool:
        return bool(self.endpoints)


@dataclass(frozen=True, slots=True)
class UserspacePrior:
    """What was programmed: the proxy port of every Service port."""

    ports: Mapping[ServicePortName, int] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class UserspacePayload:
    listeners: Mapping[ServicePortName, Listener]
    tables: Mapping[str, tuple[str, ...]]  # table -> chain declarations and rules, in order

    def restore(self, extra: Mapping[str, list[str]] | None = None) -> str:
        """The iptables-restore --noflush input; `extra[table]` lines (jump rules apply found
        missing) go after the table's own lines, in the same transaction."""
        out: list[str] = []
        for table, lines in self.tables.items():
            out += [f"*{table}", *lines, *(extra or {}).get(table, ()), "COMMIT"]
        return "\n".join(out) + "\n"


class PortRangeExhausted(Exception):
    pass


def allocate_ports(
    names: list[ServicePortName], prior: Mapping[ServicePortName, int], port_range: tuple[int, int]
) -> dict[ServicePortName, int]:
    """Keep every prior port still wanted; give new names the lowest free ports, in name order."""
    lo, hi = port_range
    out = {n: prior[n] for n in names if n in prior and lo <= prior[n] <= hi}
    used = set(out.values())
    nxt = lo
    for n in sorted(x for x in names if x not in out):
        while nxt in used:
            nxt += 1
        if nxt > hi:
            raise PortRangeExhausted(f"proxy port range {lo}-{hi} is exhausted ({len(names)} service ports); "
                                     "widen --proxy-port-range")
        out[n] = nxt
        used.add(nxt)
    return out


def _match(svc: ServicePort, dport: int, dest: str | None) -> str:
    proto = svc.protocol_lower
    d = f" -d {dest}/32" if dest else ""
    return f'-m comment --comment "{svc.name}" -p {proto} -m {proto} --dport {dport}{d}'


def _host_ip(cfg: ProxyConfig) -> str:
    """Where KUBE-PORTALS-HOST DNATs to: the node IP (the first local address outside the pod
    network, not the bridge's), as upstream's hostIP."""
    pods = ipaddress.ip_network(cfg.cluster_cidr, strict=False) if cfg.cluster_cidr else None
    for ip in cfg.node_ips:
        if pods is None or ipaddress.ip_address(ip) not in pods:
            return ip
    return cfg.node_ips[0] if cfg.node_ips else "127.0.0.1"


def render(
    state: ProxyState,
    prior: UserspacePrior | None,
    *,
    port_range: tuple[int, int] = DEFAULT_PORT_RANGE,
    host_ip: str | None = None,
) -> tuple[UserspacePayload, UserspacePrior, dict[str, int]]:
    """Desired state -> (listener table + restore text, new prior, stats). Pure."""
    cfg = state.config
    host = host_ip or _host_ip(cfg)
    svcs = {n: s for n, s in state.services.items() if s.protocol in (TCP, UDP) and s.cluster_ip}
    ports = allocate_ports(list(svcs), prior.ports if prior else {}, port_range)
    listeners: dict[ServicePortName, Listener] = {}
    pc: list[str] = []
    ph: list[str] = []
    nc: list[str] = []
    nh: list[str] = []
    nl: list[str] = []
    for name in sorted(svcs):
        svc = svcs[name]
        pport = ports[name]
        cat = categorize_endpoints(svc, state.endpoints.get(name, ()), cfg.node_name, state.node_labels)
        chosen = cat.local if svc.internal_policy_local else cat.cluster
        eps = tuple(sorted({(e.ip, e.port) for e in chosen}))
        listeners[name] = Listener(name, svc.protocol, pport, eps, svc.affinity_timeout)
        redirect = f"-j REDIRECT --to-ports {pport}"
        dnat = f"-j DNAT --to-destination {host}:{pport}"
        for ip in (svc.cluster_ip, *svc.external_ips, *svc.load_balancer_ips):
            m = _match(svc, svc.port, ip)
            pc.append(f"-A {PORTALS_CONTAINER} {m} {redirect}")
            ph.append(f"-A {PORTALS_HOST} {m} {dnat}")
        if svc.node_port:
            m = _match(svc, svc.node_port, None)
            nc.append(f"-A {NODEPORT_CONTAINER} {m} {redirect}")
            nh.append(f"-A {NODEPORT_HOST} {m} {dnat}")
            nl.append(f"-A {NODEPORT_NON_LOCAL} {_match(svc, pport, None)} -m state --state NEW -j ACCEPT")
    tables = {
        "nat": (*(f":{c} - [0:0]" for c in NAT_CHAINS), *pc, *ph, *nc, *nh),
        "filter": (*(f":{c} - [0:0]" for c in FILTER_CHAINS), *nl),
    }
    payload = UserspacePayload(listeners, tables)
    text = payload.restore()
    stats = {
        "rules_nat": len(pc) + len(ph) + len(nc) + len(nh),
        "rules_filter": len(nl),
        "listeners": sum(1 for x in listeners.values() if x.open),
        "service_ports": len(listeners),
        "skipped_sctp": sum(1 for s in state.services.values() if s.protocol == SCTP),
        "payload_bytes": len(text),
    }
    return payload, UserspacePrior(ports), stats


def recover_ports(nat_save: str, port_range: tuple[int, int] = DEFAULT_PORT_RANGE) -> dict[ServicePortName, int]:
    """The proxy ports a previous instance programmed (its KUBE-PORTALS-CONTAINER / NODEPORT
    REDIRECT rules in `iptables-save -t nat` output), so a restarted proxy keeps them."""
    out: dict[ServicePortName, int] = {}
    for line in nat_save.splitlines():
        if not (line.startswith(f"-A {PORTALS_CONTAINER} ") or line.startswith(f"-A {NODEPORT_CONTAINER} ")):
            continue
        try:
            words = shlex.split(line)
            comment = words[words.index("--comment") + 1]
            proto = words[words.index("-p") + 1].upper()
            port = int(words[words.index("--to-ports") + 1])
        except (ValueError, IndexError):
            continue
        ns, _, rest = comment.partition("/")
        name, _, pname = rest.partition(":")
        if not ns or not name or not port_range[0] <= port <= port_range[1]:
            continue
        out[ServicePortName(ns, name, pname, proto)] = port
    return out
