"""The contract between the proxy core and a mode.

A mode is `render(state, prior) -> plan` (pure: no kernel, no clock, no I/O; golden tests pin it;
the tracer and the bench reuse it) plus `apply(plan) -> prior` (talks to the kernel of the netns
the proxy runs in). `prior` is the mode's own record of what it last programmed (chain names,
map elements, virtual servers...) so that a partial render can emit only what changed and delete
what went stale. `None` means "unknown": render a full sync.

The core's sync loop does, per sync:
    plan = mode.render(state, prior)     # state.changed is None on full syncs
    prior = mode.apply(plan)             # raises ApplyError -> next sync is full with prior=None

Conventions the core (proxy.server / proxy.sync / proxy.metrics) relies on:
- A mode module (listed in proxy.modes.MODES) exports `MODE = TheModeClass`. `proxy.server.build_mode`
  calls `MODE.check_kernel()` (ModeUnavailable -> one-line error), then `MODE(config, **options)`
  passing only the keyword options the constructor accepts: `backend` (--iptables-backend
  auto|legacy|nft), `scheduler` (--ipvs-scheduler), `tcp_be_liberal` (True when the flag is set).
- render and apply run in a worker thread (asyncio.to_thread), one sync at a time; the event loop
  keeps serving informers and /healthz meanwhile. A mode that needs the loop (userspace
  listeners) must hand work to it itself.
- `state.changed` (partial syncs) holds every ServicePortName whose Service or endpoints changed
  since the last successful sync, including ports that no longer exist (render deletes their
  chains/elements); names not in `state.services` are gone.
- `Plan.stats` keys the core maps onto kube-proxy's metrics (others are kept for the bench):
  `rules_<table>` -> kubeproxy_sync_proxy_rules_iptables_total{table} (rules owned after the sync),
  `rules_<table>_written` -> ..._iptables_last{table} (defaults to rules_<table>),
  `no_local_endpoints_internal` / `_external` -> ..._no_local_endpoints_total{traffic_policy}.
  An ApplyError counts as ..._iptables_restore_failures_total (+ _partial_ when not plan.full) for
  modes named iptables/ipvs, and ..._nftables_sync_failures_total for nftables.
- `check_drift()` is polled every syncPeriod; True -> full resync with prior=None.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any, ClassVar, Generic, TypeVar

from proxy.model import ProxyConfig, ProxyState

PriorT = TypeVar("PriorT")


class ApplyError(Exception):
    """The kernel refused a plan (restore failed, netlink error). The core forces a full resync."""


class ModeUnavailable(Exception):
    """The kernel lacks what the mode needs (e.g. IPVS). One line, says what to do."""


@dataclass(slots=True)
class Plan(Generic[PriorT]):
    """What render produced. `payload` is the mode-specific program (restore text, nft
    transaction, IPVS/ipset operations, listener table); `prior` is what apply returns on success."""

    full: bool
    payload: Any
    prior: PriorT
    # figures for metrics and the bench: e.g. {"rules_nat": 1234, "payload_bytes": 56789}
    stats: dict[str, int] = field(default_factory=dict)


class Mode(ABC, Generic[PriorT]):
    name: ClassVar[str]

    def __init__(self, config: ProxyConfig) -> None:
        self.config = config

    @classmethod
    def check_kernel(cls) -> None:
        """Raise ModeUnavailable if this kernel cannot run the mode."""

    @abstractmethod
    def render(self, state: ProxyState, prior: PriorT | None) -> Plan[PriorT]:
        """Pure: desired state (+ what was programmed before) -> plan."""

    @abstractmethod
    def apply(self, plan: Plan[PriorT]) -> PriorT:
        """Program the kernel; atomically where the kernel allows. Raise ApplyError on failure."""

    def check_drift(self) -> bool:
        """True if someone changed our kernel state behind our back (e.g. canary chain gone)."""
        return False

    def cleanup(self) -> None:
        """Remove everything this mode ever programmed in this netns (kpx proxy --cleanup)."""

    def close(self) -> None:
        """Release sockets/listeners (userspace mode); kernel state stays."""
