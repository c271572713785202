"""kube-proxy's Prometheus metrics, names and buckets as upstream (pkg/proxy/metrics/metrics.go).

One `ProxyMetrics` per proxy, on its own CollectorRegistry (tests run several proxies in one
process). Modes report their figures through `Plan.stats` (see proxy.modes.base); `observe_plan`
maps them onto the iptables-named series that dashboards know.
"""

from __future__ import annotations

from collections.abc import Mapping

import prometheus_client
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

# No `_created` series: upstream (client_golang) has none, and dashboards would not expect them.
prometheus_client.disable_created_metrics()

SYNC_BUCKETS = tuple(0.001 * 2**i for i in range(15))  # ExponentialBuckets(0.001, 2, 15)
NETWORK_PROGRAMMING_BUCKETS = (
    (0.25, 0.5)  # LinearBuckets(0.25, 0.25, 2)
    + tuple(float(i) for i in range(1, 60))  # LinearBuckets(1, 1, 59)
    + tuple(float(i) for i in range(60, 120, 5))  # LinearBuckets(60, 5, 12)
    + tuple(float(i) for i in range(120, 301, 30))  # LinearBuckets(120, 30, 7)
)
TABLES = ("filter", "nat", "mangle", "raw")


class ProxyMetrics:
    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        r = self.registry = registry or CollectorRegistry(auto_describe=True)
        # process_cpu_seconds_total, process_resident_memory_bytes, ... as every Go binary has
        prometheus_client.ProcessCollector(registry=r)
        ns = "kubeproxy"
        self.sync_duration = Histogram(
            "sync_proxy_rules_duration_seconds", "SyncProxyRules latency in seconds",
            namespace=ns, buckets=SYNC_BUCKETS, registry=r)
        self.sync_full_duration = Histogram(
            "sync_full_proxy_rules_duration_seconds", "SyncProxyRules latency in seconds for full resyncs",
            namespace=ns, buckets=SYNC_BUCKETS, registry=r)
        self.sync_partial_duration = Histogram(
            "sync_partial_proxy_rules_duration_seconds", "SyncProxyRules latency in seconds for partial resyncs",
            namespace=ns, buckets=SYNC_BUCKETS, registry=r)
        self.last_timestamp = Gauge(
            "sync_proxy_rules_last_timestamp_seconds", "The last time proxy rules were successfully synced",
            namespace=ns, registry=r)
        self.last_queued_timestamp = Gauge(
            "sync_proxy_rules_last_queued_timestamp_seconds",
            "The last time a sync of proxy rules was queued", namespace=ns, registry=r)
        self.network_programming = Histogram(
            "network_programming_duration_seconds", "In Cluster Network Programming Latency in seconds",
            namespace=ns, buckets=NETWORK_PROGRAMMING_BUCKETS, registry=r)
        self.endpoint_changes_pending = Gauge(
            "sync_proxy_rules_endpoint_changes_pending", "Pending proxy rules Endpoint changes",
            namespace=ns, registry=r)
        self.endpoint_changes_total = Counter(
            "sync_proxy_rules_endpoint_changes_total", "Cumulative proxy rules Endpoint changes",
            namespace=ns, registry=r)
        self.service_changes_pending = Gauge(
            "sync_proxy_rules_service_changes_pending", "Pending proxy rules Service changes",
            namespace=ns, registry=r)
        self.service_changes_total = Counter(
            "sync_proxy_rules_service_changes_total", "Cumulative proxy rules Service changes",
            namespace=ns, registry=r)
        self.restore_failures = Counter(
            "sync_proxy_rules_iptables_restore_failures_total", "Cumulative proxy iptables restore failures",
            namespace=ns, registry=r)
        self.partial_restore_failures = Counter(
            "sync_proxy_rules_iptables_partial_restore_failures_total",
            "Cumulative proxy iptables partial restore failures", namespace=ns, registry=r)
        self.nftables_sync_failures = Counter(
            "sync_proxy_rules_nftables_sync_failures_total", "Cumulative proxy nftables sync failures",
            namespace=ns, registry=r)
        self.rules_total = Gauge(
            "sync_proxy_rules_iptables_total", "Total number of iptables rules owned by kube-proxy",
            ["table"], namespace=ns, registry=r)
        self.rules_last = Gauge(
            "sync_proxy_rules_iptables_last", "Number of iptables rules written by kube-proxy in last sync",
            ["table"], namespace=ns, registry=r)
        self.no_local_endpoints = Gauge(
            "sync_proxy_rules_no_local_endpoints_total",
            "Number of services with a Local traffic policy and no endpoints", ["traffic_policy"],
            namespace=ns, registry=r)
        self.healthz_total = Counter(
            "proxy_healthz_total", "Cumulative proxy healthz HTTP status", ["code"], namespace=ns, registry=r)
        self.livez_total = Counter(
            "proxy_livez_total", "Cumulative proxy livez HTTP status", ["code"], namespace=ns, registry=r)
        self.conntrack_duration = Histogram(
            "conntrack_reconciler_sync_duration_seconds", "ReconcileConntrackFlowsLatency latency in seconds",
            ["ip_family"], namespace=ns, buckets=SYNC_BUCKETS, registry=r)
        self.conntrack_deleted = Counter(
            "conntrack_reconciler_deleted_entries_total", "Cumulative conntrack flows deleted by conntrack reconciler",
            ["ip_family"], namespace=ns, registry=r)
        for policy in ("internal", "external"):
            self.no_local_endpoints.labels(policy).set(0)
        for code in ("200", "503"):
            self.healthz_total.labels(code)
            self.livez_total.labels(code)
        self.conntrack_deleted.labels("IPv4")

    def observe_plan(self, stats: Mapping[str, int], mode: str) -> None:
        """Map a mode's Plan.stats onto the upstream series (see proxy.modes.base.Plan)."""
        if mode in ("iptables", "ipvs"):
            for table in TABLES:
                total = stats.get(f"rules_{table}")
                if total is None:
                    continue
                self.rules_total.labels(table).set(total)
                self.rules_last.labels(table).set(stats.get(f"rules_{table}_written", total))
        for policy in ("internal", "external"):
            v = stats.get(f"no_local_endpoints_{policy}")
            if v is not None:
                self.no_local_endpoints.labels(policy).set(v)

    def apply_failed(self, mode: str, partial: bool) -> None:
        if mode == "nftables":
            self.nftables_sync_failures.inc()
            return
        if mode in ("iptables", "ipvs"):
            self.restore_failures.inc()
            if partial:
                self.partial_restore_failures.inc()

    def exposition(self) -> bytes:
        return prometheus_client.generate_latest(self.registry)
