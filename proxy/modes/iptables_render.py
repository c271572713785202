"""Pure render for the iptables mode: `ProxyState` -> one `iptables-restore` payload.

The layout, chain names, hashes, comments and rule order follow upstream's
pkg/proxy/iptables/proxier.go (`syncProxyRules`, `writeServiceToEndpointRules`), so that
`iptables-save` on a kpx node reads like one programmed by kube-proxy.

Speed: every Service port renders into a `_Block` (lists of finished lines per chain) that is
cached per ServicePortName together with the inputs it came from. A partial sync re-renders
only `state.changed` and re-joins the cached top-level lines (KUBE-SERVICES, KUBE-NODEPORTS and
the filter chains, which are rewritten on every sync); a full sync re-renders a port only if
its ServicePort or endpoints differ from the cached ones. Chain names and probability strings
are cached too (upstream caches probabilities for the same reason: they show up in profiles).
"""

from __future__ import annotations

import gc
import ipaddress
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from proxy.model import (
    Endpoint,
    ProxyConfig,
    ProxyState,
    ServicePort,
    ServicePortName,
    categorize_endpoints,
    endpoint_hash,
    port_proto_hash,
)
from proxy.modes.base import Plan

# Fixed chains (upstream names).
KUBE_SERVICES = "KUBE-SERVICES"
KUBE_EXTERNAL_SERVICES = "KUBE-EXTERNAL-SERVICES"
KUBE_NODEPORTS = "KUBE-NODEPORTS"
KUBE_FORWARD = "KUBE-FORWARD"
KUBE_PROXY_FIREWALL = "KUBE-PROXY-FIREWALL"
KUBE_POSTROUTING = "KUBE-POSTROUTING"
KUBE_MARK_MASQ = "KUBE-MARK-MASQ"
KUBE_PROXY_CANARY = "KUBE-PROXY-CANARY"
KUBE_FIREWALL = "KUBE-FIREWALL"  # kubelet's chain, duplicated by kube-proxy for localhost NodePorts

FILTER_CHAINS = (KUBE_SERVICES, KUBE_EXTERNAL_SERVICES, KUBE_FORWARD, KUBE_NODEPORTS, KUBE_PROXY_FIREWALL)
NAT_CHAINS = (KUBE_SERVICES, KUBE_NODEPORTS, KUBE_POSTROUTING, KUBE_MARK_MASQ)
SERVICE_CHAIN_PREFIXES = ("KUBE-SVC-", "KUBE-SVL-", "KUBE-EXT-", "KUBE-FW-", "KUBE-SEP-")
LARGE_CLUSTER_ENDPOINTS_THRESHOLD = 1000


@dataclass(frozen=True, slots=True)
class JumpChain:
    """A jump from a builtin chain into one of ours (upstream's iptablesJumpChains)."""

    table: str
    target: str
    source: str
    comment: str
    extra: tuple[str, ...] = ()

    def rule(self) -> str:
        """The rule as an `-I` line (upstream prepends: EnsureRule(Prepend, ...))."""
        parts = [f"-I {self.source}", *self.extra]
        if self.comment:
            parts.append(f'-m comment --comment "{self.comment}"')
        parts.append(f"-j {self.target}")
        return " ".join(parts)


_NEW = ("-m", "conntrack", "--ctstate", "NEW")
JUMP_CHAINS: tuple[JumpChain, ...] = (
    JumpChain("filter", KUBE_EXTERNAL_SERVICES, "INPUT", "kubernetes externally-visible service portals", _NEW),
    JumpChain("filter", KUBE_EXTERNAL_SERVICES, "FORWARD", "kubernetes externally-visible service portals", _NEW),
    JumpChain("filter", KUBE_NODEPORTS, "INPUT", "kubernetes health check service ports"),
    JumpChain("filter", KUBE_SERVICES, "FORWARD", "kubernetes service portals", _NEW),
    JumpChain("filter", KUBE_SERVICES, "OUTPUT", "kubernetes service portals", _NEW),
    JumpChain("filter", KUBE_FORWARD, "FORWARD", "kubernetes forwarding rules"),
    JumpChain("filter", KUBE_PROXY_FIREWALL, "INPUT", "kubernetes load balancer firewall", _NEW),
    JumpChain("filter", KUBE_PROXY_FIREWALL, "OUTPUT", "kubernetes load balancer firewall", _NEW),
    JumpChain("filter", KUBE_PROXY_FIREWALL, "FORWARD", "kubernetes load balancer firewall", _NEW),
    JumpChain("nat", KUBE_SERVICES, "OUTPUT", "kubernetes service portals"),
    JumpChain("nat", KUBE_SERVICES, "PREROUTING", "kubernetes service portals"),
    JumpChain("nat", KUBE_POSTROUTING, "POSTROUTING", "kubernetes postrouting rules"),
)
# only with localhost NodePorts (upstream's iptablesKubeletJumpChains: no comment)
FIREWALL_JUMP_CHAINS: tuple[JumpChain, ...] = (
    JumpChain("filter", KUBE_FIREWALL, "INPUT", ""),
    JumpChain("filter", KUBE_FIREWALL, "OUTPUT", ""),
)


def jump_chains(config: ProxyConfig) -> tuple[JumpChain, ...]:
    return JUMP_CHAINS + (FIREWALL_JUMP_CHAINS if config.localhost_nodeports else ())


def is_service_chain(name: str) -> bool:
    """Upstream's isServiceChainName: the per-service chains that stale-chain cleanup may delete."""
    return name.startswith(SERVICE_CHAIN_PREFIXES)


def chain_line(chain: str) -> str:
    return f":{chain} - [0:0]"


@dataclass(frozen=True, slots=True)
class IptablesPrior:
    """What the last successful apply programmed: the per-service nat chains of each port."""

    chains: Mapping[ServicePortName, frozenset[str]]


@dataclass(slots=True)
class RestorePayload:
    """One `iptables-restore --noflush --counters` input, kept per table so that apply can add
    what only the kernel knows (stale chains left by an earlier run, missing jump rules)."""

    # table -> (chain declaration lines, rule lines); each is newline-terminated text or "".
    tables: dict[str, tuple[str, str]]

    def text(self, extra: Mapping[str, tuple[Sequence[str], Sequence[str]]] | None = None) -> str:
        """The restore input; `extra[table] = (chain lines, rule lines)` are added to a table
        (after its own rules, so `-X` lines come after the rules that dropped the references)."""
        out: list[str] = []
        names = list(self.tables)
        for t in extra or ():
            if t not in self.tables:
                names.append(t)
        for table in names:
            chains, rules = self.tables.get(table, ("", ""))
            out.append(f"*{table}\n")
            out.append(chains)
            more = (extra or {}).get(table)
            if more and more[0]:
                out.append("\n".join(more[0]) + "\n")
            out.append(rules)
            if more and more[1]:
                out.append("\n".join(more[1]) + "\n")
            out.append("COMMIT\n")
        return "".join(out)


@dataclass(slots=True)
class _Block:
    """The rendered lines of one Service port."""

    svc: ServicePort
    eps: tuple[Endpoint, ...]
    comments: bool
    nat_services: list[str] = field(default_factory=list)
    nat_nodeports: list[str] = field(default_factory=list)
    filter_services: list[str] = field(default_factory=list)
    filter_external: list[str] = field(default_factory=list)
    filter_nodeports: list[str] = field(default_factory=list)
    filter_firewall: list[str] = field(default_factory=list)
    nat_chain_lines: list[str] = field(default_factory=list)
    nat_rules: list[str] = field(default_factory=list)
    chains: frozenset[str] = frozenset()
    no_local_internal: bool = False
    no_local_external: bool = False


class IptablesRenderer:
    """Renders `ProxyState` into a `Plan[IptablesPrior]`. Holds caches only (same inputs -> same
    output), so one instance per mode is enough; a different ProxyConfig drops the caches."""

    def __init__(
        self,
        config: ProxyConfig,
        *,
        random_fully: bool = True,
        large_cluster_threshold: int = LARGE_CLUSTER_ENDPOINTS_THRESHOLD,
    ) -> None:
        self.config = config
        self.random_fully = random_fully
        self.large_cluster_threshold = large_cluster_threshold
        self._blocks: dict[ServicePortName, _Block] = {}
        self._names: dict[ServicePortName, tuple[str, str, str, str]] = {}
        self._sep_names: dict[tuple[ServicePortName, str], str] = {}
        self._probabilities: dict[int, str] = {}
        self._rendered_once = False
        self._labels: dict[str, str] = {}
        self._init_config(config)

    def _init_config(self, config: ProxyConfig) -> None:
        self.config = config
        self._blocks.clear()
        mark = config.masq_mark
        self._mark = mark
        cidr = config.cluster_cidr
        self._if_local = f"-s {cidr}" if cidr else ""
        self._if_not_local = f"! -s {cidr}" if cidr else ""
        self._node_nets = [ipaddress.ip_address(ip) for ip in config.node_ips]

    # -- caches ---------------------------------------------------------------------------

    def chain_names(self, spn: ServicePortName) -> tuple[str, str, str, str]:
        """(KUBE-SVC-, KUBE-SVL-, KUBE-EXT-, KUBE-FW-) names of a Service port."""
        names = self._names.get(spn)
        if names is None:
            h = port_proto_hash(spn)
            names = (f"KUBE-SVC-{h}", f"KUBE-SVL-{h}", f"KUBE-EXT-{h}", f"KUBE-FW-{h}")
            self._names[spn] = names
        return names

    def sep_name(self, spn: ServicePortName, addr: str) -> str:
        key = (spn, addr)
        name = self._sep_names.get(key)
        if name is None:
            name = "KUBE-SEP-" + endpoint_hash(spn, addr)
            self._sep_names[key] = name
        return name

    def _sep_names_of(self, spn: ServicePortName, eps: tuple[Endpoint, ...]) -> dict[str, str]:
        """addr -> KUBE-SEP- name for one port (one cache probe per endpoint per render)."""
        cache = self._sep_names
        out: dict[str, str] = {}
        for e in eps:
            addr = e.addr
            if addr in out:
                continue
            key = (spn, addr)
            name = cache.get(key)
            if name is None:
                name = cache[key] = "KUBE-SEP-" + endpoint_hash(spn, addr)
            out[addr] = name
        return out

    def probability(self, n: int) -> str:
        p = self._probabilities.get(n)
        if p is None:
            p = "%0.10f" % (1.0 / n)
            self._probabilities[n] = p
        return p

    # -- render ---------------------------------------------------------------------------

    def render(self, state: ProxyState, prior: IptablesPrior | None) -> Plan[IptablesPrior]:
        # Rendering allocates ~10^5..10^6 lists/strings; the cyclic GC would walk the whole heap
        # (the state's own objects included) several times on the way: ~15% of a 10k render.
        enabled = gc.isenabled()
        gc.disable()
        try:
            return self._render(state, prior)
        finally:
            if enabled:
                gc.enable()

    def _render(self, state: ProxyState, prior: IptablesPrior | None) -> Plan[IptablesPrior]:
        config_changed = state.config != self.config
        labels = dict(state.node_labels or {})
        if labels != self._labels:  # topology (zone) moves endpoints of every port: like a new config
            config_changed = True
            self._labels = labels
            self._blocks.clear()
        if state.config != self.config:
            self._init_config(state.config)
        services = state.services
        endpoints = state.endpoints
        # a new config (node IPs, masquerade settings...) changes every port's chains: full sync
        full = state.changed is None or prior is None or (config_changed and bool(self._rendered_once))
        self._rendered_once = True
        changed: frozenset[ServicePortName] = state.changed or frozenset()

        total_eps = 0
        for spn in services:
            total_eps += len(endpoints.get(spn, ()))
        large = total_eps > self.large_cluster_threshold
        comments = not large

        blocks = self._blocks
        new_blocks: dict[ServicePortName, _Block] = {}
        order = sorted(services)
        rendered = 0
        for spn in order:
            svc = services[spn]
            eps = tuple(endpoints.get(spn, ()))
            b = blocks.get(spn)
            if b is not None and b.comments == comments:
                if not full and spn not in changed:
                    new_blocks[spn] = b
                    continue
                if (b.svc is svc or b.svc == svc) and (b.eps is eps or b.eps == eps):
                    new_blocks[spn] = b
                    continue
            b = self._render_port(svc, eps, comments)
            rendered += 1
            new_blocks[spn] = b
        self._blocks = new_blocks

        return self._assemble(state, prior, order, new_blocks, full, changed, large, rendered)

    def _assemble(
        self,
        state: ProxyState,
        prior: IptablesPrior | None,
        order: list[ServicePortName],
        blocks: dict[ServicePortName, _Block],
        full: bool,
        changed: frozenset[ServicePortName],
        large: bool,
        rendered: int,
    ) -> Plan[IptablesPrior]:
        cfg = self.config
        mark = self._mark
        f_services: list[str] = []
        f_external: list[str] = []
        f_nodeports: list[str] = []
        f_firewall: list[str] = []
        n_services: list[str] = []
        n_nodeports: list[str] = []
        n_chain_lines: list[str] = [chain_line(c) for c in NAT_CHAINS]
        n_rules: list[str] = [
            f"-A {KUBE_POSTROUTING} -m mark ! --mark {mark}/{mark} -j RETURN",
            f"-A {KUBE_POSTROUTING} -j MARK --xor-mark {mark}",
            f'-A {KUBE_POSTROUTING} -m comment --comment "kubernetes service traffic requiring SNAT" -j MASQUERADE'
            + (" --random-fully" if self.random_fully else ""),
            f"-A {KUBE_MARK_MASQ} -j MARK --or-mark {mark}",
        ]
        chains_written = chains_skipped = 0
        nat_rules_skipped = 0
        no_local_int = no_local_ext = 0
        new_chains: dict[ServicePortName, frozenset[str]] = {}
        for spn in order:
            b = blocks[spn]
            f_services += b.filter_services
            f_external += b.filter_external
            f_nodeports += b.filter_nodeports
            f_firewall += b.filter_firewall
            n_services += b.nat_services
            n_nodeports += b.nat_nodeports
            no_local_int += b.no_local_internal
            no_local_ext += b.no_local_external
            new_chains[spn] = b.chains
            if full or spn in changed:
                n_chain_lines += b.nat_chain_lines
                n_rules += b.nat_rules
                chains_written += len(b.nat_chain_lines)
            else:
                chains_skipped += len(b.nat_chain_lines)
                nat_rules_skipped += len(b.nat_rules)

        # Tail of KUBE-SERVICES: NodePorts on node addresses.
        tail = '-A KUBE-SERVICES -m comment --comment "kubernetes service nodeports; NOTE: this must be the last rule in this chain"'
        if not cfg.nodeport_addresses:
            # without localhost NodePorts (route_localnet), 127.0.0.0/8 must not match
            local = "" if cfg.localhost_nodeports else " ! -d 127.0.0.0/8"
            n_services.append(f"{tail} -m addrtype --dst-type LOCAL{local} -j {KUBE_NODEPORTS}")
        else:
            for ip in nodeport_ips(cfg):
                n_services.append(f"{tail} -d {ip} -j {KUBE_NODEPORTS}")

        # Stale per-service chains we know about (the kernel sweep on full syncs is apply's job).
        stale: set[str] = set()
        if prior is not None:
            if full:
                active: set[str] = set()
                for c in new_chains.values():
                    active |= c
                for c in prior.chains.values():
                    stale |= c - active
            else:
                active_changed: set[str] = set()
                for spn in changed:
                    active_changed |= new_chains.get(spn, frozenset())
                for spn in changed:
                    old = prior.chains.get(spn)
                    if old:
                        stale |= old - active_changed
                # ports that vanished without being reported as changed
                for spn, old in prior.chains.items():
                    if spn not in new_chains and spn not in changed:
                        stale |= old
                if stale:
                    # a chain can move between ports only by hash collision; never delete an active one
                    active_all: set[str] = set()
                    for c in new_chains.values():
                        active_all |= c
                    stale -= active_all
        stale_sorted = sorted(stale)
        for name in stale_sorted:
            n_chain_lines.append(chain_line(name))

        f_rules: list[str] = []
        if cfg.localhost_nodeports:
            # CVE-2020-8558: with route_localnet, drop martian packets to 127/8 from outside
            f_rules.append(
                f'-A {KUBE_FIREWALL} -m comment --comment "block incoming localnet connections" '
                "-d 127.0.0.0/8 ! -s 127.0.0.0/8 -m conntrack ! --ctstate RELATED,ESTABLISHED,DNAT -j DROP"
            )
        if not (cfg.tcp_be_liberal):
            f_rules.append(f"-A {KUBE_FORWARD} -m conntrack --ctstate INVALID -j DROP")
        f_rules.append(
            f'-A {KUBE_FORWARD} -m comment --comment "kubernetes forwarding rules" -m mark --mark {mark}/{mark} -j ACCEPT'
        )
        f_rules.append(
            f'-A {KUBE_FORWARD} -m comment --comment "kubernetes forwarding conntrack rule" '
            "-m conntrack --ctstate RELATED,ESTABLISHED -j ACCEPT"
        )
        f_rules += f_services
        f_rules += f_external
        f_rules += f_nodeports
        f_rules += f_firewall
        f_chain_lines = [chain_line(c) for c in FILTER_CHAINS]
        if cfg.localhost_nodeports:
            f_chain_lines.append(chain_line(KUBE_FIREWALL))
        nat_all_rules = n_services + n_nodeports + n_rules
        x_lines = [f"-X {c}" for c in stale_sorted]

        if full:
            f_chain_lines.append(chain_line(KUBE_PROXY_CANARY))
            n_chain_lines.append(chain_line(KUBE_PROXY_CANARY))
        tables: dict[str, tuple[str, str]] = {
            "filter": (_text(f_chain_lines), _text(f_rules)),
            "nat": (_text(n_chain_lines), _text(nat_all_rules + x_lines)),
        }
        if full:
            tables["mangle"] = (chain_line(KUBE_PROXY_CANARY) + "\n", "")
        payload = RestorePayload(tables)
        payload_bytes = sum(len(a) + len(b) + len(t) + 9 for t, (a, b) in tables.items())
        # Rules the kernel holds after this sync (skipped chains keep their rules).
        rules_nat = len(nat_all_rules) + nat_rules_skipped
        stats = {
            "rules_filter": len(f_rules),
            "rules_nat": rules_nat,
            "rules_nat_written": len(nat_all_rules),
            "chains_written": chains_written,
            "chains_skipped": chains_skipped,
            "chains_deleted": len(stale_sorted),
            "services_rendered": rendered,
            "service_ports": len(order),
            "payload_bytes": payload_bytes,
            "no_local_endpoints_internal": no_local_int,
            "no_local_endpoints_external": no_local_ext,
            "large_cluster_mode": int(large),
        }
        return Plan(full=full, payload=payload, prior=IptablesPrior(new_chains), stats=stats)

    def _render_port(self, svc: ServicePort, eps: tuple[Endpoint, ...], comments: bool) -> _Block:
        """One Service port, as upstream's loop body in syncProxyRules."""
        b = _Block(svc=svc, eps=eps, comments=comments)
        cfg = self.config
        spn = svc.name
        name = str(spn)
        proto = svc.protocol_lower
        pm = f"-m {proto} -p {proto}"
        svc_chain, svl_chain, ext_chain, fw_chain = self.chain_names(spn)
        cat = categorize_endpoints(svc, eps, cfg.node_name, self._labels)
        cluster_eps, local_eps = cat.cluster, cat.local
        has_endpoints = cat.has_any  # upstream's hasAnyEndpoints: a usable endpoint anywhere

        external = svc.has_external
        ext_local = external and svc.external_policy_local
        uses_cluster_chain = bool(cluster_eps) and (not svc.internal_policy_local or external)
        uses_local_chain = bool(local_eps) and (svc.internal_policy_local or ext_local)

        internal_chain = svc_chain
        has_internal = has_endpoints
        if svc.internal_policy_local:
            internal_chain = svl_chain
            if not local_eps:
                has_internal = False
        external_policy_chain = svc_chain
        has_external_eps = has_endpoints
        if ext_local:
            external_policy_chain = svl_chain
            if not local_eps:
                has_external_eps = False
        uses_ext_chain = has_endpoints and external
        lb_chain = ext_chain
        uses_fw = has_endpoints and bool(svc.load_balancer_ips) and bool(svc.load_balancer_source_ranges)
        if uses_fw:
            lb_chain = fw_chain

        int_target = ext_target = int_comment = ext_comment = ""
        if not has_endpoints:
            int_target = ext_target = "REJECT"
            int_comment = ext_comment = f'"{name} has no endpoints"'
        else:
            if not has_internal:
                int_target = "DROP"
                int_comment = f'"{name} has no local endpoints"'
                b.no_local_internal = True
            if not has_external_eps:
                ext_target = "DROP"
                ext_comment = f'"{name} has no local endpoints"'
                b.no_local_external = True

        port = svc.port
        cip = svc.cluster_ip
        # Capture the clusterIP.
        if cip:
            if has_internal:
                b.nat_services.append(
                    f'-A KUBE-SERVICES -m comment --comment "{name} cluster IP" {pm} -d {cip} --dport {port} -j {internal_chain}'
                )
            else:
                b.filter_services.append(
                    f"-A KUBE-SERVICES -m comment --comment {int_comment} {pm} -d {cip} --dport {port} -j {int_target}"
                )
        # Capture externalIPs.
        for eip in svc.external_ips:
            if has_endpoints:
                b.nat_services.append(
                    f'-A KUBE-SERVICES -m comment --comment "{name} external IP" {pm} -d {eip} --dport {port} -j {ext_chain}'
                )
            if not has_external_eps:
                b.filter_external.append(
                    f"-A KUBE-EXTERNAL-SERVICES -m comment --comment {ext_comment} {pm} -d {eip} --dport {port} -j {ext_target}"
                )
        # Capture load-balancer ingress.
        for lbip in svc.load_balancer_ips:
            if has_endpoints:
                b.nat_services.append(
                    f'-A KUBE-SERVICES -m comment --comment "{name} loadbalancer IP" {pm} -d {lbip} --dport {port} -j {lb_chain}'
                )
            if uses_fw:
                b.filter_firewall.append(
                    f'-A KUBE-PROXY-FIREWALL -m comment --comment "{name} traffic not accepted by {fw_chain}" '
                    f"{pm} -d {lbip} --dport {port} -j DROP"
                )
        if not has_external_eps:
            for lbip in svc.load_balancer_ips:
                b.filter_external.append(
                    f"-A KUBE-EXTERNAL-SERVICES -m comment --comment {ext_comment} {pm} -d {lbip} --dport {port} -j {ext_target}"
                )
        # Capture nodeports.
        if svc.node_port:
            if has_endpoints:
                b.nat_nodeports.append(
                    f"-A KUBE-NODEPORTS -m comment --comment {name} {pm} --dport {svc.node_port} -j {ext_chain}"
                )
            if not has_external_eps:
                b.filter_external.append(
                    f"-A KUBE-EXTERNAL-SERVICES -m comment --comment {ext_comment} -m addrtype --dst-type LOCAL "
                    f"{pm} --dport {svc.node_port} -j {ext_target}"
                )
        # Capture healthCheckNodePorts.
        if svc.health_check_node_port:
            b.filter_nodeports.append(
                f'-A KUBE-NODEPORTS -m comment --comment "{name} health check node port" -m tcp -p tcp '
                f"--dport {svc.health_check_node_port} -j ACCEPT"
            )

        chains: list[str] = []
        cl = b.nat_chain_lines
        rules = b.nat_rules
        # Internal traffic: masquerade off-cluster clients of the ClusterIP.
        if has_internal and cip:
            args = f'-A {internal_chain} -m comment --comment "{name} cluster IP" {pm} -d {cip} --dport {port}'
            if cfg.masquerade_all:
                rules.append(f"{args} -j KUBE-MARK-MASQ")
            elif self._if_not_local:
                rules.append(f"{args} {self._if_not_local} -j KUBE-MARK-MASQ")
        # External traffic handling.
        if uses_ext_chain:
            cl.append(chain_line(ext_chain))
            chains.append(ext_chain)
            if not ext_local:
                rules.append(
                    f'-A {ext_chain} -m comment --comment "masquerade traffic for {name} external destinations" -j KUBE-MARK-MASQ'
                )
            else:
                if self._if_local:
                    rules.append(
                        f'-A {ext_chain} -m comment --comment "pod traffic for {name} external destinations" '
                        f"{self._if_local} -j {svc_chain}"
                    )
                rules.append(
                    f'-A {ext_chain} -m comment --comment "masquerade LOCAL traffic for {name} external destinations" '
                    "-m addrtype --src-type LOCAL -j KUBE-MARK-MASQ"
                )
                rules.append(
                    f'-A {ext_chain} -m comment --comment "route LOCAL traffic for {name} external destinations" '
                    f"-m addrtype --src-type LOCAL -j {svc_chain}"
                )
            if has_external_eps:
                rules.append(f"-A {ext_chain} -j {external_policy_chain}")
        # Firewall chain for loadBalancerSourceRanges.
        if uses_fw:
            cl.append(chain_line(fw_chain))
            chains.append(fw_chain)
            args = f'-A {fw_chain} -m comment --comment "{name} loadbalancer IP"'
            allow_from_node = False
            for cidr in svc.load_balancer_source_ranges:
                rules.append(f"{args} -s {cidr} -j {ext_chain}")
                if not allow_from_node:
                    net = ipaddress.ip_network(cidr, strict=False)
                    allow_from_node = any(ip in net for ip in self._node_nets if ip.version == net.version)
            if allow_from_node:
                for lbip in svc.load_balancer_ips:
                    rules.append(f"{args} -s {lbip} -j {ext_chain}")
        seps = self._sep_names_of(spn, cat.all_reachable)
        if uses_cluster_chain:
            cl.append(chain_line(svc_chain))
            chains.append(svc_chain)
            self._write_endpoint_rules(rules, name, svc, svc_chain, cluster_eps, comments, seps)
        if uses_local_chain:
            cl.append(chain_line(svl_chain))
            chains.append(svl_chain)
            self._write_endpoint_rules(rules, name, svc, svl_chain, local_eps, comments, seps)
        # Per-endpoint chains.
        affinity = svc.affinity_timeout > 0
        seen: set[str] = set()
        for ep in cat.all_reachable:
            addr = ep.addr
            if addr in seen:
                continue
            seen.add(addr)
            sep = seps[addr]
            cl.append(f":{sep} - [0:0]")
            chains.append(sep)
            head = f"-A {sep} -m comment --comment {name}" if comments else f"-A {sep}"
            rules.append(f"{head} -s {ep.ip} -j KUBE-MARK-MASQ")
            if affinity:
                rules.append(f"{head} -m recent --name {sep} --set {pm} -j DNAT --to-destination {addr}")
            else:
                rules.append(f"{head} {pm} -j DNAT --to-destination {addr}")
        b.chains = frozenset(chains)
        return b

    def _write_endpoint_rules(
        self,
        rules: list[str],
        name: str,
        svc: ServicePort,
        chain: str,
        eps: tuple[Endpoint, ...],
        comments: bool,
        seps: dict[str, str],
    ) -> None:
        """Upstream's writeServiceToEndpointRules: affinity checks, then the statistic ladder."""
        if svc.affinity_timeout > 0:
            t = svc.affinity_timeout
            for ep in eps:
                addr = ep.addr
                sep = seps[addr]
                c = f' -m comment --comment "{name} -> {addr}"' if comments else ""
                rules.append(f"-A {chain}{c} -m recent --name {sep} --rcheck --seconds {t} --reap -j {sep}")
        n = len(eps)
        last = n - 1
        prob = self.probability
        for i, ep in enumerate(eps):
            addr = ep.addr
            sep = seps[addr]
            c = f' -m comment --comment "{name} -> {addr}"' if comments else ""
            if i < last:
                rules.append(f"-A {chain}{c} -m statistic --mode random --probability {prob(n - i)} -j {sep}")
            else:
                rules.append(f"-A {chain}{c} -j {sep}")


def nodeport_ips(cfg: ProxyConfig) -> list[str]:
    """Node IPs inside --nodeport-addresses (loopback only with localhost NodePorts, as upstream)."""
    nets = [ipaddress.ip_network(c, strict=False) for c in cfg.nodeport_addresses]
    out = []
    for ip in cfg.node_ips:
        a = ipaddress.ip_address(ip)
        if a.is_loopback and not cfg.localhost_nodeports:
            continue
        if any(a.version == n.version and a in n for n in nets):
            out.append(ip)
    return out


def _text(lines: list[str]) -> str:
    return "\n".join(lines) + "\n" if lines else ""
