import copy

import pytest

from controlplane.alloc import ClusterIPAllocator, NodePortAllocator, allocate_service
from controlplane.bootstrap import bootstrap_objects, endpointslice_differs, kubernetes_endpointslice
from controlplane.defaults import apply_defaults
from controlplane.fieldvalidation import check
from controlplane.validation import validate_create

pytestmark = pytest.mark.unit


def test_bootstrap_objects_pass_the_write_pipeline():
    ips, ports = ClusterIPAllocator("10.96.0.0/12"), NodePortAllocator()
    objs = bootstrap_objects(ips.first_ip(), "192.168.56.1", 6443)
    assert [(k, o["metadata"]["name"]) for k, o in objs] == [
        ("Namespace", "default"), ("Namespace", "kube-system"), ("Namespace", "kube-public"),
        ("Namespace", "kube-node-lease"), ("Service", "kubernetes"), ("EndpointSlice", "kubernetes")]
    for kind, obj in objs:
        obj = copy.deepcopy(obj)
        assert check(kind, obj) == []
        apply_defaults(kind, obj)
        assert validate_create(kind, obj) == [], (kind, obj)
        if kind == "Service":
            allocate_service(None, obj, ips, ports).commit()
            assert obj["spec"]["clusterIP"] == "10.96.0.1" and ips.has("10.96.0.1")
            assert obj["spec"]["ports"] == [{"name": "https", "protocol": "TCP", "port": 443, "targetPort": 6443}]
            assert obj["metadata"]["labels"] == {"component": "apiserver", "provider": "kubernetes"}
            assert "selector" not in obj["spec"]
        if kind == "EndpointSlice":
            assert obj["metadata"]["labels"] == {"kubernetes.io/service-name": "kubernetes"}
            assert obj["endpoints"][0]["addresses"] == ["192.168.56.1"]
            assert obj["ports"] == [{"name": "https", "port": 6443, "protocol": "TCP"}]


def test_loopback_advertise_address_is_rejected_like_upstream():
    es = kubernetes_endpointslice("127.0.0.1")
    apply_defaults("EndpointSlice", es)
    (err,) = validate_create("EndpointSlice", es)
    assert "loopback" in err.body()


def test_ipv6_and_reconcile_diff():
    want6 = kubernetes_endpointslice("fd00::1", 6443)
    assert want6["addressType"] == "IPv6"
    want = kubernetes_endpointslice("192.168.56.1", 6443)
    assert endpointslice_differs(None, want)
    cur = copy.deepcopy(want)
    cur["metadata"]["resourceVersion"] = "7"
    assert not endpointslice_differs(cur, want)
    assert endpointslice_differs(cur, kubernetes_endpointslice("192.168.56.2", 6443))
    assert endpointslice_differs(cur, kubernetes_endpointslice("192.168.56.1", 7443))
