"""userspace mode: kube-proxy's original proxier (removed upstream in v1.26), rebuilt.

render (pure, proxy.userspace.portals): the listener table (a proxy port per Service port, its
round-robin endpoint set and affinity) and ONE iptables-restore transaction of portal rules
(KUBE-PORTALS-CONTAINER/-HOST, KUBE-NODEPORT-CONTAINER/-HOST, filter KUBE-NODEPORT-NON-LOCAL).

apply, in the order that never leaves a Service refusing connections it should take:
1. open the listeners that are new (and update the balancers of the others),
2. restore the rules (plus the builtin-chain jumps, on full syncs, when missing),
3. close the listeners that are no longer wanted (established connections keep flowing).

The data path (proxy.userspace.proxier) is one epoll thread that relays with os.splice; it
starts at the first apply and stops at close(). Known differences from the kernel modes are in
README.md ("Proxy modes").
"""

from __future__ import annotations

from typing import ClassVar

from proxy.iptables_restore import BACKENDS, Iptables, IptablesError, detect_backend, parse_save
from proxy.model import ProxyConfig, ProxyState
from proxy.modes.base import ApplyError, Mode, ModeUnavailable, Plan
from proxy.userspace.portals import (
    DEFAULT_PORT_RANGE,
    FILTER_CHAINS,
    JUMPS,
    NAT_CHAINS,
    PORTALS_CONTAINER,
    PortRangeExhausted,
    UserspacePayload,
    UserspacePrior,
    recover_ports,
    render,
)
from proxy.userspace.proxier import Proxier
from proxy.userspace.tcp import DIAL_TIMEOUTS
from proxy.userspace.udp import DEFAULT_UDP_IDLE_TIMEOUT

__all__ = ["MODE", "UserspaceMode"]


def parse_port_range(text: str) -> tuple[int, int]:
    """kube-proxy's --proxy-port-range: "BEGIN-END" or "BEGIN+SIZE"; "" = the default."""
    if not text:
        return DEFAULT_PORT_RANGE
    try:
        if "+" in text:
            a, n = text.split("+", 1)
            lo, hi = int(a), int(a) + int(n) - 1
        else:
            a, b = text.split("-", 1)
            lo, hi = int(a), int(b)
    except ValueError:
        raise ModeUnavailable(f"--proxy-port-range {text!r}: expected BEGIN-END or BEGIN+SIZE") from None
    if not 1 <= lo <= hi <= 65535:
        raise ModeUnavailable(f"--proxy-port-range {text!r}: ports must be within 1-65535, BEGIN <= END")
    return (lo, hi)


class UserspaceMode(Mode[UserspacePrior]):
    name: ClassVar[str] = "userspace"

    def __init__(
        self,
        config: ProxyConfig,
        *,
        backend: str = "auto",
        netns: str | None = None,
        port_range: tuple[int, int] | str = DEFAULT_PORT_RANGE,
        udp_idle_timeout: float = DEFAULT_UDP_IDLE_TIMEOUT,
        relay: str = "splice",
        bind_ip: str = "0.0.0.0",
        dial_timeouts: tuple[float, ...] = DIAL_TIMEOUTS,
        pipe_size: int = 1 << 20,
    ) -> None:
        super().__init__(config)
        if backend not in ("auto", *BACKENDS):
            raise ModeUnavailable(f"--iptables-backend must be auto, legacy or nft, not {backend!r}")
        if relay not in ("splice", "copy"):
            raise ModeUnavailable(f"relay must be splice or copy, not {relay!r}")
        self.netns = netns
        self.backend = detect_backend(netns) if backend == "auto" else backend
        self.iptables = Iptables(self.backend, netns)
        self.port_range = parse_port_range(port_range) if isinstance(port_range, str) else port_range
        self.udp_idle_timeout = udp_idle_timeout
        self.relay = relay
        self.bind_ip = bind_ip
        self.dial_timeouts = dial_timeouts
        self.pipe_size = pipe_size
        self.proxier: Proxier | None = None
        self._jumps_checked = False
        try:  # a restarted proxy keeps the proxy ports the rules already point at
            self.seed = UserspacePrior(recover_ports(self.iptables.save("nat"), self.port_range))
        except IptablesError:
            self.seed = UserspacePrior()

    @classmethod
    def check_kernel(cls) -> None:
        import shutil

        if not (shutil.which("iptables-nft-restore") or shutil.which("iptables-legacy-restore")):
            raise ModeUnavailable("userspace mode needs the iptables package (apt-get install iptables)")

    def render(self, state: ProxyState, prior: UserspacePrior | None) -> Plan[UserspacePrior]:
        try:
            payload, new_prior, stats = render(state, prior if prior is not None else self.seed,
                                               port_range=self.port_range)
        except PortRangeExhausted as e:
            raise ApplyError(str(e)) from None
        return Plan(full=state.full, payload=payload, prior=new_prior, stats=stats)

    def _data_path(self) -> Proxier:
        if self.proxier is None:
            self.proxier = Proxier(self.netns, relay=self.relay, bind_ip=self.bind_ip,
                                   udp_idle_timeout=self.udp_idle_timeout, dial_timeouts=self.dial_timeouts,
                                   pipe_size=self.pipe_size)
        return self.proxier

    def apply(self, plan: Plan[UserspacePrior]) -> UserspacePrior:
        payload: UserspacePayload = plan.payload
        proxier = self._data_path()
        errors = proxier.sync(payload.listeners)
        try:
            extra = self._missing_jumps() if plan.full or not self._jumps_checked else {}
            self.iptables.restore(payload.restore(extra))
        except IptablesError as e:
            raise ApplyError(str(e)) from e
        self._jumps_checked = True
        proxier.close_stale(payload.listeners)
        plan.stats.update(proxier.stats())
        if errors:
            raise ApplyError("; ".join(errors[:3]) + (f" (+{len(errors) - 3} more)" if len(errors) > 3 else ""))
        return plan.prior

    def _missing_jumps(self) -> dict[str, list[str]]:
        saved = parse_save(self.iptables.save())
        extra: dict[str, list[str]] = {}
        for j in JUMPS:
            if not saved.has_jump(j.table, j.source, j.target):
                extra.setdefault(j.table, []).append(j.rule())
        return extra

    def check_drift(self) -> bool:
        """Our portal jump was flushed from nat PREROUTING (or the chain is gone)."""
        if not self._jumps_checked:
            return False
        rules = self.iptables.list_rules("nat", "PREROUTING")
        return not any(r.endswith(f"-j {PORTALS_CONTAINER}") for r in rules)

    def cleanup(self) -> None:
        """Remove the jumps and chains of the userspace mode, in both backends."""
        for backend in BACKENDS:
            ipt = Iptables(backend, self.netns)
            try:
                saved = parse_save(ipt.save())
            except IptablesError:
                continue
            own = {"nat": NAT_CHAINS, "filter": FILTER_CHAINS}
            out: list[str] = []
            for table, chains in own.items():
                present = [c for c in chains if c in saved.chains.get(table, ())]
                jumps = [r.replace("-A ", "-D ", 1) for r in saved.rules.get(table, ())
                         if any(r.endswith(f"-j {c}") for c in present) and r.split(" ", 2)[1] not in present]
                if present or jumps:
                    out += [f"*{table}", *(f":{c} - [0:0]" for c in present), *jumps,
                            *(f"-X {c}" for c in present), "COMMIT"]
            if out:
                try:
                    ipt.restore("\n".join(out) + "\n")
                except IptablesError as e:
                    raise ApplyError(f"cleanup ({backend}): {e}") from e

    def close(self) -> None:
        if self.proxier is not None:
            self.proxier.close()
            self.proxier = None


MODE = UserspaceMode
