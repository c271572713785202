import copy

import pytest

from controlplane.defaults import apply_defaults
from controlplane.fielderrors import summary_message
from controlplane.validation import validate_create, validate_status_update, validate_update

pytestmark = pytest.mark.unit


def svc(name="x", **spec):
    s = {"apiVersion": "v1", "kind": "Service", "metadata": {"name": name, "namespace": "default"}, "spec": spec}
    apply_defaults("Service", s)
    return s


def msgs(errs):
    return [e.summary() for e in errs]


def test_valid_services():
    for s in (
        svc(ports=[{"port": 80, "targetPort": 8080}], selector={"app": "x"}),
        svc(type="NodePort", ports=[{"name": "a", "port": 80, "nodePort": 30080}, {"name": "b", "port": 80, "protocol": "UDP"}]),
        svc(type="LoadBalancer", externalTrafficPolicy="Local", ports=[{"port": 443, "targetPort": "https"}]),
        svc(type="ExternalName", externalName="db.example.com."),
        svc(clusterIP="None"),
        svc(clusterIP="10.96.0.10", ports=[{"port": 53, "protocol": "UDP"}], sessionAffinity="ClientIP"),
    ):
        assert validate_create("Service", s) == [], s


def test_service_name_is_dns1035():
    s = svc("1abc", ports=[{"port": 80}])
    (e,) = validate_create("Service", s)
    assert e.field == "metadata.name" and "DNS-1035 label" in e.body()
    assert e.body().startswith('Invalid value: "1abc": a DNS-1035 label must consist')


def test_port_rules():
    s = svc(ports=[{"port": 0}, {"name": "http", "port": 70000, "protocol": "FOO"}, {"name": "http", "port": 81}])
    assert msgs(validate_create("Service", s)) == [
        "spec.ports[0].name: Required value",
        "spec.ports[0].port: Invalid value: 0: must be between 1 and 65535, inclusive",
        # targetPort was defaulted from port, so it is as bad (upstream says so too)
        "spec.ports[0].targetPort: Invalid value: 0: must be between 1 and 65535, inclusive",
        "spec.ports[1].port: Invalid value: 70000: must be between 1 and 65535, inclusive",
        'spec.ports[1].protocol: Unsupported value: "FOO": supported values: "SCTP", "TCP", "UDP"',
        "spec.ports[1].targetPort: Invalid value: 70000: must be between 1 and 65535, inclusive",
        'spec.ports[2].name: Duplicate value: "http"',
    ]


def test_single_port_needs_no_name_but_ports_required():
    assert validate_create("Service", svc(ports=[{"port": 80}])) == []
    assert msgs(validate_create("Service", svc())) == ["spec.ports: Required value"]


def test_duplicate_port_protocol():
    s = svc(ports=[{"name": "a", "port": 80}, {"name": "b", "port": 80}])
    assert msgs(validate_create("Service", s)) == ['spec.ports[1]: Duplicate value: {"port":80,"protocol":"TCP"}']


def test_node_port_forbidden_for_cluster_ip():
    s = svc(ports=[{"port": 80, "nodePort": 30001}])
    assert msgs(validate_create("Service", s)) == [
        "spec.ports[0].nodePort: Forbidden: may not be used when `type` is 'ClusterIP'"]


def test_bad_cluster_ip_and_headless_nodeport():
    assert msgs(validate_create("Service", svc(clusterIP="10.96.0.300", ports=[{"port": 80}]))) == [
        'spec.clusterIPs[0]: Invalid value: "10.96.0.300": must be empty, \'None\', or a valid IP address']
    s = svc(type="NodePort", clusterIP="None", ports=[{"port": 80}])
    assert 'spec.clusterIPs[0]: Invalid value: "None": may not be set to \'None\' for NodePort services' in msgs(
        validate_create("Service", s))


def test_external_name_rules():
    s = svc(type="ExternalName")
    assert msgs(validate_create("Service", s)) == ["spec.externalName: Required value"]
    s = svc(type="ExternalName", externalName="db.example.com", clusterIP="10.96.0.5")
    assert "spec.clusterIPs: Forbidden: may not be set for ExternalName services" in msgs(validate_create("Service", s))
    s = svc(type="ExternalName", externalName="Not_A_Name")
    assert msgs(validate_create("Service", s))[0].startswith('spec.externalName: Invalid value: "Not_A_Name"')


def test_session_affinity_timeout_and_type():
    s = svc(ports=[{"port": 80}], sessionAffinity="ClientIP", sessionAffinityConfig={"clientIP": {"timeoutSeconds": 86401}})
    assert msgs(validate_create("Service", s)) == [
        "spec.sessionAffinityConfig.clientIP.timeoutSeconds: Invalid value: 86401: must be greater than 0 and less than 86400"]
    s = svc(ports=[{"port": 80}], sessionAffinity="Sticky")
    assert msgs(validate_create("Service", s)) == [
        'spec.sessionAffinity: Unsupported value: "Sticky": supported values: "ClientIP", "None"']
    s = svc(ports=[{"port": 80}], type="Magic")
    assert 'spec.type: Unsupported value: "Magic": supported values: "ClusterIP", "ExternalName", "LoadBalancer", "NodePort"' in msgs(
        validate_create("Service", s))


def test_traffic_policies():
    s = svc(ports=[{"port": 80}], externalTrafficPolicy="Local")
    assert msgs(validate_create("Service", s)) == [
        'spec.externalTrafficPolicy: Invalid value: "Local": may only be set for externally-accessible services']
    s = svc(ports=[{"port": 80}], externalTrafficPolicy="Local", externalIPs=["192.168.56.200"])
    assert validate_create("Service", s) == []
    s = svc(type="NodePort", ports=[{"port": 80}], internalTrafficPolicy="Nope")
    assert msgs(validate_create("Service", s)) == [
        'spec.internalTrafficPolicy: Unsupported value: "Nope": supported values: "Cluster", "Local"']
    s = svc(type="NodePort", ports=[{"port": 80}], healthCheckNodePort=30100)
    assert "may only be set when `type` is 'LoadBalancer' and `externalTrafficPolicy` is 'Local'" in msgs(
        validate_create("Service", s))[0]


def test_dual_stack_rejected_on_single_stack_cluster():
    s = svc(ports=[{"port": 80}], ipFamilyPolicy="RequireDualStack")
    assert "spec.ipFamilyPolicy: Invalid value: \"RequireDualStack\": this cluster is not configured for dual-stack services" in msgs(
        validate_create("Service", s))
    assert validate_create("Service", s, ip_families=("IPv4", "IPv6")) == []
    s = svc(ports=[{"port": 80}], ipFamilies=["IPv6"])
    assert msgs(validate_create("Service", s)) == ['spec.ipFamilies[0]: Invalid value: "IPv6": not configured on this cluster']


def test_selector_labels_checked():
    s = svc(ports=[{"port": 80}], selector={"app": "bad value"})
    (e,) = validate_create("Service", s)
    assert e.field == "spec.selector" and "a valid label must be an empty string" in e.body()


def test_cluster_ip_immutable_except_external_name():
    old = svc(clusterIP="10.96.0.10", ports=[{"port": 80}])
    new = copy.deepcopy(old)
    new["spec"]["clusterIP"] = "10.96.0.11"
    new["spec"]["clusterIPs"] = ["10.96.0.11"]
    errs = validate_update("Service", new, old)
    assert msgs(errs) == ['spec.clusterIPs[0]: Invalid value: ["10.96.0.11"]: may not change once set']
    assert summary_message("Service", "x", errs) == (
        'Service "x" is invalid: spec.clusterIPs[0]: Invalid value: ["10.96.0.11"]: may not change once set')
    ext = svc(type="ExternalName", externalName="a.example")
    back = svc(clusterIP="10.96.0.12", ports=[{"port": 80}])
    assert validate_update("Service", back, ext) == []


def test_metadata_immutable_on_update():
    old = svc(ports=[{"port": 80}])
    old["metadata"]["uid"] = "u1"
    new = copy.deepcopy(old)
    new["metadata"]["uid"] = "u2"
    assert msgs(validate_update("Service", new, old)) == ['metadata.uid: Invalid value: "u2": field is immutable']


def test_metadata_rules():
    s = svc(ports=[{"port": 80}])
    s["metadata"] = {"generateName": "web-", "namespace": "default", "labels": {"a/b/c": "x"},
                     "finalizers": ["example.com/f", "example.com/f"]}
    m = msgs(validate_create("Service", s))
    assert m[0].startswith('metadata.labels: Invalid value: "a/b/c": a qualified name must consist')
    assert m[1] == 'metadata.finalizers[1]: Duplicate value: "example.com/f"'
    s["metadata"] = {"namespace": "default"}
    assert msgs(validate_create("Service", s)) == ["metadata.name: Required value: name or generateName is required"]
    s["metadata"] = {"name": "x"}
    assert msgs(validate_create("Service", s)) == ["metadata.namespace: Required value"]


# ---------------------------------------------------------------- EndpointSlice


def es(**kw):
    o = {"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
         "metadata": {"name": "x-abc12", "namespace": "default", "labels": {"kubernetes.io/service-name": "x"}},
         "addressType": "IPv4", "endpoints": [{"addresses": ["10.244.1.5"], "conditions": {"ready": True}}],
         "ports": [{"name": "http", "port": 8080, "protocol": "TCP"}]}
    o.update(kw)
    return o


def test_endpointslice_valid_and_empty():
    assert validate_create("EndpointSlice", es()) == []
    assert validate_create("EndpointSlice", es(endpoints=None, ports=None)) == []


def test_endpointslice_address_rules():
    e = es(endpoints=[{"addresses": ["10.0.0.1", "fd00::1", "127.0.0.1"]}, {"addresses": []}])
    assert msgs(validate_create("EndpointSlice", e)) == [
        'endpoints[0].addresses[1]: Invalid value: "fd00::1": must be a valid IPv4 address',
        'endpoints[0].addresses[2]: Invalid value: "127.0.0.1": may not be in the loopback range (127.0.0.0/8, ::1/128)',
        "endpoints[1].addresses: Required value: must contain at least 1 address",
    ]
    assert validate_create("EndpointSlice", es(addressType="IPv6", endpoints=[{"addresses": ["fd00::5"]}])) == []
    assert validate_create("EndpointSlice", es(addressType="FQDN", endpoints=[{"addresses": ["a.example.com"]}])) == []
    assert msgs(validate_create("EndpointSlice", es(addressType="IPv5"))) == [
        'addressType: Unsupported value: "IPv5": supported values: "FQDN", "IPv4", "IPv6"']


def test_endpointslice_limits_and_ports():
    many = es(endpoints=[{"addresses": [f"10.0.{i // 250}.{i % 250 + 1}"]} for i in range(1001)])
    assert msgs(validate_create("EndpointSlice", many)) == ["endpoints: Too many: 1001: must have at most 1000 items"]
    e = es(ports=[{"name": "http", "port": 80, "protocol": "TCP"}, {"name": "http", "port": 81}, {"name": "b", "port": 0, "protocol": "ICMP"}])
    assert msgs(validate_create("EndpointSlice", e)) == [
        'ports[1].name: Duplicate value: "http"',
        "ports[1].protocol: Required value",
        'ports[2].protocol: Unsupported value: "ICMP": supported values: "SCTP", "TCP", "UDP"',
        "ports[2].port: Invalid value: 0: must be between 1 and 65535, inclusive",
    ]


def test_endpointslice_address_type_immutable():
    old = es()
    new = es(addressType="IPv6", endpoints=[])
    assert msgs(validate_update("EndpointSlice", new, old)) == ['addressType: Invalid value: "IPv6": field is immutable']


# ---------------------------------------------------------------- Pod / Node / Namespace


def pod(*containers, **spec):
    p = {"metadata": {"name": "p1", "namespace": "default"}, "spec": {"containers": list(containers), **spec}}
    apply_defaults("Pod", p)
    return p


def test_pod_rules():
    assert validate_create("Pod", pod({"name": "a", "image": "kpx/echo"})) == []
    assert msgs(validate_create("Pod", pod())) == ["spec.containers: Required value"]
    p = pod({"name": "a", "image": "x:1"}, {"name": "a", "image": ""}, restartPolicy="Sometimes")
    m = msgs(validate_create("Pod", p))
    assert 'spec.containers[1].name: Duplicate value: "a"' in m
    assert "spec.containers[1].image: Required value" in m
    assert 'spec.restartPolicy: Unsupported value: "Sometimes": supported values: "Always", "Never", "OnFailure"' in m
    p = pod({"name": "a", "image": "x:1", "ports": [{"containerPort": 0, "name": "HTTP"}]})
    m = msgs(validate_create("Pod", p))
    assert "spec.containers[0].ports[0].containerPort: Invalid value: 0: must be between 1 and 65535, inclusive" in m
    assert any(x.startswith('spec.containers[0].ports[0].name: Invalid value: "HTTP"') for x in m)


def test_pod_update_spec_mostly_immutable():
    old = pod({"name": "a", "image": "x:1"})
    new = copy.deepcopy(old)
    new["spec"]["containers"][0]["image"] = "x:2"
    new["spec"]["tolerations"].append({"key": "k", "operator": "Exists"})  # additions are allowed
    assert validate_update("Pod", new, old) == []
    dropped = copy.deepcopy(new)
    dropped["spec"]["tolerations"] = dropped["spec"]["tolerations"][1:]
    assert msgs(validate_update("Pod", dropped, old)) == [
        "spec.tolerations: Forbidden: existing toleration can not be modified except its tolerationSeconds"]
    new["spec"]["restartPolicy"] = "Never"
    (e,) = validate_update("Pod", new, old)
    assert e.field == "spec" and e.body().startswith("Forbidden: pod updates may not change fields other than")
    assert "restartPolicy" in e.body()


def test_node_and_namespace():
    n = {"metadata": {"name": "node1"}, "spec": {"podCIDR": "10.244.1.0/24", "podCIDRs": ["10.244.1.0/24"],
                                                 "taints": [{"key": "k", "effect": "NoFun"}]}}
    assert msgs(validate_create("Node", n)) == [
        'spec.taints[0].effect: Unsupported value: "NoFun": supported values: "NoExecute", "NoSchedule", "PreferNoSchedule"']
    n2 = copy.deepcopy(n)
    n2["spec"]["taints"] = []
    n2["spec"]["podCIDRs"] = n2["spec"]["podCIDR"] = "10.244.2.0/24"
    n2["spec"]["podCIDRs"] = ["10.244.2.0/24"]
    assert msgs(validate_update("Node", n2, n)) == [
        'spec.podCIDRs: Forbidden: node updates may not change podCIDR except from "" to valid']
    ns = {"metadata": {"name": "Team_A"}}
    apply_defaults("Namespace", ns)
    (first, *_) = validate_create("Namespace", ns)
    assert first.field == "metadata.name" and "RFC 1123 label" in first.body()
    ok = {"metadata": {"name": "team-a", "namespace": ""}}
    apply_defaults("Namespace", ok)
    assert validate_create("Namespace", ok) == []
    bad = {"metadata": {"name": "n1", "namespace": "default"}}
    assert msgs(validate_create("Node", bad)) == ["metadata.namespace: Forbidden: not allowed on this type"]


def test_status_update_rules():
    p = pod({"name": "a", "image": "x:1"})
    p2 = copy.deepcopy(p)
    p2["status"] = {"phase": "Dancing", "podIP": "10.244.1.300"}
    assert validate_update("Pod", p2, p, subresource="status") == validate_status_update("Pod", p2, p)
    assert msgs(validate_status_update("Pod", p2, p)) == [
        'status.phase: Unsupported value: "Dancing": supported values: "Failed", "Pending", "Running", "Succeeded", "Unknown"',
        'status.podIP: Invalid value: "10.244.1.300": must be a valid IP address',
    ]


def test_cause_wire_form():
    (e,) = validate_create("Service", svc(ports=[{"port": 0, "targetPort": 80}]))
    assert e.cause() == {"reason": "FieldValueInvalid", "message": "Invalid value: 0: must be between 1 and 65535, inclusive",
                         "field": "spec.ports[0].port"}


def test_affinity_config_forbidden_with_none_and_external_name_left_over_is_fine():
    s = svc(ports=[{"port": 80}], sessionAffinityConfig={"clientIP": {"timeoutSeconds": 5}})
    assert msgs(validate_create("Service", s)) == [
        "spec.sessionAffinityConfig: Forbidden: must not be set when session affinity is None"]
    # `kubectl patch -p '{"spec":{"type":"ClusterIP"}}'` on an ExternalName Service leaves externalName: upstream ignores it
    s = svc(ports=[{"port": 80}], externalName="db.example.com")
    assert validate_create("Service", s) == []


def test_pod_probes():
    ok = pod({"name": "a", "image": "kpx/http", "readinessProbe": {"httpGet": {"port": 8080, "path": "/"}},
              "livenessProbe": {"tcpSocket": {"port": "http"}}, "startupProbe": {"exec": {"command": ["true"]}}})
    assert validate_create("Pod", ok) == []
    bad = pod({"name": "a", "image": "x:1",
               "readinessProbe": {"periodSeconds": -1},
               "livenessProbe": {"tcpSocket": {"port": 0}, "httpGet": {"port": 80}, "successThreshold": 2},
               "startupProbe": {"exec": {}}})
    assert msgs(validate_create("Pod", bad)) == [
        "spec.containers[0].readinessProbe: Required value: must specify a handler type",
        "spec.containers[0].readinessProbe.periodSeconds: Invalid value: -1: must be greater than or equal to 0",
        "spec.containers[0].livenessProbe.tcpSocket: Forbidden: may not specify more than 1 handler type",
        "spec.containers[0].livenessProbe.successThreshold: Invalid value: 2: must be 1",
        "spec.containers[0].livenessProbe.tcpSocket.port: Invalid value: 0: must be between 1 and 65535, inclusive",
        "spec.containers[0].startupProbe.exec.command: Required value",
    ]
