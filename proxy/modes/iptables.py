"""iptables mode: upstream's layout programmed with one `iptables-restore --noflush --counters`
transaction per sync (render: proxy.modes.iptables_render; commands: proxy.iptables_restore).

apply adds what only the kernel knows, on full syncs only (one `iptables-save` then): stale
per-service chains that an earlier run left behind, and the jump rules from the builtin chains
(`-I PREROUTING ... -j KUBE-SERVICES` etc.) that are missing. Both go into the same restore
transaction, so a full sync is still atomic and never flushes a table: established connections
and chains the proxy does not own are untouched, and a restarted proxy rewrites in place.
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar

from proxy.iptables_restore import (
    BACKENDS,
    Iptables,
    IptablesError,
    detect_backend,
    iptables_version,
    nft_needs_hint,
    parse_save,
)
from proxy.model import ProxyConfig, ProxyState
from proxy.modes.base import ApplyError, Mode, ModeUnavailable, Plan
from proxy.modes.iptables_render import (
    FILTER_CHAINS,
    JUMP_CHAINS,
    KUBE_FIREWALL,
    KUBE_PROXY_CANARY,
    NAT_CHAINS,
    IptablesPrior,
    IptablesRenderer,
    RestorePayload,
    chain_line,
    is_service_chain,
    jump_chains,
)

__all__ = ["IptablesMode", "IptablesPrior", "MODE"]


class IptablesMode(Mode[IptablesPrior]):
    """`backend`: "auto" (what the node already uses, else nft), "legacy" or "nft".
    `netns`: run every command via `ip netns exec NETNS` (None: this process's netns)."""

    name: ClassVar[str] = "iptables"

    def __init__(
        self,
        config: ProxyConfig,
        *,
        backend: str = "auto",
        netns: str | None = None,
        random_fully: bool | None = None,
        tcp_be_liberal: bool | None = None,
        large_cluster_threshold: int = 1000,
    ) -> None:
        super().__init__(config)
        if backend not in ("auto", *BACKENDS):
            raise ModeUnavailable(f"--iptables-backend must be auto, legacy or nft, not {backend!r}")
        self.netns = netns
        self.backend = detect_backend(netns) if backend == "auto" else backend
        self.iptables = Iptables(self.backend, netns)
        if random_fully is None:
            try:  # MASQUERADE --random-fully: iptables >= 1.6.2 (kernel >= 3.13)
                random_fully = iptables_version(self.backend, netns) >= (1, 6, 2)
            except IptablesError:
                random_fully = False
        if tcp_be_liberal is None:
            tcp_be_liberal = self._read_tcp_be_liberal()
        self.tcp_be_liberal = tcp_be_liberal
        self.renderer = IptablesRenderer(
            config, random_fully=random_fully, large_cluster_threshold=large_cluster_threshold
        )
        self._applied = False

    @classmethod
    def check_kernel(cls) -> None:
        import shutil

        if not (shutil.which("iptables-nft-restore") or shutil.which("iptables-legacy-restore")):
            raise ModeUnavailable("iptables mode needs the iptables package (apt-get install iptables)")

    def _read_tcp_be_liberal(self) -> bool:
        """Upstream reads net.netfilter.nf_conntrack_tcp_be_liberal; non-zero: no INVALID drop."""
        import subprocess

        cmd = ["cat", "/proc/sys/net/netfilter/nf_conntrack_tcp_be_liberal"]
        if self.netns:
            cmd = ["ip", "netns", "exec", self.netns, *cmd]
        p = subprocess.run(cmd, capture_output=True, text=True, check=False)
        return p.returncode == 0 and p.stdout.strip() not in ("", "0")

    # -- contract ---------------------------------------------------------------------------

    def render(self, state: ProxyState, prior: IptablesPrior | None) -> Plan[IptablesPrior]:
        if self.tcp_be_liberal and not state.config.tcp_be_liberal:
            state = dataclasses.replace(state, config=dataclasses.replace(state.config, tcp_be_liberal=True))
        return self.renderer.render(state, prior)

    def apply(self, plan: Plan[IptablesPrior]) -> IptablesPrior:
        payload: RestorePayload = plan.payload
        extra: dict[str, tuple[list[str], list[str]]] = {}
        jumps: dict[str, list[str]] = {}
        try:
            if plan.full:
                extra, jumps = self._full_sync_extras(plan)
                if self.renderer.config.localhost_nodeports:
                    self._enable_route_localnet()
            merged = {t: (list(c), list(r)) for t, (c, r) in extra.items()}
            for t, lines in jumps.items():
                merged.setdefault(t, ([], []))[1].extend(lines)
            text = payload.text(merged)
            if jumps and self.backend == "nft" and nft_needs_hint(text):
                # iptables-nft 1.8.9 fails `-I` into builtin chains in a restore that lists all
                # chains (the quadratic work-around): hook the finished chains in a second
                # transaction. Safe: until then nothing jumps into them.
                self.iptables.restore(payload.text(extra))
                self.iptables.restore(RestorePayload({}).text({t: ([], lines) for t, lines in jumps.items()}))
            else:
                self.iptables.restore(text)
        except IptablesError as e:
            raise ApplyError(str(e)) from e
        self._applied = True
        return plan.prior

    def _full_sync_extras(
        self, plan: Plan[IptablesPrior]
    ) -> tuple[dict[str, tuple[list[str], list[str]]], dict[str, list[str]]]:
        """(stale chains to delete per table, missing jump rules per table), from one save."""
        jump_list = jump_chains(self.renderer.config)
        builtin: dict[str, set[str]] = {}
        for j in jump_list:
            builtin.setdefault(j.table, set()).add(j.source)
        saved = self.iptables.snapshot(builtin)
        active: set[str] = set()
        for chains in plan.prior.chains.values():
            active |= chains
        nat_rules = plan.payload.tables["nat"][1]
        extra: dict[str, tuple[list[str], list[str]]] = {}
        stale = [
            c
            for c in saved.chains.get("nat", ())
            if is_service_chain(c) and c not in active and f"-X {c}\n" not in nat_rules
        ]
        if stale:
            extra["nat"] = ([chain_line(c) for c in stale], [f"-X {c}" for c in stale])
            plan.stats["chains_deleted"] = plan.stats.get("chains_deleted", 0) + len(stale)
        jumps: dict[str, list[str]] = {}
        for jump in jump_list:
            if not saved.has_jump(jump.table, jump.source, jump.target):
                jumps.setdefault(jump.table, []).append(jump.rule())
        return extra, jumps

    def _enable_route_localnet(self) -> None:
        """localhostNodePorts: 127.0.0.1:<nodePort> is DNATed off-box only with route_localnet
        (set in this node's netns, as upstream sets it on the node)."""
        import subprocess

        key = "/proc/sys/net/ipv4/conf/all/route_localnet"
        if self.netns is None:
            with open(key, "w") as f:
                f.write("1\n")
            return
        subprocess.run(["ip", "netns", "exec", self.netns, "sysctl", "-q", "-w", "net.ipv4.conf.all.route_localnet=1"],
                       check=True, capture_output=True)

    def check_drift(self) -> bool:
        """The canary is gone from mangle, nat or filter, or the nat jumps were flushed."""
        if not self._applied:
            return False
        ipt = self.iptables
        for table in ("mangle", "nat", "filter"):
            if not ipt.chain_exists(table, KUBE_PROXY_CANARY):
                return True
        rules = ipt.list_rules("nat", "PREROUTING")
        return not any(r.endswith("-j KUBE-SERVICES") for r in rules)

    def cleanup(self) -> None:
        """Remove every chain and jump rule kpx's iptables mode makes, in both backends."""
        for backend in BACKENDS:
            try:
                cleanup_backend(Iptables(backend, self.netns))
            except IptablesError as e:
                if "not found" in str(e):
                    continue
                raise ApplyError(f"cleanup ({backend}): {e}") from e


OWN_CHAINS = {
    "filter": (*FILTER_CHAINS, KUBE_FIREWALL, KUBE_PROXY_CANARY),
    "nat": (*NAT_CHAINS, KUBE_PROXY_CANARY),
    "mangle": (KUBE_PROXY_CANARY,),
}


def cleanup_backend(ipt: Iptables) -> bool:
    """One restore per backend: delete jump rules into our chains, then flush+delete the chains.
    Returns whether there was anything to remove."""
    saved = parse_save(ipt.save())
    targets = {j.target for j in JUMP_CHAINS} | {KUBE_FIREWALL}
    extra: dict[str, tuple[list[str], list[str]]] = {}
    for table, chains in saved.chains.items():
        own = [c for c in chains if c in OWN_CHAINS.get(table, ()) or (table == "nat" and is_service_chain(c))]
        jumps = [
            r.replace("-A ", "-D ", 1)
            for r in saved.rules.get(table, ())
            if r.split(" ", 2)[1] not in own and any(r.endswith(f"-j {t}") for t in targets if t in own)
        ]
        if own or jumps:
            extra[table] = ([chain_line(c) for c in own], jumps + [f"-X {c}" for c in own])
    if not extra:
        return False
    ipt.restore(RestorePayload({}).text(extra))
    return True


MODE = IptablesMode
