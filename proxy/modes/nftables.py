"""nftables mode: upstream kube-proxy's `ip kube-proxy` table (KEP-3866), one `nft -f` per sync.

Dispatch is by verdict maps (`service-ips`, `service-nodeports`), so the first packet of a new
connection costs one hash lookup however many Services exist; endpoint choice is one
`numgen random mod N vmap` rule into a named per-chain map. Per-Service and per-endpoint chains carry upstream's names
(`service-ULMVA6XW-ns1/svc1/tcp/p80`, `endpoint-5OJB2KTY-ns1/svc1/tcp/p80__10.180.0.1/80`).

Syncs:
- full (start, after a failure, drift): the table is re-created inside ONE transaction
  (`add table; delete table; add table; ...`), so there is never a moment without rules and
  nothing outside the table is touched. Established connections keep their conntrack NAT.
- partial: only the changed Services' chains are rewritten (`add chain; flush chain; rules`) and
  their map elements diffed against what was programmed; chains that went stale are flushed now
  and deleted in the next sync (kernels < 6.2 notice an unreferenced chain only a little later).

`nft -f` (the Debian `nft` binary) is the writer rather than python3-nftables: the binding is the
same libnftables parsing the same text, but it lives in Debian's system Python only (not in the
project's venv), and one short-lived process per sync costs ~2 ms, nothing next to the work of a
transaction. Reading (`check_drift`) also uses `nft`.
"""

from __future__ import annotations

import base64
import hashlib
import ipaddress
import shutil
import subprocess
from dataclasses import dataclass, field
from functools import lru_cache

from proxy.model import (
    CategorizedEndpoints,
    Endpoint,
    ProxyState,
    ServicePort,
    ServicePortName,
    categorize_endpoints,
)
from proxy.modes.base import ApplyError, Mode, ModeUnavailable, Plan

TABLE = "kube-proxy"
FAMILY = "ip"
T = f"{FAMILY} {TABLE}"
NAME_LENGTH_MAX = 256  # knftables.NameLengthMax

# Base chains: (name, type, hook, priority) as upstream: dstnat-10, dstnat+10, dstnat, srcnat
# written as numbers (-100 = dstnat, 100 = srcnat) since named priorities are hook-specific.
BASE_CHAINS = (
    ("filter-prerouting", "filter", "prerouting", "-110"),
    ("filter-input", "filter", "input", "-110"),
    ("filter-forward", "filter", "forward", "-110"),
    ("filter-output", "filter", "output", "-110"),
    ("filter-output-post-dnat", "filter", "output", "-90"),
    ("nat-prerouting", "nat", "prerouting", "-100"),
    ("nat-output", "nat", "output", "-100"),
    ("nat-postrouting", "nat", "postrouting", "100"),
)
FIXED_CHAINS = (
    "nodeport-endpoints-check",
    "service-endpoints-check",
    "firewall-check",
    "services",
    "masquerading",
    "mark-for-masquerade",
    "cluster-ips-check",
    "reject-chain",
)
SERVICE_IPS, SERVICE_NODEPORTS = "service-ips", "service-nodeports"
NO_EP_SERVICES, NO_EP_NODEPORTS = "no-endpoint-services", "no-endpoint-nodeports"
FIREWALL_IPS = "firewall-ips"
CLUSTER_IPS, NODEPORT_IPS = "cluster-ips", "nodeport-ips"
IP_PORT_MAP = "ipv4_addr . inet_proto . inet_service : verdict"
PORT_MAP = "inet_proto . inet_service : verdict"
MAPS = (
    (SERVICE_IPS, IP_PORT_MAP, "ClusterIP, ExternalIP and LoadBalancer IP traffic"),
    (SERVICE_NODEPORTS, PORT_MAP, "NodePort traffic"),
    (NO_EP_SERVICES, IP_PORT_MAP, "vmap to drop or reject packets to services with no endpoints"),
    (NO_EP_NODEPORTS, PORT_MAP, "vmap to drop or reject packets to service nodeports with no endpoints"),
    (FIREWALL_IPS, IP_PORT_MAP, "destinations that are subject to LoadBalancerSourceRanges"),
)

Element = tuple[str, str, str]  # (map, key, verdict)


def nft_hash(name: str) -> str:
    """First 8 characters of base32(sha256(name)), as upstream's hashAndTruncate."""
    return base64.b32encode(hashlib.sha256(name.encode()).digest()).decode()[:8]


@lru_cache(maxsize=200_000)
def hash_and_truncate(name: str) -> str:
    full = f"{nft_hash(name)}-{name}"
    limit = NAME_LENGTH_MAX - 16
    return full if len(full) <= limit else full[: limit - 3] + "..."


def service_base(spn: ServicePortName) -> str:
    return f"{spn.namespace}/{spn.name}/{spn.protocol.lower()}/{spn.port}"


def endpoint_base(spn: ServicePortName, ep: Endpoint) -> str:
    return f"{service_base(spn)}__{ep.ip}/{ep.port}"


@dataclass(frozen=True, slots=True)
class ServiceChains:
    cluster: str
    local: str
    external: str
    firewall: str

    @classmethod
    def of(cls, spn: ServicePortName) -> ServiceChains:
        h = hash_and_truncate(service_base(spn))
        return cls(f"service-{h}", f"local-{h}", f"external-{h}", f"firewall-{h}")


@dataclass(slots=True)
class RenderedService:
    chains: dict[str, list[str]] = field(default_factory=dict)  # chain -> rule bodies
    elements: dict[Element, None] = field(default_factory=dict)  # an ordered set
    # named sets/maps the chains use -> declaration: affinity sets and per-chain endpoint maps
    sets: dict[str, str] = field(default_factory=dict)
    map_elements: dict[str, list[str]] = field(default_factory=dict)  # endpoint map -> its elements


@dataclass(frozen=True, slots=True)
class NftPrior:
    """What the last successful transaction left in the table."""

    chains: dict[ServicePortName, frozenset[str]]
    elements: dict[ServicePortName, tuple[Element, ...]]
    sets: dict[ServicePortName, frozenset[str]]
    cluster_ips: frozenset[str]
    nodeport_ips: frozenset[str]
    pending_delete_chains: frozenset[str] = frozenset()
    pending_delete_sets: frozenset[str] = frozenset()


def _element_lines(elems: list[Element], chunk: int = 1000) -> list[str]:
    """`add element` lines grouped per map (one line per map and chunk parses far faster)."""
    by_map: dict[str, list[str]] = {}
    for m, key, v in elems:
        by_map.setdefault(m, []).append(f"{key} : {v}")
    out = []
    for m, items in by_map.items():
        for i in range(0, len(items), chunk):
            out.append(f"add element {T} {m} {{ {', '.join(items[i:i + chunk])} }}")
    return out


ENDPOINT_MAP_DECL = "{ typeof numgen random mod 1 : verdict ; }"


def _set_kind(name: str) -> str:
    return "set" if name.startswith("affinity-") else "map"


def _affinity_decl(timeout: int) -> str:
    return f"{{ type ipv4_addr ; flags dynamic,timeout ; timeout {timeout}s ; }}"


class NftablesMode(Mode[NftPrior]):
    name = "nftables"

    # ---- render (pure) -------------------------------------------------------------------

    def _nodeport_ips(self) -> frozenset[str]:
        cfg = self.config
        if cfg.nodeport_addresses:
            nets = [ipaddress.ip_network(c, strict=False) for c in cfg.nodeport_addresses]
            return frozenset(ip for ip in cfg.node_ips if any(ipaddress.ip_address(ip) in n for n in nets))
        return frozenset(cfg.node_ips)

    def _dispatch_chain(self, svc: ServicePort, ch: str, eps: tuple[Endpoint, ...], out: RenderedService,
                        masq_rule: str | None) -> None:
        spn = svc.name
        rules: list[str] = []
        if masq_rule:
            rules.append(masq_rule)
        ep_chains = []
        for ep in eps:
            eh = hash_and_truncate(endpoint_base(spn, ep))
            ep_chain = f"endpoint-{eh}"
            ep_chains.append(ep_chain)
            if ep_chain not in out.chains:
                ep_rules = [f"ip saddr {ep.ip} jump mark-for-masquerade"]
                if svc.affinity_timeout:
                    aff = f"affinity-{eh}"
                    out.sets[aff] = _affinity_decl(svc.affinity_timeout)
                    ep_rules.append(f"update @{aff} {{ ip saddr }}")
                ep_rules.append(f"meta l4proto {svc.protocol_lower} dnat to {ep.ip}:{ep.port}")
                out.chains[ep_chain] = ep_rules
            if svc.affinity_timeout:
                rules.append(f"ip saddr @affinity-{eh} goto {ep_chain}")
        # Endpoint choice: numgen into a NAMED verdict map of the same name as the chain. Upstream
        # writes an anonymous map inline; the kernel names each anonymous set by scanning all of
        # the table's sets, which made a 10k-Service transaction quadratic (minutes). A named map
        # costs a hash insert and lets partial syncs refill it without re-parsing the rule.
        out.sets[ch] = ENDPOINT_MAP_DECL
        out.map_elements[ch] = [f"{i} : goto {c}" for i, c in enumerate(ep_chains)]
        rules.append(f"numgen random mod {len(ep_chains)} vmap @{ch}")
        out.chains[ch] = rules

    def render_service(self, svc: ServicePort, cat: CategorizedEndpoints) -> RenderedService:
        cfg = self.config
        out = RenderedService()
        names = ServiceChains.of(svc.name)
        proto, port = svc.protocol_lower, svc.port
        if cat.cluster:
            if cfg.masquerade_all:
                masq = "jump mark-for-masquerade"
            elif cfg.cluster_cidr and svc.cluster_ip:
                masq = (f"ip daddr {svc.cluster_ip} {proto} dport {port} ip saddr != {cfg.cluster_cidr} "
                        "jump mark-for-masquerade")
            else:
                masq = None
            self._dispatch_chain(svc, names.cluster, cat.cluster, out, masq)
        if cat.local and (svc.internal_policy_local or svc.external_policy_local):
            self._dispatch_chain(svc, names.local, cat.local, out, None)

        # internal (ClusterIP) traffic
        if svc.internal_policy_local:
            internal_ok, internal_target = bool(cat.local), f"goto {names.local}"
            internal_block = "drop"
        else:
            internal_ok, internal_target = bool(cat.cluster), f"goto {names.cluster}"
            internal_block = "goto reject-chain"
        if svc.cluster_ip:
            key = f"{svc.cluster_ip} . {proto} . {port}"
            if internal_ok:
                out.elements[(SERVICE_IPS, key, internal_target)] = None
            else:
                out.elements[(NO_EP_SERVICES, key, internal_block)] = None

        # external traffic (NodePort, externalIPs, LoadBalancer IPs)
        if svc.has_external:
            if svc.external_policy_local:
                external_ok, external_block = bool(cat.local), "drop"
            else:
                external_ok, external_block = bool(cat.cluster), "goto reject-chain"
            if external_ok:
                ext: list[str] = []
                if not svc.external_policy_local:
                    ext += ["jump mark-for-masquerade", f"goto {names.cluster}"]
                else:
                    if cat.cluster:
                        if cfg.cluster_cidr:
                            ext.append(f"ip saddr {cfg.cluster_cidr} goto {names.cluster}")
                        ext += ["fib saddr type local jump mark-for-masquerade",
                                f"fib saddr type local goto {names.cluster}"]
                    ext.append(f"goto {names.local}")
                out.chains[names.external] = ext
            ext_verdict = f"goto {names.external}" if external_ok else None
            for ip in (*svc.external_ips, *svc.load_balancer_ips):
                key = f"{ip} . {proto} . {port}"
                if ext_verdict:
                    out.elements[(SERVICE_IPS, key, ext_verdict)] = None
                else:
                    out.elements[(NO_EP_SERVICES, key, external_block)] = None
            if svc.node_port:
                key = f"{proto} . {svc.node_port}"
                if ext_verdict:
                    out.elements[(SERVICE_NODEPORTS, key, ext_verdict)] = None
                else:
                    out.elements[(NO_EP_NODEPORTS, key, external_block)] = None
            if svc.load_balancer_ips and svc.load_balancer_source_ranges:
                ranges = ", ".join(svc.load_balancer_source_ranges)
                out.chains[names.firewall] = [f"ip saddr != {{ {ranges} }} drop"]
                for ip in svc.load_balancer_ips:
                    out.elements[(FIREWALL_IPS, f"{ip} . {proto} . {port}", f"goto {names.firewall}")] = None
        return out

    def _base_lines(self, nodeport_ips: frozenset[str]) -> list[str]:
        cfg = self.config
        mark = cfg.masq_mark
        L = [f'add table {T} {{ comment "rules for kube-proxy" ; }}']
        for name, typ, hook, prio in BASE_CHAINS:
            L.append(f"add chain {T} {name} {{ type {typ} hook {hook} priority {prio} ; }}")
        for name in FIXED_CHAINS:
            L.append(f"add chain {T} {name}")
        for name, typ, comment in MAPS:
            L.append(f'add map {T} {name} {{ type {typ} ; comment "{comment}" ; }}')
        L.append(f'add set {T} {CLUSTER_IPS} {{ type ipv4_addr ; comment "Active ClusterIPs" ; }}')
        if nodeport_ips:
            L.append(f'add set {T} {NODEPORT_IPS} {{ type ipv4_addr ; comment "IPs that accept NodePort traffic" ; }}')
            np_match = f"ip daddr @{NODEPORT_IPS}"
        else:
            np_match = "fib daddr type local ip daddr != 127.0.0.0/8"
        rules = {
            "filter-prerouting": ["ct state new jump firewall-check"],
            "filter-input": ["ct state new jump nodeport-endpoints-check",
                             "ct state new jump service-endpoints-check"],
            "filter-forward": ["ct state new jump service-endpoints-check",
                               "ct state new jump cluster-ips-check"],
            "filter-output": ["ct state new jump service-endpoints-check", "ct state new jump firewall-check"],
            "filter-output-post-dnat": ["ct state new jump cluster-ips-check"],
            "nat-prerouting": ["jump services"],
            "nat-output": ["jump services"],
            "nat-postrouting": ["jump masquerading"],
            "nodeport-endpoints-check": [f"{np_match} meta l4proto . th dport vmap @{NO_EP_NODEPORTS}"],
            "service-endpoints-check": [f"ip daddr . meta l4proto . th dport vmap @{NO_EP_SERVICES}"],
            "firewall-check": [f"ip daddr . meta l4proto . th dport vmap @{FIREWALL_IPS}"],
            "services": [f"ip daddr . meta l4proto . th dport vmap @{SERVICE_IPS}",
                         f"{np_match} meta l4proto . th dport vmap @{SERVICE_NODEPORTS}"],
            "masquerading": [f"meta mark & {mark} == 0 return", f"meta mark set meta mark ^ {mark}",
                             "masquerade fully-random"],
            "mark-for-masquerade": [f"meta mark set meta mark | {mark}"],
            "cluster-ips-check": [f"ip daddr @{CLUSTER_IPS} reject"],
            "reject-chain": ["reject"],
        }
        for chain, body in rules.items():
            L += [f"add rule {T} {chain} {r}" for r in body]
        return L

    def render(self, state: ProxyState, prior: NftPrior | None) -> Plan[NftPrior]:
        cfg = state.config
        full = state.changed is None or prior is None
        services = state.services
        nodeport_ips = self._nodeport_ips()
        cluster_ips = frozenset(s.cluster_ip for s in services.values() if s.cluster_ip)
        L: list[str] = []
        if full:
            L += [f"add table {T}", f"delete table {T}"]
            L += self._base_lines(nodeport_ips)
            old_chains: dict[ServicePortName, frozenset[str]] = {}
            old_elems: dict[ServicePortName, tuple[Element, ...]] = {}
            old_sets: dict[ServicePortName, frozenset[str]] = {}
            todo: list[ServicePortName] = list(services.keys())
            old_cips: frozenset[str] = frozenset()
            pend_chains: frozenset[str] = frozenset()
            pend_sets: frozenset[str] = frozenset()
        else:
            assert prior is not None and state.changed is not None
            old_chains, old_elems, old_sets = prior.chains, prior.elements, prior.sets
            todo = sorted(state.changed | (prior.chains.keys() - services.keys()) | (prior.elements.keys() - services.keys()))
            old_cips = prior.cluster_ips
            pend_chains, pend_sets = prior.pending_delete_chains, prior.pending_delete_sets

        new_chains = dict(old_chains)
        new_elems = dict(old_elems)
        new_sets = dict(old_sets)
        del_elems: list[Element] = []
        add_elems: list[Element] = []
        chain_lines: list[str] = []
        set_lines: list[str] = []
        map_lines: list[str] = []
        flushed_chains: set[str] = set()
        stale_sets: set[str] = set()
        rules_total = 0
        for spn in todo:
            svc = services.get(spn)
            if svc is None:
                r = RenderedService()
            else:
                cat = categorize_endpoints(svc, state.endpoints.get(spn, ()), cfg.node_name, state.node_labels)
                r = self.render_service(svc, cat)
            chains_now = frozenset(r.chains)
            elems_now = tuple(r.elements)
            sets_now = frozenset(r.sets)
            for s_name, decl in r.sets.items():
                kind = "map" if s_name in r.map_elements else "set"
                set_lines.append(f"add {kind} {T} {s_name} {decl}")
            for m_name, items in r.map_elements.items():
                if not full:
                    map_lines.append(f"flush map {T} {m_name}")
                map_lines.append(f"add element {T} {m_name} {{ {', '.join(items)} }}")
            for ch, body in r.chains.items():
                chain_lines.append(f"add chain {T} {ch}")
                if not full:
                    chain_lines.append(f"flush chain {T} {ch}")
                chain_lines += [f"add rule {T} {ch} {b}" for b in body]
                rules_total += len(body)
            old_e = old_elems.get(spn, ())
            if old_e:
                old_set, new_set = set(old_e), r.elements
                del_elems += [e for e in old_e if e not in new_set]
                add_elems += [e for e in elems_now if e not in old_set]
            else:
                add_elems += elems_now
            flushed_chains |= old_chains.get(spn, frozenset()) - chains_now
            stale_sets |= old_sets.get(spn, frozenset()) - sets_now
            if svc is None:
                new_chains.pop(spn, None)
                new_elems.pop(spn, None)
                new_sets.pop(spn, None)
            else:
                new_chains[spn], new_elems[spn], new_sets[spn] = chains_now, elems_now, sets_now

        # Keys can move between maps (e.g. endpoints appear: no-endpoint-services -> service-ips):
        # delete first, then add, in one transaction.
        for m, key, _v in del_elems:
            L.append(f"delete element {T} {m} {{ {key} }}")
        L += set_lines
        # stale chains: flush now (their map elements are gone above), delete next sync
        live_chains = set().union(*new_chains.values()) if new_chains else set()
        flushed_chains -= live_chains
        L += [f"flush chain {T} {c}" for c in sorted(flushed_chains)]
        live_sets = set().union(*new_sets.values()) if new_sets else set()
        stale_sets -= live_sets
        L += [f"flush {_set_kind(s)} {T} {s}" for s in sorted(stale_sets)]
        L += chain_lines
        L += map_lines
        L += _element_lines(add_elems)
        for ip in sorted(old_cips - cluster_ips):
            L.append(f"delete element {T} {CLUSTER_IPS} {{ {ip} }}")
        if cluster_ips - old_cips:
            L.append(f"add element {T} {CLUSTER_IPS} {{ {', '.join(sorted(cluster_ips - old_cips))} }}")
        if full and nodeport_ips:  # from flags: they change only across restarts (full syncs)
            L.append(f"add element {T} {NODEPORT_IPS} {{ {', '.join(sorted(nodeport_ips))} }}")
        # deletions that were deferred from the previous sync
        # maps first: a stale endpoint map still points at the stale chains
        L += [f"delete {_set_kind(s)} {T} {s}" for s in sorted(pend_sets - live_sets)]
        L += [f"delete chain {T} {c}" for c in sorted(pend_chains - live_chains)]
        # stale sets are unreferenced once their chains are flushed; delete them next sync too
        payload = "\n".join(L) + "\n"
        new_prior = NftPrior(
            chains=new_chains,
            elements=new_elems,
            sets=new_sets,
            cluster_ips=cluster_ips,
            nodeport_ips=nodeport_ips,
            pending_delete_chains=frozenset(flushed_chains),
            pending_delete_sets=frozenset(stale_sets),
        )
        stats = {
            "services_rendered": len(todo),
            "chains_written": sum(1 for line in chain_lines if line.startswith("add chain")),
            "rules_written": rules_total,
            "elements_added": len(add_elems),
            "elements_deleted": len(del_elems),
            "payload_bytes": len(payload),
            "chains_total": len(live_chains) + len(BASE_CHAINS) + len(FIXED_CHAINS),
        }
        return Plan(full=full, payload=payload, prior=new_prior, stats=stats)

    # ---- apply (kernel) ------------------------------------------------------------------

    @classmethod
    def check_kernel(cls) -> None:
        if not shutil.which("nft"):
            raise ModeUnavailable("nft not found: install Debian's nftables package (make setup)")
        r = subprocess.run(["nft", "list", "tables"], capture_output=True, text=True)
        if r.returncode != 0:
            raise ModeUnavailable(f"this kernel refuses nftables ({r.stderr.strip()}); use --proxy-mode iptables")

    def apply(self, plan: Plan[NftPrior]) -> NftPrior:
        r = subprocess.run(["nft", "-f", "-"], input=plan.payload, capture_output=True, text=True)
        if r.returncode != 0:
            first = r.stderr.strip().splitlines()[:3]
            raise ApplyError(f"nft -f failed ({'full' if plan.full else 'partial'} sync): {' | '.join(first)}")
        return plan.prior

    def check_drift(self) -> bool:
        r = subprocess.run(["nft", "list", "chain", FAMILY, TABLE, "services"], capture_output=True, text=True)
        return r.returncode != 0 or f"@{SERVICE_IPS}" not in r.stdout

    def cleanup(self) -> None:
        r = subprocess.run(["nft", "list", "tables", FAMILY], capture_output=True, text=True)
        if f"table {FAMILY} {TABLE}" in r.stdout:
            subprocess.run(["nft", "delete", "table", FAMILY, TABLE], capture_output=True, text=True)


MODE = NftablesMode
