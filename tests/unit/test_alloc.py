import copy
import ipaddress
import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from controlplane.alloc import (
    AllocationFailed,
    Bitmap,
    ClusterIPAllocator,
    NodePortAllocator,
    RangeError,
    RangeFull,
    allocate_service,
    prepare_service_update,
    rebuild,
    release_service,
)

pytestmark = pytest.mark.unit


def svc(name="x", **spec):
    spec.setdefault("ports", [{"port": 80, "protocol": "TCP"}])
    return {"metadata": {"name": name, "namespace": "default"}, "spec": spec}


@pytest.fixture
def allocs():
    return ClusterIPAllocator("10.96.0.0/12", rng=random.Random(1)), NodePortAllocator(rng=random.Random(2))


# ---------------------------------------------------------------- bitmap / allocators


def test_bitmap_padding_never_handed_out():
    bm = Bitmap(70)
    got = []
    while (i := bm.first_free(0, 70)) is not None:
        assert bm.add(i)
        got.append(i)
    assert got == list(range(70))
    assert bm.first_free(0, 70) is None
    bm.discard(65)
    assert bm.first_free(0, 70) == 65


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.booleans(), st.integers(0, 4999)), max_size=300))
def test_bitmap_matches_a_set(ops):
    bm, ref = Bitmap(5000), set()
    for add, i in ops:
        if add:
            assert bm.add(i) == (i not in ref)
            ref.add(i)
        else:
            assert bm.discard(i) == (i in ref)
            ref.discard(i)
        start = i
        want = next((j for j in range(start, 5000) if j not in ref), None)
        assert bm.first_free(start, 5000) == want
    assert bm.count == len(ref)


def test_cluster_ip_range_excludes_network_and_broadcast():
    a = ClusterIPAllocator("10.0.0.0/29", rng=random.Random(0))
    got = {a.allocate_next() for _ in range(5)}
    assert got == {f"10.0.0.{i}" for i in range(2, 7)}  # .1 is the kubernetes Service's
    with pytest.raises(RangeFull):
        a.allocate_next()
    a.allocate("10.0.0.1")
    for bad in ("10.0.0.0", "10.0.0.7", "10.0.1.1"):
        with pytest.raises(RangeError, match="not in the valid range. The range of valid IPs is 10.0.0.0/29"):
            a.allocate(bad)


def test_cluster_ip_specific_conflict_and_release():
    a = ClusterIPAllocator()
    assert a.first_ip() == "10.96.0.1"
    a.allocate("10.96.0.10")
    with pytest.raises(RangeError, match="^provided IP is already allocated$"):
        a.allocate("10.96.0.10")
    a.release("10.96.0.10")
    a.allocate("10.96.0.10")
    assert a.has("10.96.0.10") and not a.has("10.96.0.11")


def test_dynamic_allocation_prefers_upper_band():
    a = ClusterIPAllocator("10.96.0.0/24", rng=random.Random(5))  # 254 usable, static band 16
    first = [a.allocate_next() for _ in range(238)]
    assert all(int(ip.rsplit(".", 1)[1]) > 16 for ip in first)
    # upper band exhausted -> falls back to the static band (never .1), still no duplicates
    rest = [a.allocate_next() for _ in range(15)]
    assert len(set(first + rest)) == 253
    assert all(1 < int(ip.rsplit(".", 1)[1]) <= 16 for ip in rest)
    with pytest.raises(RangeFull):
        a.allocate_next()


def test_ipv6_range():
    a = ClusterIPAllocator("fd00:10:96::/112", rng=random.Random(1))
    ip = a.allocate_next()
    assert ipaddress.ip_address(ip) in ipaddress.ip_network("fd00:10:96::/112")
    with pytest.raises(RangeError):
        a.allocate("10.96.0.1")


def test_node_port_range_full_and_specific():
    p = NodePortAllocator("30000-30009", rng=random.Random(0))
    p.allocate(30005)
    got = {p.allocate_next() for _ in range(9)}
    assert got == set(range(30000, 30010)) - {30005}
    with pytest.raises(RangeFull):
        p.allocate_next()
    with pytest.raises(RangeError, match="^provided port is already allocated$"):
        p.allocate(30001)
    with pytest.raises(RangeError, match="The range of valid ports is 30000-30009"):
        p.allocate(80)


@pytest.mark.parametrize("bad", ["", "abc", "40000-30000", "0-10", "30000-70000"])
def test_bad_ranges_are_value_errors(bad):
    with pytest.raises(ValueError):
        NodePortAllocator(bad)


def test_bad_cidr_is_value_error():
    with pytest.raises(ValueError, match="invalid service CIDR"):
        ClusterIPAllocator("10.96.0.1/12")


@settings(max_examples=40, deadline=None)
@given(st.lists(st.sampled_from(["next", "rel"]), max_size=200), st.integers(0, 2**32))
def test_node_ports_never_double_allocated(ops, seed):
    p = NodePortAllocator("30000-30063", rng=random.Random(seed))
    held: list[int] = []
    rng = random.Random(seed)
    for op in ops:
        if op == "next":
            try:
                port = p.allocate_next()
            except RangeFull:
                assert len(held) == 64
                continue
            assert port not in held and 30000 <= port <= 30063
            held.append(port)
        elif held:
            p.release(held.pop(rng.randrange(len(held))))
    assert p.used == len(held)


def test_many_allocated_still_unique():
    a = ClusterIPAllocator(rng=random.Random(3))
    ips = {a.allocate_next() for _ in range(30000)}
    assert len(ips) == 30000 and a.used == 30000


# ---------------------------------------------------------------- Service transactions


def test_create_clusterip_allocates_ip_no_node_ports(allocs):
    ips, ports = allocs
    s = svc(type="ClusterIP")
    txn = allocate_service(None, s, ips, ports)
    txn.commit()
    ip = s["spec"]["clusterIP"]
    assert s["spec"]["clusterIPs"] == [ip] and ips.has(ip)
    assert "nodePort" not in s["spec"]["ports"][0] and ports.used == 0


def test_create_specific_ip_conflict_is_field_error(allocs):
    ips, ports = allocs
    allocate_service(None, svc(clusterIP="10.96.0.10"), ips, ports).commit()
    with pytest.raises(AllocationFailed) as ei:
        allocate_service(None, svc("y", clusterIP="10.96.0.10"), ips, ports)
    e = ei.value.errors[0]
    assert e.field == "spec.clusterIPs"
    assert e.cause()["message"] == (
        'Invalid value: ["10.96.0.10"]: failed to allocate IP 10.96.0.10: provided IP is already allocated'
    )


def test_nodeport_service_gets_ports_and_conflict_rolls_back_everything(allocs):
    ips, ports = allocs
    a = svc(type="NodePort", ports=[{"port": 80, "protocol": "TCP", "nodePort": 30080}])
    allocate_service(None, a, ips, ports).commit()
    used_ips, used_ports = ips.used, ports.used
    b = svc("b", type="NodePort", ports=[{"name": "a", "port": 81, "protocol": "TCP"},
                                         {"name": "b", "port": 82, "protocol": "TCP", "nodePort": 30080}])
    with pytest.raises(AllocationFailed) as ei:
        allocate_service(None, b, ips, ports)
    assert ei.value.errors[0].summary() == (
        "spec.ports[1].nodePort: Invalid value: 30080: provided port is already allocated"
    )
    # the IP and the first port allocated before the failure were given back
    assert (ips.used, ports.used) == (used_ips, used_ports)


def test_same_node_port_tcp_and_udp_in_one_service(allocs):
    ips, ports = allocs
    s = svc(type="NodePort", ports=[{"name": "t", "port": 53, "protocol": "TCP", "nodePort": 30053},
                                    {"name": "u", "port": 53, "protocol": "UDP", "nodePort": 30053}])
    allocate_service(None, s, ips, ports).commit()
    assert ports.used == 1
    release_service(s, ips, ports)
    assert ports.used == 0 and ips.used == 0


def test_write_failure_revert_frees_allocations(allocs):
    ips, ports = allocs
    s = svc(type="LoadBalancer", externalTrafficPolicy="Local")
    txn = allocate_service(None, s, ips, ports)
    assert s["spec"]["healthCheckNodePort"] and s["spec"]["ports"][0]["nodePort"]
    assert ports.used == 2 and ips.used == 1
    txn.revert()
    assert ports.used == 0 and ips.used == 0


def test_dry_run_allocates_nothing(allocs):
    ips, ports = allocs
    s = svc(type="NodePort")
    allocate_service(None, s, ips, ports, dry_run=True).commit()
    assert s["spec"]["clusterIP"] and s["spec"]["ports"][0]["nodePort"]
    assert ips.used == 0 and ports.used == 0


def test_lb_without_node_ports(allocs):
    ips, ports = allocs
    s = svc(type="LoadBalancer", allocateLoadBalancerNodePorts=False)
    allocate_service(None, s, ips, ports).commit()
    assert "nodePort" not in s["spec"]["ports"][0] and ports.used == 0


def test_headless_and_external_name_take_no_ip(allocs):
    ips, ports = allocs
    h = svc(clusterIP="None")
    allocate_service(None, h, ips, ports).commit()
    assert h["spec"]["clusterIPs"] == ["None"]
    e = svc(type="ExternalName", externalName="example.com")
    allocate_service(None, e, ips, ports).commit()
    assert "clusterIP" not in e["spec"]
    assert ips.used == 0


def test_type_change_nodeport_to_clusterip_releases_ports_on_commit(allocs):
    ips, ports = allocs
    old = svc(type="NodePort")
    allocate_service(None, old, ips, ports).commit()
    np_ = old["spec"]["ports"][0]["nodePort"]
    new = copy.deepcopy(old)
    new["spec"]["type"] = "ClusterIP"
    prepare_service_update(old, new)
    assert "nodePort" not in new["spec"]["ports"][0]  # dropTypeDependentFields
    txn = allocate_service(old, new, ips, ports)
    assert ports.has(np_)  # still held until the write succeeded
    txn.commit()
    assert not ports.has(np_)
    assert new["spec"]["clusterIP"] == old["spec"]["clusterIP"] and ips.used == 1


def test_type_change_failed_write_keeps_old_values(allocs):
    ips, ports = allocs
    old = svc(type="ClusterIP")
    allocate_service(None, old, ips, ports).commit()
    new = copy.deepcopy(old)
    new["spec"]["type"] = "NodePort"
    txn = allocate_service(old, new, ips, ports)
    assert ports.used == 1
    txn.revert()
    assert ports.used == 0 and ips.has(old["spec"]["clusterIP"])


def test_to_external_name_releases_ip_and_back_allocates(allocs):
    ips, ports = allocs
    old = svc()
    allocate_service(None, old, ips, ports).commit()
    ip = old["spec"]["clusterIP"]
    new = copy.deepcopy(old)
    new["spec"].update(type="ExternalName", externalName="db.example.com")
    prepare_service_update(old, new)
    assert "clusterIP" not in new["spec"] and "clusterIPs" not in new["spec"]
    allocate_service(old, new, ips, ports).commit()
    assert not ips.has(ip) and ips.used == 0
    back = copy.deepcopy(new)
    back["spec"]["type"] = "ClusterIP"
    back["spec"].pop("externalName")
    prepare_service_update(new, back)
    allocate_service(new, back, ips, ports).commit()
    assert ips.has(back["spec"]["clusterIP"])


def test_replace_without_allocated_values_carries_them_over(allocs):
    ips, ports = allocs
    old = svc(type="NodePort", ports=[{"name": "http", "port": 80, "protocol": "TCP"}])
    allocate_service(None, old, ips, ports).commit()
    new = svc(type="NodePort", ports=[{"name": "http", "port": 8080, "protocol": "TCP"}])
    prepare_service_update(old, new)
    assert new["spec"]["clusterIP"] == old["spec"]["clusterIP"]
    assert new["spec"]["ports"][0]["nodePort"] == old["spec"]["ports"][0]["nodePort"]
    allocate_service(old, new, ips, ports).commit()
    assert ports.used == 1


def test_etp_local_hc_port_released_when_policy_changes(allocs):
    ips, ports = allocs
    old = svc(type="LoadBalancer", externalTrafficPolicy="Local")
    allocate_service(None, old, ips, ports).commit()
    hc = old["spec"]["healthCheckNodePort"]
    new = copy.deepcopy(old)
    new["spec"]["externalTrafficPolicy"] = "Cluster"
    prepare_service_update(old, new)
    assert "healthCheckNodePort" not in new["spec"]
    allocate_service(old, new, ips, ports).commit()
    assert not ports.has(hc) and ports.used == 1


def test_rebuild_from_stored_services():
    ips, ports = ClusterIPAllocator(), NodePortAllocator()
    stored = [
        svc("a", clusterIP="10.96.0.1", clusterIPs=["10.96.0.1"]),
        svc("b", type="NodePort", clusterIP="10.96.5.5", ports=[{"port": 80, "nodePort": 30001}]),
        svc("c", clusterIP="10.96.5.5"),  # duplicate
        svc("d", clusterIP="192.168.0.1"),  # out of range
        svc("e", clusterIP="None"),
        svc("f", type="ExternalName", externalName="x.example"),
    ]
    warnings = rebuild(ips, ports, stored)
    assert ips.has("10.96.0.1") and ips.has("10.96.5.5") and ports.has(30001)
    assert ips.used == 2 and ports.used == 1
    assert any("more than one" in w and "default/c" in w for w in warnings)
    assert any("not within 10.96.0.0/12" in w for w in warnings)


def test_changing_only_cluster_ip_is_normalized_into_cluster_ips(allocs):
    ips, ports = allocs
    old = svc(clusterIP="10.96.0.20", clusterIPs=["10.96.0.20"])
    new = copy.deepcopy(old)
    new["spec"]["clusterIP"] = "10.96.0.21"  # e.g. a JSON patch of /spec/clusterIP only
    prepare_service_update(old, new)
    assert new["spec"]["clusterIPs"] == ["10.96.0.21"]  # so validation reports "may not change once set"
    cleared = copy.deepcopy(old)
    cleared["spec"]["clusterIP"] = ""
    prepare_service_update(old, cleared)  # old clients clearing the singular field: carried over
    assert cleared["spec"]["clusterIP"] == "10.96.0.20" and cleared["spec"]["clusterIPs"] == ["10.96.0.20"]
