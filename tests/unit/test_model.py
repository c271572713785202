import pytest

from proxy.model import (
    Endpoint,
    ServicePort,
    ServicePortName,
    categorize_endpoints,
    endpoint_hash,
    port_proto_hash,
)

pytestmark = pytest.mark.unit


def test_port_proto_hash_matches_upstream_vector():
    # KEP-3866 / iptables proxier unit tests: ns4/svc4:p80 tcp -> KUBE-SVC-4SW47YFZTEDKD3PK
    assert "KUBE-SVC-" + port_proto_hash(ServicePortName("ns4", "svc4", "p80", "TCP")) == "KUBE-SVC-4SW47YFZTEDKD3PK"


def test_service_port_name_string_forms():
    assert str(ServicePortName("ns", "svc", "http")) == "ns/svc:http"
    assert str(ServicePortName("ns", "svc", "")) == "ns/svc"


def test_endpoint_hash_depends_on_endpoint():
    spn = ServicePortName("ns", "svc", "p")
    assert endpoint_hash(spn, "10.0.0.1:80") != endpoint_hash(spn, "10.0.0.2:80")
    assert len(endpoint_hash(spn, "10.0.0.1:80")) == 16


def _svc(**kw):
    return ServicePort(name=ServicePortName("ns", "s", "p"), cluster_ip="10.96.0.10", port=80, **kw)


def test_terminating_fallback_only_when_no_ready():
    ready = Endpoint("10.244.1.2", 8080, node_name="n1")
    term = Endpoint("10.244.1.3", 8080, ready=False, serving=True, terminating=True, node_name="n1")
    gone = Endpoint("10.244.1.4", 8080, ready=False, serving=False, terminating=True, node_name="n1")
    assert categorize_endpoints(_svc(), [ready, term, gone], "n1").cluster == (ready,)
    assert categorize_endpoints(_svc(), [term, gone], "n1").cluster == (term,)
    c = categorize_endpoints(_svc(), [gone], "n1")
    # upstream's hasAnyEndpoints counts only usable endpoints: a non-serving one means REJECT
    assert c.cluster == () and not c.has_any
    assert categorize_endpoints(_svc(internal_policy_local=True), [term], "n2").has_any


def test_local_policy_uses_only_this_nodes_endpoints():
    a = Endpoint("10.244.1.2", 8080, node_name="n1")
    b = Endpoint("10.244.2.2", 8080, node_name="n2")
    c = categorize_endpoints(_svc(internal_policy_local=True), [a, b], "n2")
    assert c.local == (b,) and c.cluster == () and c.all_reachable == (b,)
    c = categorize_endpoints(_svc(node_port=30080, external_policy_local=True), [a, b], "n1")
    assert c.cluster == (a, b) and c.local == (a,) and set(c.all_reachable) == {a, b}
