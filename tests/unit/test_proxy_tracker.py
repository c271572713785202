"""proxy.tracker: Service/EndpointSlice JSON -> model, ignore rules, merging, change sets."""

from __future__ import annotations

import copy
from typing import Any

import pytest

from proxy.model import Endpoint, ProxyConfig, ServicePortName, categorize_endpoints
from proxy.tracker import ChangeTracker, parse_endpoint_slice, parse_service

pytestmark = pytest.mark.unit


def svc(name: str = "web", ns: str = "default", **spec: Any) -> dict[str, Any]:
    base: dict[str, Any] = {
        "type": "ClusterIP",
        "clusterIP": "10.96.0.10",
        "ports": [{"name": "http", "port": 80, "protocol": "TCP", "targetPort": 8080}],
    }
    base.update(spec)
    return {"apiVersion": "v1", "kind": "Service",
            "metadata": {"namespace": ns, "name": name, "resourceVersion": "1"}, "spec": base}


def ep(ip: str, node: str = "n1", **cond: bool) -> dict[str, Any]:
    c = {"ready": True, "serving": True, "terminating": False}
    c.update(cond)
    return {"addresses": [ip], "conditions": c, "nodeName": node, "zone": "z1"}


def slice_(name: str, service: str = "web", eps=(), ports=(("http", 8080, "TCP"),), ns: str = "default",
           address_type: str = "IPv4", trigger: str | None = None) -> dict[str, Any]:
    md: dict[str, Any] = {"namespace": ns, "name": name, "labels": {"kubernetes.io/service-name": service}}
    if trigger:
        md["annotations"] = {"endpoints.kubernetes.io/last-change-trigger-time": trigger}
    return {"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice", "metadata": md,
            "addressType": address_type, "endpoints": list(eps),
            "ports": [{"name": n, "port": p, "protocol": pr} for n, p, pr in ports]}


SPN = ServicePortName("default", "web", "http", "TCP")


def tracker(node: str = "n1") -> ChangeTracker:
    return ChangeTracker(ProxyConfig(node_name=node))


def test_parse_service_full_featured_loadbalancer():
    s = svc(type="LoadBalancer", externalIPs=["192.168.56.50", "fd00::1"],
            ports=[{"name": "dns", "port": 53, "protocol": "UDP", "nodePort": 30053}],
            externalTrafficPolicy="Local", internalTrafficPolicy="Local", healthCheckNodePort=32000,
            sessionAffinity="ClientIP", sessionAffinityConfig={"clientIP": {"timeoutSeconds": 60}},
            loadBalancerSourceRanges=["203.0.113.0/24"])
    s["status"] = {"loadBalancer": {"ingress": [{"ip": "192.168.56.100"},
                                                {"ip": "192.168.56.101", "ipMode": "Proxy"}]}}
    (sp,) = parse_service(s).values()
    assert sp.name == ServicePortName("default", "web", "dns", "UDP")
    assert (sp.cluster_ip, sp.port, sp.protocol, sp.node_port) == ("10.96.0.10", 53, "UDP", 30053)
    assert sp.external_ips == ("192.168.56.50",)  # IPv4 family only
    assert sp.load_balancer_ips == ("192.168.56.100",)  # ipMode Proxy is not captured
    assert sp.load_balancer_source_ranges == ("203.0.113.0/24",)
    assert sp.affinity_timeout == 60 and sp.external_policy_local and sp.internal_policy_local
    assert sp.health_check_node_port == 32000 and sp.service_type == "LoadBalancer"


def test_parse_service_defaults():
    s = svc(sessionAffinity="ClientIP", externalTrafficPolicy="Local",
            ports=[{"port": 443}, {"name": "x", "port": 80, "nodePort": 30080}])
    ports = parse_service(s)
    a = ports[ServicePortName("default", "web", "", "TCP")]
    assert a.affinity_timeout == 10800  # DefaultClientIPServiceAffinitySeconds
    assert not a.external_policy_local  # ETP only matters for externally reachable services
    assert ports[ServicePortName("default", "web", "x", "TCP")].node_port == 0  # not a NodePort service
    assert a.health_check_node_port == 0


@pytest.mark.parametrize(
    "mutate",
    [
        lambda s: s["spec"].update(clusterIP="None"),
        lambda s: s["spec"].update(type="ExternalName", externalName="example.com", clusterIP=""),
        lambda s: s["metadata"].setdefault("labels", {}).update({"service.kubernetes.io/service-proxy-name": "x"}),
        lambda s: s["metadata"].setdefault("labels", {}).update({"service.kubernetes.io/headless": ""}),
    ],
    ids=["headless", "externalname", "service-proxy-name", "headless-label"],
)
def test_ignored_services(mutate):
    s = svc()
    mutate(s)
    assert parse_service(s) == {}


def test_slice_conditions_and_fqdn():
    sl = parse_endpoint_slice(slice_("a", eps=[ep("10.244.1.2"), {"addresses": ["10.244.1.3"]},
                                                ep("10.244.2.2", "n2", ready=False, terminating=True)]))
    assert sl is not None
    a, b, c = sl.ports[("http", "TCP")]
    assert a == Endpoint("10.244.1.2", 8080, True, True, False, "n1", "z1")
    assert (b.ready, b.serving, b.terminating) == (True, True, False)  # nil conditions
    assert (c.ready, c.serving, c.terminating) == (False, True, True)
    assert parse_endpoint_slice(slice_("f", eps=[{"addresses": ["example.com"]}], address_type="FQDN")) is None
    nolabel = slice_("x")
    del nolabel["metadata"]["labels"]
    assert parse_endpoint_slice(nolabel) is None


def test_v1beta1_topology_is_read():
    sl = slice_("b", eps=[{"addresses": ["10.244.1.9"], "conditions": {"ready": True},
                           "topology": {"kubernetes.io/hostname": "n7", "topology.kubernetes.io/zone": "zz"}}])
    parsed = parse_endpoint_slice(sl)
    assert parsed is not None
    (e,) = parsed.ports[("http", "TCP")]
    assert (e.node_name, e.zone, e.serving) == ("n7", "zz", True)  # serving defaults to ready


def test_multiple_slices_merge_and_dedupe():
    t = tracker()
    t.on_service("ADDED", None, svc())
    t.on_endpoint_slice("ADDED", None, slice_("web-1", eps=[ep("10.244.1.3"), ep("10.244.1.2", ready=False)]))
    t.on_endpoint_slice("ADDED", None, slice_("web-2", eps=[ep("10.244.1.2"), ep("10.244.2.9", "n2")]))
    eps = t.endpoints[SPN]
    assert [e.addr for e in eps] == ["10.244.1.2:8080", "10.244.1.3:8080", "10.244.2.9:8080"]
    assert all(e.ready for e in eps)  # the ready duplicate wins
    t.on_endpoint_slice("DELETED", slice_("web-2"), None)
    assert [(e.addr, e.ready) for e in t.endpoints[SPN]] == [("10.244.1.2:8080", False), ("10.244.1.3:8080", True)]


def test_fqdn_slice_does_not_touch_endpoints():
    t = tracker()
    t.on_service("ADDED", None, svc())
    t.on_endpoint_slice("ADDED", None, slice_("web-1", eps=[ep("10.244.1.3")]))
    t.on_endpoint_slice("ADDED", None, slice_("web-f", eps=[{"addresses": ["a.example"]}], address_type="FQDN"))
    assert [e.ip for e in t.endpoints[SPN]] == ["10.244.1.3"]


def test_slice_ports_map_by_name_and_protocol():
    t = tracker()
    t.on_service("ADDED", None, svc(ports=[{"name": "dns", "port": 53, "protocol": "UDP"},
                                           {"name": "dns-tcp", "port": 53, "protocol": "TCP"}]))
    t.on_endpoint_slice("ADDED", None, slice_("s", eps=[ep("10.244.1.5")],
                                              ports=[("dns", 5353, "UDP"), ("dns-tcp", 5354, "TCP")]))
    assert t.endpoints[ServicePortName("default", "web", "dns", "UDP")][0].port == 5353
    assert t.endpoints[ServicePortName("default", "web", "dns-tcp", "TCP")][0].port == 5354


def test_terminating_fallback_through_tracker():
    t = tracker("n1")
    t.on_service("ADDED", None, svc(internalTrafficPolicy="Local"))
    t.on_endpoint_slice("ADDED", None, slice_("s", eps=[
        ep("10.244.1.2", "n1", ready=False, serving=True, terminating=True),
        ep("10.244.1.3", "n1", ready=False, serving=False, terminating=True),
        ep("10.244.2.2", "n2")]))
    state, _ = t.snapshot()
    cat = categorize_endpoints(state.services[SPN], state.endpoints[SPN], "n1")
    assert [e.ip for e in cat.local] == ["10.244.1.2"]  # local serving-terminating, not the remote ready one
    assert cat.has_any


def test_changed_set_partial_syncs_and_commit():
    t = tracker()
    t.on_service("ADDED", None, svc())
    t.on_service("ADDED", None, svc("db", ports=[{"name": "pg", "port": 5432}]))
    state, tok = t.snapshot()
    assert state.full and state.changed is None  # the first sync is always full
    t.commit(tok)
    assert not t.has_pending
    # an endpoint change for web only
    t.on_endpoint_slice("ADDED", None, slice_("web-1", eps=[ep("10.244.1.2")]))
    state, tok = t.snapshot()
    assert state.changed == frozenset({SPN}) and set(state.services) == {SPN, ServicePortName("default", "db", "pg")}
    assert tok.endpoint_changes == 1 and tok.service_changes == 0
    # an event arriving during the sync survives the commit
    t.on_service("MODIFIED", svc("db", ports=[{"name": "pg", "port": 5432}]),
                 svc("db", ports=[{"name": "pg2", "port": 5433}]))
    t.commit(tok)
    state, tok = t.snapshot()
    # removed port names are part of the change set, so the mode deletes their chains
    assert state.changed == frozenset({ServicePortName("default", "db", "pg"), ServicePortName("default", "db", "pg2")})
    t.commit(tok)
    assert t.snapshot()[0].changed == frozenset()


def test_no_op_updates_do_not_mark_changes():
    t = tracker()
    s = svc()
    t.on_service("ADDED", None, s)
    t.commit(t.snapshot()[1])
    s2 = copy.deepcopy(s)
    s2["metadata"]["annotations"] = {"x": "y"}
    s2["metadata"]["resourceVersion"] = "2"
    t.on_service("MODIFIED", s, s2)
    assert not t.has_pending


def test_service_becoming_externalname_removes_it():
    t = tracker()
    t.on_service("ADDED", None, svc())
    t.on_endpoint_slice("ADDED", None, slice_("web-1", eps=[ep("10.244.1.2")]))
    t.commit(t.snapshot()[1])
    ext = svc(type="ExternalName", externalName="example.com")
    del ext["spec"]["clusterIP"]
    t.on_service("MODIFIED", svc(), ext)
    state, _ = t.snapshot()
    assert SPN not in state.services and SPN not in state.endpoints
    assert state.changed == frozenset({SPN})


def test_failed_sync_forces_full_and_keeps_pending():
    t = tracker()
    t.on_service("ADDED", None, svc())
    t.commit(t.snapshot()[1])
    t.on_endpoint_slice("ADDED", None, slice_("web-1", eps=[ep("10.244.1.2")]))
    t.snapshot()
    t.failed()
    state, tok = t.snapshot()
    assert state.full and tok.endpoint_changes == 1


def test_trigger_time_is_earliest_of_pending_changes():
    t = tracker()
    t.on_service("ADDED", None, svc())
    t.commit(t.snapshot()[1])
    t.on_endpoint_slice("ADDED", None, slice_("web-1", eps=[ep("10.244.1.2")], trigger="2026-12-01T20:00:05Z"))
    t.on_endpoint_slice("MODIFIED", None, slice_("web-1", eps=[ep("10.244.1.3")],
                                                trigger="2026-12-01T20:00:09.500000Z"))
    _, tok = t.snapshot()
    assert tok.trigger_times == {("default", "web"): pytest.approx(1796155205.0)}
    t.commit(tok)
    assert t.snapshot()[1].trigger_times == {}


def test_udp_changes_request_conntrack_cleanup():
    t = tracker()
    t.on_service("ADDED", None, svc(ports=[{"name": "dns", "port": 53, "protocol": "UDP"}]))
    t.on_service("ADDED", None, svc("tcp"))
    t.commit(t.snapshot()[1])
    t.on_endpoint_slice("ADDED", None, slice_("x", service="tcp", eps=[ep("10.244.1.2")]))
    assert not t.snapshot()[1].conntrack_cleanup
    t.on_endpoint_slice("ADDED", None, slice_("d", eps=[ep("10.244.1.4")], ports=[("dns", 53, "UDP")]))
    assert t.snapshot()[1].conntrack_cleanup


def test_slice_relabelled_moves_between_services():
    t = tracker()
    t.on_service("ADDED", None, svc())
    t.on_service("ADDED", None, svc("other"))
    a = slice_("s", eps=[ep("10.244.1.2")])
    t.on_endpoint_slice("ADDED", None, a)
    b = slice_("s", service="other", eps=[ep("10.244.1.2")])
    t.on_endpoint_slice("MODIFIED", a, b)
    assert SPN not in t.endpoints
    assert ServicePortName("default", "other", "http") in t.endpoints


def test_health_check_local_endpoint_counts_and_node_eligibility():
    t = tracker("n1")
    t.on_service("ADDED", None, svc(type="LoadBalancer", externalTrafficPolicy="Local", healthCheckNodePort=32001,
                                    ports=[{"name": "http", "port": 80, "nodePort": 30080}]))
    t.on_endpoint_slice("ADDED", None, slice_("s", eps=[ep("10.244.1.2", "n1"), ep("10.244.2.2", "n2"),
                                                         ep("10.244.1.7", "n1", ready=False, terminating=True)]))
    assert t.local_endpoint_counts() == {("default", "web"): (32001, 1)}
    node = {"metadata": {"name": "n1", "labels": {"topology.kubernetes.io/zone": "a"}},
            "spec": {"taints": [{"key": "ToBeDeletedByClusterAutoscaler", "effect": "NoSchedule"}]},
            "status": {"addresses": [{"type": "InternalIP", "address": "192.168.56.11"}]}}
    t.commit(t.snapshot()[1])
    t.on_node("ADDED", None, node)
    assert not t.node.eligible and t.node.addresses == ("192.168.56.11",)
    assert t.snapshot()[0].full  # a zone label change forces a full sync


def test_topology_hints_narrow_cluster_endpoints():
    t = tracker("n1")
    t.on_service("ADDED", None, svc())
    a = dict(ep("10.244.1.2", "n1"), hints={"forZones": [{"name": "za"}]})
    b = dict(ep("10.244.2.2", "n2"), hints={"forZones": [{"name": "zb"}]})
    t.on_endpoint_slice("ADDED", None, slice_("s", eps=[a, b]))
    state, _ = t.snapshot()
    sp, eps = state.services[SPN], state.endpoints[SPN]
    assert eps[0].zone_hints == ("za",)
    zone_a = {"topology.kubernetes.io/zone": "za"}
    assert [e.ip for e in categorize_endpoints(sp, eps, "n1", zone_a).cluster] == ["10.244.1.2"]
    # no zone label, or a zone no endpoint is hinted for: hints are ignored
    assert len(categorize_endpoints(sp, eps, "n1").cluster) == 2
    assert len(categorize_endpoints(sp, eps, "n1", {"topology.kubernetes.io/zone": "zc"}).cluster) == 2
    # one ready endpoint without hints: hints are ignored altogether
    c = ep("10.244.3.2", "n3")
    t.on_endpoint_slice("MODIFIED", None, slice_("s", eps=[a, b, c]))
    state, _ = t.snapshot()
    assert len(categorize_endpoints(sp, state.endpoints[SPN], "n1", zone_a).cluster) == 3


def test_node_hints_prefer_same_node():
    t = tracker("n2")
    t.on_service("ADDED", None, svc())
    a = dict(ep("10.244.1.2", "n1"), hints={"forNodes": [{"name": "n1"}], "forZones": [{"name": "z"}]})
    b = dict(ep("10.244.2.2", "n2"), hints={"forNodes": [{"name": "n2"}], "forZones": [{"name": "z"}]})
    t.on_endpoint_slice("ADDED", None, slice_("s", eps=[a, b]))
    state, _ = t.snapshot()
    cat = categorize_endpoints(state.services[SPN], state.endpoints[SPN], "n2", {"topology.kubernetes.io/zone": "z"})
    assert [e.ip for e in cat.cluster] == ["10.244.2.2"]


def test_full_sync_forced_during_a_sync_survives_its_commit():
    t = tracker()
    t.on_service("ADDED", None, svc())
    state, tok = t.snapshot()
    assert state.full
    t.force_full_sync()  # e.g. the canary check fired while this full sync was being applied
    t.commit(tok)
    assert t.snapshot()[0].full
    t.commit(t.snapshot()[1])
    assert not t.snapshot()[0].full
