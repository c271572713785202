"""The UDP conntrack reconciler on the kernel's real conntrack table, in a throwaway netns.

Flows are inserted with the `conntrack` tool (as the kernel would have created them after DNAT),
then `ConntrackReconciler.reconcile(state)` runs inside the netns over netlink (pyroute2) and
must delete exactly the stale ones.
"""

from __future__ import annotations

import subprocess
import sys
import uuid

import pytest

pytestmark = pytest.mark.netns

CHILD = r"""
import json, sys
from proxy.conntrack import ConntrackReconciler
from proxy.metrics import ProxyMetrics
from proxy.model import Endpoint, ProxyConfig, ProxyState, ServicePort, ServicePortName
dns = ServicePortName("kube-system", "dns", "dns", "UDP")
zero = ServicePortName("default", "zero", "u", "UDP")
tcp = ServicePortName("default", "web", "http", "TCP")
state = ProxyState(ProxyConfig("n1"), {
    dns: ServicePort(dns, "10.96.0.10", 53, "UDP", node_port=30053),
    zero: ServicePort(zero, "10.96.0.20", 9000, "UDP"),
    tcp: ServicePort(tcp, "10.96.0.30", 80, "TCP"),
}, {dns: (Endpoint("10.244.1.5", 5353),)})
m = ProxyMetrics()
n = ConntrackReconciler(m).reconcile(state)
print(json.dumps({"deleted": n, "metric": m.registry.get_sample_value(
    "kubeproxy_conntrack_reconciler_deleted_entries_total", {"ip_family": "IPv4"})}))
"""


def flow(ns: str, proto: str, src: str, dst: str, sport: int, dport: int, rsrc: str, rsport: int) -> None:
    subprocess.run(["ip", "netns", "exec", ns, "conntrack", "-I", "-p", proto, "-s", src, "-d", dst,
                    "--sport", str(sport), "--dport", str(dport), "-r", rsrc, "-q", src,
                    "--reply-port-src", str(rsport), "--reply-port-dst", str(sport), "--timeout", "120"]
                   + (["--state", "ESTABLISHED"] if proto == "tcp" else []),
                   check=True, capture_output=True)


def flows(ns: str) -> str:
    return subprocess.run(["ip", "netns", "exec", ns, "conntrack", "-L"], capture_output=True, text=True).stdout


@pytest.fixture
def netns():
    name = f"kpxt-ct-{uuid.uuid4().hex[:8]}"
    subprocess.run(["ip", "netns", "add", name], check=True)
    try:
        yield name
    finally:
        subprocess.run(["ip", "netns", "del", name], check=False)


def test_reconciler_deletes_only_stale_udp_service_flows(netns: str) -> None:
    flow(netns, "udp", "10.244.2.7", "10.96.0.10", 40001, 53, "10.244.1.5", 5353)  # serving endpoint: keep
    flow(netns, "udp", "10.244.2.7", "10.96.0.10", 40002, 53, "10.244.1.9", 5353)  # endpoint gone: delete
    flow(netns, "udp", "192.168.56.200", "192.168.56.11", 40003, 30053, "10.244.1.9", 5353)  # NodePort: delete
    flow(netns, "udp", "10.244.2.7", "10.96.0.20", 40004, 9000, "10.244.3.3", 9000)  # scaled to zero: delete
    flow(netns, "udp", "10.244.2.7", "8.8.8.8", 40005, 53, "8.8.8.8", 53)  # not a service: keep
    flow(netns, "tcp", "10.244.2.7", "10.96.0.30", 40006, 80, "10.244.7.7", 8080)  # TCP: not ours
    r = subprocess.run(["ip", "netns", "exec", netns, sys.executable, "-c", CHILD],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert '"deleted": 3' in r.stdout and '"metric": 3.0' in r.stdout
    left = flows(netns)
    assert "sport=40001" in left and "sport=40005" in left and "sport=40006" in left
    for sport in (40002, 40003, 40004):
        assert f"sport={sport} " not in left
