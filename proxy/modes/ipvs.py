"""IPVS mode: upstream kube-proxy's IPVS proxier shape (KEP-265), programmed over netlink.

- Every ClusterIP, externalIP and LoadBalancer IP is bound to the dummy interface `kube-ipvs0`
  so the kernel takes the traffic as local and IPVS (LOCAL_IN) load-balances it; one virtual
  server per (address, port, protocol), NodePort virtual servers on the node's addresses; real
  servers with weight 1, masquerade (NAT) forwarding; `--ipvs-scheduler` (rr by default);
  sessionAffinity ClientIP = IPVS persistence with the Service's timeout (per virtual server:
  the documented divergence from the iptables/nftables modes).
- upstream's ipsets (names and types below) hold the per-Service facts; a handful of fixed
  iptables rules match them (KUBE-SERVICES, KUBE-POSTROUTING, KUBE-MARK-MASQ, KUBE-NODE-PORT,
  KUBE-LOAD-BALANCER, KUBE-FORWARD, KUBE-IPVS-FILTER ...), so the iptables payload does not grow
  with the number of Services. One `iptables-restore` and one `ipset restore` per sync.
- Virtual/real servers and addresses are diffed against what was programmed: only changes are
  sent (pyroute2's IPVS and IPRoute sockets; no ipvsadm/ip process in the sync path).
- Graceful termination: a removed TCP real server gets weight 0 and is deleted once it has no
  connections (checked at every sync); UDP/SCTP real servers go at once.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
from dataclasses import dataclass, field
from typing import Any

from proxy.iptables_restore import Iptables, IptablesError, detect_backend, parse_save
from proxy.model import ProxyState, ServicePort, categorize_endpoints
from proxy.modes.base import ApplyError, Mode, ModeUnavailable, Plan

DUMMY = "kube-ipvs0"
MASQ_FWD = 0  # IP_VS_CONN_F_MASQ (pyroute2 defaults to 3 = direct routing)
F_PERSISTENT = 0x0001  # IP_VS_SVC_F_PERSISTENT
PROTOS = {"TCP": socket.IPPROTO_TCP, "UDP": socket.IPPROTO_UDP, "SCTP": socket.IPPROTO_SCTP}
SYSCTLS = {"net/ipv4/vs/conntrack": "1", "net/ipv4/vs/expire_nodest_conn": "1",
           "net/ipv4/vs/expire_quiescent_template": "1", "net/ipv4/ip_forward": "1"}

# upstream's ipsets: name -> (type, comment)
IPSETS = {
    "KUBE-LOOP-BACK": ("hash:ip,port,ip", "Kubernetes endpoints dst ip:port, source ip for solving hairpin purpose"),
    "KUBE-CLUSTER-IP": ("hash:ip,port", "Kubernetes service cluster ip + port for masquerade purpose"),
    "KUBE-EXTERNAL-IP": ("hash:ip,port", "Kubernetes service external ip + port for masquerade and filter purpose"),
    "KUBE-EXTERNAL-IP-LOCAL": ("hash:ip,port", "Kubernetes service external ip + port with externalTrafficPolicy=local"),
    "KUBE-LOAD-BALANCER": ("hash:ip,port", "Kubernetes service lb portal"),
    "KUBE-LOAD-BALANCER-LOCAL": ("hash:ip,port", "Kubernetes service load balancer ip + port with externalTrafficPolicy=local"),
    "KUBE-LOAD-BALANCER-FW": ("hash:ip,port", "Kubernetes service load balancer ip + port for load balancer with sourceRange"),
    "KUBE-LOAD-BALANCER-SOURCE-IP": ("hash:ip,port,ip", "Kubernetes service load balancer ip + port + source IP for packet filter purpose"),
    "KUBE-LOAD-BALANCER-SOURCE-CIDR": ("hash:ip,port,net", "Kubernetes service load balancer ip + port + source cidr for packet filter purpose"),
    "KUBE-NODE-PORT-TCP": ("bitmap:port", "Kubernetes nodeport TCP port for masquerade purpose"),
    "KUBE-NODE-PORT-LOCAL-TCP": ("bitmap:port", "Kubernetes nodeport TCP port with externalTrafficPolicy=local"),
    "KUBE-NODE-PORT-UDP": ("bitmap:port", "Kubernetes nodeport UDP port for masquerade purpose"),
    "KUBE-NODE-PORT-LOCAL-UDP": ("bitmap:port", "Kubernetes nodeport UDP port with externalTrafficPolicy=local"),
    "KUBE-NODE-PORT-SCTP-HASH": ("hash:ip,port", "Kubernetes nodeport SCTP port for masquerade purpose with type 'hash ip:port'"),
    "KUBE-NODE-PORT-LOCAL-SCTP-HASH": ("hash:ip,port", "Kubernetes nodeport SCTP port with externalTrafficPolicy=local with type 'hash ip:port'"),
    "KUBE-HEALTH-CHECK-NODE-PORT": ("bitmap:port", "Kubernetes health check node port"),
    "KUBE-IPVS-IPS": ("hash:ip", "Kubernetes service IPs on kube-ipvs0"),
}

# (table, builtin chain, our chain) — ensured on full syncs, in this order at the top.
JUMPS = (
    ("nat", "PREROUTING", "KUBE-SERVICES"),
    ("nat", "OUTPUT", "KUBE-SERVICES"),
    ("nat", "POSTROUTING", "KUBE-POSTROUTING"),
    ("filter", "INPUT", "KUBE-IPVS-FILTER"),
    ("filter", "INPUT", "KUBE-PROXY-FIREWALL"),
    ("filter", "INPUT", "KUBE-NODE-PORT"),
    ("filter", "FORWARD", "KUBE-FORWARD"),
    ("filter", "FORWARD", "KUBE-PROXY-FIREWALL"),
    ("filter", "OUTPUT", "KUBE-PROXY-FIREWALL"),
)
NAT_CHAINS = ("KUBE-SERVICES", "KUBE-POSTROUTING", "KUBE-NODE-PORT", "KUBE-LOAD-BALANCER", "KUBE-MARK-MASQ")
FILTER_CHAINS = ("KUBE-FORWARD", "KUBE-NODE-PORT", "KUBE-PROXY-FIREWALL", "KUBE-SOURCE-RANGES-FIREWALL",
                 "KUBE-IPVS-FILTER")

VSKey = tuple[str, int, str]  # (address, port, protocol)
RSKey = tuple[str, int]


@dataclass(frozen=True, slots=True)
class VirtualServer:
    addr: str
    port: int
    protocol: str
    scheduler: str
    persistence: int  # seconds; 0 = none

    @property
    def key(self) -> VSKey:
        return (self.addr, self.port, self.protocol)


@dataclass(frozen=True, slots=True)
class IpvsPrior:
    addresses: frozenset[str]
    servers: dict[VSKey, VirtualServer]
    reals: dict[VSKey, frozenset[RSKey]]
    ipsets: dict[str, frozenset[str]]
    draining: frozenset[tuple[VSKey, RSKey]] = frozenset()  # weight 0, waiting for no connections


@dataclass(slots=True)
class IpvsOps:
    """Everything one sync does, in the order apply runs it."""

    full: bool
    addr_add: list[str] = field(default_factory=list)
    addr_del: list[str] = field(default_factory=list)
    vs_add: list[VirtualServer] = field(default_factory=list)
    vs_update: list[VirtualServer] = field(default_factory=list)
    vs_del: list[VSKey] = field(default_factory=list)
    rs_add: list[tuple[VSKey, RSKey]] = field(default_factory=list)
    rs_del: list[tuple[VSKey, RSKey]] = field(default_factory=list)  # delete at once
    rs_drain: list[tuple[VSKey, RSKey]] = field(default_factory=list)  # weight 0, delete when idle
    ipset: str = ""  # `ipset restore` input
    iptables: str = ""  # `iptables-restore --noflush` input


def _entry_port(proto: str, port: int) -> str:
    return f"{proto.lower()}:{port}"


class IpvsMode(Mode[IpvsPrior]):
    name = "ipvs"

    def __init__(self, config: Any, scheduler: str = "rr", backend: str = "auto") -> None:
        super().__init__(config)
        self.scheduler = scheduler
        self.iptables_backend = backend  # --iptables-backend: the glue rules' backend
        self._ipt: Iptables | None = None

    # ---- render (pure) -------------------------------------------------------------------

    def desired(self, state: ProxyState) -> tuple[dict[VSKey, VirtualServer], dict[VSKey, frozenset[RSKey]],
                                                  set[str], dict[str, set[str]]]:
        cfg = state.config
        servers: dict[VSKey, VirtualServer] = {}
        reals: dict[VSKey, frozenset[RSKey]] = {}
        addrs: set[str] = set()
        sets: dict[str, set[str]] = {name: set() for name in IPSETS}
        for spn, svc in state.services.items():
            cat = categorize_endpoints(svc, state.endpoints.get(spn, ()), cfg.node_name, state.node_labels)
            internal = cat.local if svc.internal_policy_local else cat.cluster
            external = cat.local if svc.external_policy_local else cat.cluster
            pp = _entry_port(svc.protocol, svc.port)
            for ep in {*internal, *external}:  # hairpin: a local endpoint reaching itself
                if ep.node_name == cfg.node_name:
                    sets["KUBE-LOOP-BACK"].add(f"{ep.ip},{_entry_port(svc.protocol, ep.port)},{ep.ip}")

            def vs(addr: str, port: int, eps: tuple, svc: ServicePort = svc) -> None:
                v = VirtualServer(addr, port, svc.protocol, self.scheduler, svc.affinity_timeout)
                servers[v.key] = v
                reals[v.key] = frozenset((e.ip, e.port) for e in eps)

            if svc.cluster_ip:
                vs(svc.cluster_ip, svc.port, internal)
                addrs.add(svc.cluster_ip)
                sets["KUBE-CLUSTER-IP"].add(f"{svc.cluster_ip},{pp}")
            for ip in svc.external_ips:
                vs(ip, svc.port, external)
                addrs.add(ip)
                sets["KUBE-EXTERNAL-IP-LOCAL" if svc.external_policy_local else "KUBE-EXTERNAL-IP"].add(f"{ip},{pp}")
            for ip in svc.load_balancer_ips:
                vs(ip, svc.port, external)
                addrs.add(ip)
                sets["KUBE-LOAD-BALANCER"].add(f"{ip},{pp}")
                if svc.external_policy_local:
                    sets["KUBE-LOAD-BALANCER-LOCAL"].add(f"{ip},{pp}")
                if svc.load_balancer_source_ranges:
                    sets["KUBE-LOAD-BALANCER-FW"].add(f"{ip},{pp}")
                    for cidr in svc.load_balancer_source_ranges:
                        sets["KUBE-LOAD-BALANCER-SOURCE-CIDR"].add(f"{ip},{pp},{cidr}")
            if svc.node_port:
                for ip in cfg.node_ips:
                    vs(ip, svc.node_port, external)
                proto = svc.protocol
                if proto == "SCTP":
                    name = "KUBE-NODE-PORT-LOCAL-SCTP-HASH" if svc.external_policy_local else "KUBE-NODE-PORT-SCTP-HASH"
                    for ip in cfg.node_ips:
                        sets[name].add(f"{ip},{_entry_port(proto, svc.node_port)}")
                else:
                    sets[f"KUBE-NODE-PORT-{proto}"].add(str(svc.node_port))
                    if svc.external_policy_local:
                        sets[f"KUBE-NODE-PORT-LOCAL-{proto}"].add(str(svc.node_port))
            if svc.health_check_node_port:
                sets["KUBE-HEALTH-CHECK-NODE-PORT"].add(str(svc.health_check_node_port))
        sets["KUBE-IPVS-IPS"] = set(addrs)
        return servers, reals, addrs, sets

    def iptables_payload(self) -> str:
        cfg = self.config
        mark = cfg.masq_mark
        masq_src = "" if cfg.masquerade_all or not cfg.cluster_cidr else f"! -s {cfg.cluster_cidr} "
        nat = [
            "-A KUBE-SERVICES -s 127.0.0.0/8 -j RETURN",
            f'-A KUBE-SERVICES {masq_src}-m comment --comment "Kubernetes service cluster ip + port for masquerade purpose" '
            "-m set --match-set KUBE-CLUSTER-IP dst,dst -j KUBE-MARK-MASQ",
            '-A KUBE-SERVICES -m comment --comment "Kubernetes service external ip + port for masquerade and filter purpose" '
            "-m set --match-set KUBE-EXTERNAL-IP dst,dst -j KUBE-MARK-MASQ",
            '-A KUBE-SERVICES -m comment --comment "Kubernetes service lb portal" '
            "-m set --match-set KUBE-LOAD-BALANCER dst,dst -j KUBE-LOAD-BALANCER",
            "-A KUBE-SERVICES -m addrtype --dst-type LOCAL -j KUBE-NODE-PORT",
            "-A KUBE-SERVICES -m set --match-set KUBE-CLUSTER-IP dst,dst -j ACCEPT",
            "-A KUBE-SERVICES -m set --match-set KUBE-LOAD-BALANCER dst,dst -j ACCEPT",
            "-A KUBE-NODE-PORT -p tcp -m set --match-set KUBE-NODE-PORT-LOCAL-TCP dst -j RETURN",
            "-A KUBE-NODE-PORT -p tcp -m set --match-set KUBE-NODE-PORT-TCP dst -j KUBE-MARK-MASQ",
            "-A KUBE-NODE-PORT -p udp -m set --match-set KUBE-NODE-PORT-LOCAL-UDP dst -j RETURN",
            "-A KUBE-NODE-PORT -p udp -m set --match-set KUBE-NODE-PORT-UDP dst -j KUBE-MARK-MASQ",
            "-A KUBE-NODE-PORT -p sctp -m set --match-set KUBE-NODE-PORT-LOCAL-SCTP-HASH dst,dst -j RETURN",
            "-A KUBE-NODE-PORT -p sctp -m set --match-set KUBE-NODE-PORT-SCTP-HASH dst,dst -j KUBE-MARK-MASQ",
            "-A KUBE-LOAD-BALANCER -m set --match-set KUBE-LOAD-BALANCER-LOCAL dst,dst -j RETURN",
            "-A KUBE-LOAD-BALANCER -j KUBE-MARK-MASQ",
            f"-A KUBE-MARK-MASQ -j MARK --or-mark {mark}",
            '-A KUBE-POSTROUTING -m comment --comment "Kubernetes endpoints dst ip:port, source ip for solving hairpin purpose" '
            "-m set --match-set KUBE-LOOP-BACK dst,dst,src -j MASQUERADE",
            f"-A KUBE-POSTROUTING -m mark ! --mark {mark}/{mark} -j RETURN",
            f"-A KUBE-POSTROUTING -j MARK --xor-mark {mark}",
            '-A KUBE-POSTROUTING -m comment --comment "kubernetes service traffic requiring SNAT" -j MASQUERADE --random-fully',
        ]
        filt = []
        if not cfg.tcp_be_liberal:
            filt.append("-A KUBE-FORWARD -m conntrack --ctstate INVALID -j DROP")
        filt += [
            f'-A KUBE-FORWARD -m comment --comment "kubernetes forwarding rules" -m mark --mark {mark}/{mark} -j ACCEPT',
            '-A KUBE-FORWARD -m comment --comment "kubernetes forwarding conntrack rule" '
            "-m conntrack --ctstate RELATED,ESTABLISHED -j ACCEPT",
            "-A KUBE-NODE-PORT -m set --match-set KUBE-HEALTH-CHECK-NODE-PORT dst -j ACCEPT",
            "-A KUBE-PROXY-FIREWALL -m set --match-set KUBE-LOAD-BALANCER-FW dst,dst -j KUBE-SOURCE-RANGES-FIREWALL",
            "-A KUBE-SOURCE-RANGES-FIREWALL -m set --match-set KUBE-LOAD-BALANCER-SOURCE-CIDR dst,dst,src -j RETURN",
            "-A KUBE-SOURCE-RANGES-FIREWALL -m set --match-set KUBE-LOAD-BALANCER-SOURCE-IP dst,dst,src -j RETURN",
            "-A KUBE-SOURCE-RANGES-FIREWALL -j DROP",
            "-A KUBE-IPVS-FILTER -m set --match-set KUBE-LOAD-BALANCER dst,dst -j RETURN",
            "-A KUBE-IPVS-FILTER -m set --match-set KUBE-CLUSTER-IP dst,dst -j RETURN",
            "-A KUBE-IPVS-FILTER -m set --match-set KUBE-EXTERNAL-IP dst,dst -j RETURN",
            "-A KUBE-IPVS-FILTER -m set --match-set KUBE-EXTERNAL-IP-LOCAL dst,dst -j RETURN",
            "-A KUBE-IPVS-FILTER -m set --match-set KUBE-HEALTH-CHECK-NODE-PORT dst -j RETURN",
            "-A KUBE-IPVS-FILTER -m conntrack --ctstate NEW -m set --match-set KUBE-IPVS-IPS dst -j REJECT",
        ]
        out = ["*nat", *[f":{c} - [0:0]" for c in NAT_CHAINS], *nat, "COMMIT",
               "*filter", *[f":{c} - [0:0]" for c in FILTER_CHAINS], *filt, "COMMIT"]
        return "\n".join(out) + "\n"

    def render(self, state: ProxyState, prior: IpvsPrior | None) -> Plan[IpvsPrior]:
        servers, reals, addrs, sets = self.desired(state)
        p = prior or IpvsPrior(frozenset(), {}, {}, {})
        full = state.changed is None or prior is None
        ops = IpvsOps(full=full)
        ops.addr_add = sorted(addrs - p.addresses)
        ops.addr_del = sorted(p.addresses - addrs)
        draining = set(p.draining)
        for key, v in servers.items():
            old = p.servers.get(key)
            if old is None:
                ops.vs_add.append(v)
            elif old != v:
                ops.vs_update.append(v)
            want, had = reals[key], p.reals.get(key, frozenset())
            for rs in sorted(want - had):
                ops.rs_add.append((key, rs))
                draining.discard((key, rs))
            for rs in sorted(had - want):
                if v.protocol == "TCP":
                    ops.rs_drain.append((key, rs))
                    draining.add((key, rs))
                else:
                    ops.rs_del.append((key, rs))
            for rs in sorted(want & had):
                if (key, rs) in draining:  # came back while draining: weight 1 again
                    ops.rs_add.append((key, rs))
                    draining.discard((key, rs))
        for key in sorted(p.servers.keys() - servers.keys()):
            ops.vs_del.append(key)
            draining = {d for d in draining if d[0] != key}
        # ipsets: a full sync fills fresh sets and swaps them in (atomic per set); partial
        # syncs send only the entries that changed
        lines: list[str] = []
        for i, (name, (typ, _comment)) in enumerate(IPSETS.items()):
            extra = " range 0-65535" if typ == "bitmap:port" else ""
            entries = sets[name]
            if full:
                tmp = f"KPX-TMP-{i}"
                lines.append(f"create {name} {typ}{extra} -exist")
                lines.append(f"create {tmp} {typ}{extra} -exist")
                lines.append(f"flush {tmp}")
                lines += [f"add {tmp} {e}" for e in sorted(entries)]
                lines += [f"swap {tmp} {name}", f"destroy {tmp}"]
            else:
                old_entries = p.ipsets.get(name, frozenset())
                lines += [f"del {name} {e} -exist" for e in sorted(old_entries - entries)]
                lines += [f"add {name} {e} -exist" for e in sorted(entries - old_entries)]
        ops.ipset = "\n".join(lines) + "\n" if lines else ""
        ops.iptables = self.iptables_payload() if full else ""
        new_prior = IpvsPrior(
            addresses=frozenset(addrs),
            servers=servers,
            reals={k: reals[k] | frozenset(rs for (kk, rs) in draining if kk == k) for k in servers},
            ipsets={k: frozenset(v) for k, v in sets.items()},
            draining=frozenset(draining),
        )
        stats = {
            "virtual_servers": len(servers),
            "real_servers": sum(len(v) for v in reals.values()),
            "netlink_ops": len(ops.addr_add) + len(ops.addr_del) + len(ops.vs_add) + len(ops.vs_update)
            + len(ops.vs_del) + len(ops.rs_add) + len(ops.rs_del) + len(ops.rs_drain),
            "ipset_lines": ops.ipset.count("\n"),
            "payload_bytes": len(ops.ipset) + len(ops.iptables),
        }
        return Plan(full=full, payload=ops, prior=new_prior, stats=stats)

    # ---- apply (kernel) ------------------------------------------------------------------

    @classmethod
    def check_kernel(cls) -> None:
        if not os.path.isdir("/proc/sys/net/ipv4/vs"):
            raise ModeUnavailable(
                "this kernel has no IPVS (CONFIG_IP_VS is not set); run the IPVS mode in the VM that "
                "boots Debian's kernel: `make test-vm` (or `kpx vm -- CMD`)"
            )
        for tool in ("ipset", "iptables-nft-restore"):
            if not shutil.which(tool):
                raise ModeUnavailable(f"{tool} not found: install Debian's ipset and iptables packages (make setup)")

    def _iptables(self) -> Iptables:
        if self._ipt is None:
            backend = detect_backend() if self.iptables_backend == "auto" else self.iptables_backend
            self._ipt = Iptables(backend)
        return self._ipt

    def _ensure_dummy(self, ipr: Any) -> int:
        idx = ipr.link_lookup(ifname=DUMMY)
        if not idx:
            ipr.link("add", ifname=DUMMY, kind="dummy")
            idx = ipr.link_lookup(ifname=DUMMY)
        return int(idx[0])

    def apply(self, plan: Plan[IpvsPrior]) -> IpvsPrior:
        from pyroute2 import IPVS, IPRoute, IPVSDest, IPVSService
        from pyroute2.netlink.exceptions import NetlinkError

        ops: IpvsOps = plan.payload
        try:
            if ops.full:
                for sysctl, value in SYSCTLS.items():
                    with open(f"/proc/sys/{sysctl}", "w") as f:
                        f.write(value)
            if ops.ipset:
                r = subprocess.run(["ipset", "restore"], input=ops.ipset, capture_output=True, text=True)
                if r.returncode != 0:
                    raise ApplyError(f"ipset restore failed: {r.stderr.strip()}")
            if ops.iptables:
                ipt = self._iptables()
                ipt.restore(ops.iptables)
                self._ensure_jumps(ipt)
            with IPRoute() as ipr:
                idx = self._ensure_dummy(ipr)
                for a in ops.addr_add:
                    try:
                        ipr.addr("add", index=idx, address=a, prefixlen=32)
                    except NetlinkError as e:
                        if e.code != 17:  # EEXIST
                            raise
                for a in ops.addr_del:
                    try:
                        ipr.addr("del", index=idx, address=a, prefixlen=32)
                    except NetlinkError as e:
                        if e.code != 99:  # EADDRNOTAVAIL
                            raise
            with IPVS() as ipvs:

                def svc_of(key: VSKey, v: VirtualServer | None = None) -> Any:
                    spec: dict[str, Any] = {"addr": key[0], "port": key[1], "protocol": PROTOS[key[2]]}
                    if v is not None:
                        spec["sched_name"] = v.scheduler
                        if v.persistence:
                            spec["flags"] = {"flags": F_PERSISTENT, "mask": 0xFFFF}
                            spec["timeout"] = v.persistence
                    return IPVSService(**spec)

                def nl(fn: Any, *args: Any, ok: tuple[int, ...] = ()) -> None:
                    try:
                        fn(*args)
                    except NetlinkError as e:
                        if e.code not in ok:
                            raise

                for v in ops.vs_add:
                    nl(ipvs.service, "add", svc_of(v.key, v), ok=(17,))
                for v in ops.vs_update:
                    nl(ipvs.service, "set", svc_of(v.key, v))
                for key, (ip, port) in ops.rs_del:
                    nl(ipvs.dest, "del", svc_of(key), IPVSDest(addr=ip, port=port), ok=(2, 3))
                for key, (ip, port) in ops.rs_drain:
                    nl(ipvs.dest, "set", svc_of(key), IPVSDest(addr=ip, port=port, weight=0, fwd_method=MASQ_FWD),
                       ok=(2, 3))
                for key, (ip, port) in ops.rs_add:
                    dest = IPVSDest(addr=ip, port=port, weight=1, fwd_method=MASQ_FWD)
                    try:
                        ipvs.dest("add", svc_of(key), dest)
                    except NetlinkError as e:
                        if e.code != 17:
                            raise
                        ipvs.dest("set", svc_of(key), dest)  # was draining: weight 1 again
                for key in ops.vs_del:
                    nl(ipvs.service, "del", svc_of(key), ok=(2, 3))
                prior = self._reap_drained(ipvs, plan.prior, svc_of)
        except (OSError, NetlinkError, IptablesError) as e:
            raise ApplyError(f"ipvs sync failed: {e}") from e
        return prior

    def _reap_drained(self, ipvs: Any, prior: IpvsPrior, svc_of: Any) -> IpvsPrior:
        """Delete draining real servers that have no connections left."""
        if not prior.draining:
            return prior
        from pyroute2 import IPVSDest

        done = set()
        by_vs: dict[VSKey, set[RSKey]] = {}
        for key, rs in prior.draining:
            by_vs.setdefault(key, set()).add(rs)
        for key, rss in by_vs.items():
            for msg in ipvs.dest("dump", svc_of(key)):
                d = IPVSDest.from_message(msg)
                attrs = dict(msg.get("IPVS_CMD_ATTR_DEST")["attrs"])
                rs = (d["addr"], d["port"])
                if rs in rss and attrs.get("IPVS_DEST_ATTR_ACTIVE_CONNS", 0) + attrs.get("IPVS_DEST_ATTR_INACT_CONNS", 0) == 0:
                    ipvs.dest("del", svc_of(key), IPVSDest(addr=rs[0], port=rs[1]))
                    done.add((key, rs))
        if not done:
            return prior
        reals = {k: v - frozenset(rs for (kk, rs) in done if kk == k) for k, v in prior.reals.items()}
        return IpvsPrior(prior.addresses, prior.servers, reals, prior.ipsets, prior.draining - done)

    def _ensure_jumps(self, ipt: Iptables) -> None:
        saved = parse_save(ipt.save())
        lines: dict[str, list[str]] = {}
        for table, src, dst in JUMPS:
            if not saved.has_jump(table, src, dst):
                lines.setdefault(table, []).append(
                    f'-I {src} -m comment --comment "kubernetes service portals" -j {dst}')
        if lines:
            ipt.restore("".join(f"*{t}\n" + "\n".join(ls) + "\nCOMMIT\n" for t, ls in lines.items()))

    def check_drift(self) -> bool:
        try:
            return not self._iptables().chain_exists("nat", "KUBE-SERVICES")
        except IptablesError:
            return True

    def cleanup(self) -> None:
        from pyroute2 import IPRoute

        if os.path.isdir("/proc/sys/net/ipv4/vs"):
            subprocess.run(["ipvsadm", "-C"], capture_output=True)  # cleanup only, not the sync path
        with IPRoute() as ipr:
            idx = ipr.link_lookup(ifname=DUMMY)
            if idx:
                ipr.link("del", index=idx[0])
        for backend in ("nft", "legacy"):
            ipt = Iptables(backend)
            try:
                saved = parse_save(ipt.save())
            except IptablesError:
                continue
            script = []
            for table, src, dst in JUMPS:
                if saved.has_jump(table, src, dst):
                    script.append((table, f'-D {src} -m comment --comment "kubernetes service portals" -j {dst}'))
            out = ""
            for table, chains in (("nat", NAT_CHAINS), ("filter", FILTER_CHAINS)):
                body = [s for t, s in script if t == table]
                present = [c for c in chains if c in saved.chains.get(table, [])]
                body += [f"-F {c}" for c in present] + [f"-X {c}" for c in present]
                if body:
                    out += f"*{table}\n" + "\n".join(body) + "\nCOMMIT\n"
            if out:
                try:
                    ipt.restore(out)
                except IptablesError:
                    pass
        subprocess.run(["bash", "-c", "for s in $(ipset list -n 2>/dev/null | grep '^KUBE-'); do ipset destroy $s; done"],
                       capture_output=True)


MODE = IpvsMode
