"""UDP conntrack hygiene after a sync (upstream's pkg/proxy/conntrack reconciler, v1.32+).

UDP has no connection teardown: a flow created while a Service had no endpoints (or towards an
endpoint that is gone) keeps blackholing the client's packets until it times out. After a sync
that may have changed UDP endpoints, list every conntrack flow and delete those whose original
destination is a UDP Service frontend (ClusterIP, externalIPs, LB IPs: ip:port; NodePort: port)
but whose reply source is not a serving endpoint of that Service. Services scaled to zero are
included (upstream's #139628 regression). One netlink socket for the dump and every delete.
"""

from __future__ import annotations

import logging
import socket
import time
from collections.abc import Iterable
from dataclasses import dataclass

from proxy.metrics import ProxyMetrics
from proxy.model import UDP, ProxyState

log = logging.getLogger("kpx.proxy.conntrack")


@dataclass(frozen=True, slots=True)
class Flow:
    """The parts of a conntrack entry the reconciler looks at (plus the entry itself)."""

    orig_dst: str
    orig_dport: int
    reply_src: str
    reply_sport: int
    entry: object = None


@dataclass(slots=True)
class UdpFrontends:
    by_ip_port: dict[tuple[str, int], set[tuple[str, int]]]
    by_node_port: dict[int, set[tuple[str, int]]]


def udp_frontends(state: ProxyState) -> UdpFrontends:
    """UDP frontends -> the serving endpoints (ip, port) a flow to it may legitimately reach."""
    by_ip: dict[tuple[str, int], set[tuple[str, int]]] = {}
    by_np: dict[int, set[tuple[str, int]]] = {}
    for spn, svc in state.services.items():
        if svc.protocol != UDP:
            continue
        eps = {(e.ip, e.port) for e in state.endpoints.get(spn, ()) if e.serving}
        for ip in (svc.cluster_ip, *svc.external_ips, *svc.load_balancer_ips):
            if ip:
                by_ip.setdefault((ip, svc.port), set()).update(eps)
        if svc.node_port:
            by_np.setdefault(svc.node_port, set()).update(eps)
    return UdpFrontends(by_ip, by_np)


def stale_flows(front: UdpFrontends, flows: Iterable[Flow]) -> list[Flow]:
    """Flows (already UDP) that go to a frontend but not to one of its serving endpoints."""
    out = []
    for f in flows:
        reply = (f.reply_src, f.reply_sport)
        eps = front.by_ip_port.get((f.orig_dst, f.orig_dport))
        if eps is None:
            eps = front.by_node_port.get(f.orig_dport)
        if eps is not None and reply not in eps:
            out.append(f)
    return out


class ConntrackReconciler:
    """Runs in the proxy's network namespace (the node's). Blocking: call it in a thread."""

    def __init__(self, metrics: ProxyMetrics | None = None) -> None:
        self.metrics = metrics

    def reconcile(self, state: ProxyState) -> int:
        from pyroute2 import Conntrack

        start = time.monotonic()
        front = udp_frontends(state)
        deleted = 0
        with Conntrack() as ct:
            flows = []
            for e in ct.dump_entries():
                o, r = e.tuple_orig, e.tuple_reply
                if o.proto != socket.IPPROTO_UDP or o.daddr is None:
                    continue
                flows.append(Flow(o.daddr, int(o.dport or 0), str(r.saddr), int(r.sport or 0), e))
            for f in stale_flows(front, flows):
                try:
                    ct.delete(f.entry)
                    deleted += 1
                except Exception as ex:  # the flow may have expired meanwhile (ENOENT)
                    log.debug("conntrack delete %s:%d failed: %s", f.orig_dst, f.orig_dport, ex)
        elapsed = time.monotonic() - start
        if self.metrics is not None:
            self.metrics.conntrack_duration.labels("IPv4").observe(elapsed)
            self.metrics.conntrack_deleted.labels("IPv4").inc(deleted)
        if deleted:
            log.info("conntrack: deleted %d stale UDP flows in %.3fs", deleted, elapsed)
        return deleted
