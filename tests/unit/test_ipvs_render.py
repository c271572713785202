"""The IPVS mode's pure render: virtual/real servers, ipsets, glue rules and their diffs."""

from dataclasses import replace

import pytest

from proxy.model import Endpoint, ProxyConfig, ProxyState, ServicePort, ServicePortName
from proxy.modes.ipvs import IPSETS, IpvsMode

pytestmark = pytest.mark.unit
CFG = ProxyConfig(node_name="node1", node_ips=("192.168.56.11",), cluster_cidr="10.244.0.0/16")


def st(*pairs, changed=None):
    return ProxyState(CFG, {s.name: s for s, _ in pairs}, {s.name: e for s, e in pairs}, changed)


def ep(ip, port=8080, node="node1"):
    return Endpoint(ip, port, node_name=node)


WEB = ServicePort(ServicePortName("default", "web", "http"), "10.96.0.20", 80, node_port=30080)
DNS = ServicePort(ServicePortName("kube-system", "dns", "dns", "UDP"), "10.96.0.10", 53, protocol="UDP")


def test_virtual_servers_for_clusterip_and_nodeport():
    plan = IpvsMode(CFG).render(st((WEB, (ep("10.244.1.2"), ep("10.244.2.2", node="node2")))), None)
    ops = plan.payload
    keys = sorted(v.key for v in ops.vs_add)
    assert keys == [("10.96.0.20", 80, "TCP"), ("192.168.56.11", 30080, "TCP")]
    assert all(v.scheduler == "rr" and v.persistence == 0 for v in ops.vs_add)
    assert sorted(ops.rs_add) == sorted(
        [(k, rs) for k in keys for rs in (("10.244.1.2", 8080), ("10.244.2.2", 8080))]
    )
    assert ops.addr_add == ["10.96.0.20"]
    assert "add KPX-TMP-1 10.96.0.20,tcp:80" in ops.ipset  # KUBE-CLUSTER-IP is the 2nd set
    assert "swap KPX-TMP-1 KUBE-CLUSTER-IP" in ops.ipset
    assert "add KPX-TMP-0 10.244.1.2,tcp:8080,10.244.1.2" in ops.ipset  # hairpin for local endpoints only
    assert "10.244.2.2,tcp:8080,10.244.2.2" not in ops.ipset
    assert "-A KUBE-SERVICES ! -s 10.244.0.0/16" in ops.iptables
    assert "--match-set KUBE-IPVS-IPS dst -j REJECT" in ops.iptables
    assert list(IPSETS)[1] == "KUBE-CLUSTER-IP"


def test_affinity_is_persistence_and_scheduler_is_configurable():
    svc = replace(WEB, affinity_timeout=600)
    plan = IpvsMode(CFG, scheduler="lc").render(st((svc, (ep("10.244.1.2"),))), None)
    assert {(v.scheduler, v.persistence) for v in plan.payload.vs_add} == {("lc", 600)}


def test_etp_local_nodeport_uses_only_local_endpoints():
    svc = replace(WEB, external_policy_local=True)
    plan = IpvsMode(CFG).render(st((svc, (ep("10.244.1.2"), ep("10.244.2.2", node="node2")))), None)
    reals = plan.prior.reals
    assert reals[("192.168.56.11", 30080, "TCP")] == {("10.244.1.2", 8080)}
    assert reals[("10.96.0.20", 80, "TCP")] == {("10.244.1.2", 8080), ("10.244.2.2", 8080)}
    i = list(IPSETS).index("KUBE-NODE-PORT-LOCAL-TCP")
    assert f"add KPX-TMP-{i} 30080" in plan.payload.ipset


def test_removed_tcp_endpoint_drains_udp_goes_at_once():
    mode = IpvsMode(CFG)
    p0 = mode.render(st((WEB, (ep("10.244.1.2"), ep("10.244.1.3"))), (DNS, (ep("10.244.1.9", 53),))), None).prior
    plan = mode.render(st((WEB, (ep("10.244.1.2"),)), (DNS, ()), changed=frozenset({WEB.name, DNS.name})), p0)
    ops = plan.payload
    assert not ops.full and ops.iptables == "" and ops.vs_add == []
    assert (("10.96.0.20", 80, "TCP"), ("10.244.1.3", 8080)) in ops.rs_drain
    assert ops.rs_del == [(("10.96.0.10", 53, "UDP"), ("10.244.1.9", 53))]
    assert "del KUBE-LOOP-BACK 10.244.1.3,tcp:8080,10.244.1.3 -exist" in ops.ipset
    # the draining server stays known until the kernel says it is idle
    assert ("10.244.1.3", 8080) in plan.prior.reals[("10.96.0.20", 80, "TCP")]
    # it comes back before it drained: weight 1 again, no longer draining
    back = mode.render(st((WEB, (ep("10.244.1.2"), ep("10.244.1.3"))), (DNS, ()), changed=frozenset({WEB.name})), plan.prior)
    assert (("10.96.0.20", 80, "TCP"), ("10.244.1.3", 8080)) in back.payload.rs_add
    assert not back.prior.draining


def test_removed_service_deletes_virtual_servers_and_address():
    mode = IpvsMode(CFG)
    p0 = mode.render(st((WEB, (ep("10.244.1.2"),))), None).prior
    ops = mode.render(st(changed=frozenset({WEB.name})), p0).payload
    assert sorted(ops.vs_del) == [("10.96.0.20", 80, "TCP"), ("192.168.56.11", 30080, "TCP")]
    assert ops.addr_del == ["10.96.0.20"]
    assert "del KUBE-CLUSTER-IP 10.96.0.20,tcp:80 -exist" in ops.ipset


def test_unchanged_partial_sync_does_nothing():
    mode = IpvsMode(CFG)
    p0 = mode.render(st((WEB, (ep("10.244.1.2"),))), None).prior
    plan = mode.render(st((WEB, (ep("10.244.1.2"),)), changed=frozenset()), p0)
    assert plan.stats["netlink_ops"] == 0 and plan.payload.ipset == ""
