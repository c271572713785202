import json

import pytest

from controlplane import schema
from controlplane.fieldvalidation import (
    check,
    decode_message,
    duplicate_fields,
    prune,
    strict_message,
    type_errors,
    unknown_fields,
)

pytestmark = pytest.mark.unit


def svc(**spec):
    return {"apiVersion": "v1", "kind": "Service", "metadata": {"name": "x", "namespace": "default", "labels": {"a": "b"}},
            "spec": {"ports": [{"port": 80, "targetPort": "http"}], **spec}}


def test_known_objects_have_no_problems():
    pod = {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "p", "annotations": {"x": "y"}, "managedFields": [
        {"manager": "k", "operation": "Apply", "fieldsType": "FieldsV1", "fieldsV1": {"f:spec": {}}}]},
           "spec": {"containers": [{"name": "c", "image": "kpx/echo", "ports": [{"containerPort": 8080}],
                                    "readinessProbe": {"tcpSocket": {"port": 8080}, "periodSeconds": 1},
                                    "resources": {"limits": {"cpu": "1"}}}],
                    "nodeName": "n1", "affinity": {"nodeAffinity": {}}},
           "status": {"phase": "Running", "podIPs": [{"ip": "10.244.1.2"}], "conditions": [{"type": "Ready", "status": "True"}]}}
    es = {"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice", "metadata": {"name": "e"}, "addressType": "IPv4",
          "endpoints": [{"addresses": ["10.0.0.1"], "conditions": {"ready": True, "serving": True, "terminating": False},
                         "nodeName": "n1", "zone": "z", "targetRef": {"kind": "Pod", "name": "p"}, "hints": {"forZones": [{"name": "z"}]}}],
          "ports": [{"name": "", "port": 80, "protocol": "TCP", "appProtocol": "http"}]}
    node = {"apiVersion": "v1", "kind": "Node", "metadata": {"name": "n"}, "spec": {"podCIDR": "10.244.1.0/24", "taints": []},
            "status": {"addresses": [{"type": "InternalIP", "address": "192.168.56.11"}], "capacity": {"cpu": "2"},
                       "nodeInfo": {"kubeletVersion": "v1.33.0"}}}
    ns = {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "n"}, "spec": {"finalizers": ["kubernetes"]},
          "status": {"phase": "Active"}}
    full_svc = svc(type="LoadBalancer", externalTrafficPolicy="Local", healthCheckNodePort=30001, sessionAffinity="ClientIP",
                   sessionAffinityConfig={"clientIP": {"timeoutSeconds": 5}}, ipFamilies=["IPv4"], ipFamilyPolicy="SingleStack",
                   internalTrafficPolicy="Cluster", allocateLoadBalancerNodePorts=True, clusterIPs=["10.96.0.1"],
                   trafficDistribution="PreferClose")
    full_svc["status"] = {"loadBalancer": {"ingress": [{"ip": "1.2.3.4"}]}}
    for kind, obj in [("Pod", pod), ("EndpointSlice", es), ("Node", node), ("Namespace", ns), ("Service", full_svc)]:
        assert unknown_fields(kind, obj) == [], kind
        assert type_errors(kind, obj) == [], kind


def test_unknown_fields_with_paths_and_pruning():
    s = svc(foo=1)
    s["spec"]["ports"][0]["bogus"] = True
    s["metadata"]["nmae"] = "typo"
    s["extra"] = {}
    problems = check("Service", s)
    # in the body's key order, as the decoder meets them
    assert [str(p) for p in problems] == [
        'unknown field "metadata.nmae"', 'unknown field "spec.ports[0].bogus"', 'unknown field "spec.foo"',
        'unknown field "extra"']
    # pruned in place: what gets stored is upstream's typed view
    assert "foo" not in s["spec"] and "bogus" not in s["spec"]["ports"][0] and "extra" not in s
    assert s["metadata"]["labels"] == {"a": "b"}  # map keys are never "unknown"
    assert strict_message("Service", problems[:1]) == (
        'Service in version "v1" cannot be handled as a Service: strict decoding error: unknown field "metadata.nmae"')


def test_prune_only():
    s = svc(foo=1)
    prune("Service", s)
    assert "foo" not in s["spec"]


def test_prune_keeps_strategic_merge_directives():
    """kubectl apply under fieldValidation=Ignore (kubectl 1.27) sends its 3-way SMP: pruning it must
    not drop $setElementOrder / $patch, or the patch silently stops deleting and ordering."""
    body = {"spec": {"$setElementOrder/ports": [{"port": 9090}, {"port": 80}], "bogus": 1,
                     "ports": [{"name": "metrics", "port": 9090}, {"$patch": "delete", "port": 443}]},
            "metadata": {"$deleteFromPrimitiveList/finalizers": ["a"]}}
    prune("Service", body)
    assert body == {"spec": {"$setElementOrder/ports": [{"port": 9090}, {"port": 80}],
                             "ports": [{"name": "metrics", "port": 9090}, {"$patch": "delete", "port": 443}]},
                    "metadata": {"$deleteFromPrimitiveList/finalizers": ["a"]}}
    full = {"spec": {"$patch": "x", "type": "ClusterIP"}}
    prune("Service", full, patch_type="")
    assert full == {"spec": {"type": "ClusterIP"}}


def test_duplicate_fields_json_and_yaml():
    raw = b'{"apiVersion":"v1","kind":"Service","metadata":{"name":"x","name":"y"},"spec":{"ports":[{"port":80,"port":81}]}}'
    assert [str(p) for p in duplicate_fields(raw)] == ['duplicate field "metadata.name"', 'duplicate field "spec.ports[0].port"']
    yml = "apiVersion: v1\nkind: Service\nspec:\n  type: ClusterIP\n  type: NodePort\n"
    assert [str(p) for p in duplicate_fields(yml)] == ['duplicate field "spec.type"']
    assert duplicate_fields(json.dumps(svc()).encode()) == []
    assert duplicate_fields(b"") == []


def test_strict_check_on_kubectl_create_body():
    body = b'{"apiVersion":"v1","kind":"Service","metadata":{"labels":{"app":"x"},"name":"x","namespace":"default"},' \
           b'"spec":{"ports":[{"port":80,"targetPort":8080}],"selector":{"app":"x"},"selectr":{}}}'
    problems = check("Service", json.loads(body), raw=body)
    assert [str(p) for p in problems] == ['unknown field "spec.selectr"']


def test_type_errors():
    s = svc()
    s["spec"]["ports"][0]["port"] = "80"
    s["spec"]["selector"] = ["a"]
    errs = type_errors("Service", s)
    assert errs[0] == "json: cannot unmarshal string into Go struct field ServicePort.spec.ports.port of type int32"
    assert "map[string]string" in errs[1]
    assert decode_message("Service", errs[0]).startswith('Service in version "v1" cannot be handled as a Service: json:')


def test_openapi_schemas_expose_list_semantics():
    d = schema.openapi_schemas()
    svc_spec = d["io.k8s.api.core.v1.ServiceSpec"]["properties"]
    assert svc_spec["ports"]["x-kubernetes-list-map-keys"] == ["port", "protocol"]
    assert svc_spec["ports"]["x-kubernetes-patch-merge-key"] == "port"
    assert d["io.k8s.api.core.v1.Service"]["x-kubernetes-group-version-kind"] == [{"group": "", "version": "v1", "kind": "Service"}]
    assert "io.k8s.api.discovery.v1.EndpointSlice" in d
    assert "io.k8s.apimachinery.pkg.apis.meta.v1.ObjectMeta" in d


def test_strategic_patch_body_directives_are_not_unknown_fields():
    import copy
    from pathlib import Path

    payloads = json.loads((Path(__file__).parent / "data" / "kubectl_payloads.json").read_text())
    for key, kind in (("csa_service@1.33", "Service"), ("csa_pod@1.27", "Pod"), ("patch_service_smp@1.33", "Service")):
        raw = payloads[key]["body"].encode()
        body = json.loads(raw)
        before = copy.deepcopy(body)
        assert check(kind, body, raw=raw, patch_type="strategic") == [], key
        assert body == before
    body = {"spec": {"$setElementOrder/ports": [{"port": 80}], "ports": [{"port": 80, "bogus": 1}]}}
    assert [str(p) for p in check("Service", body, patch_type="strategic")] == ['unknown field "spec.ports[0].bogus"']
    # in a full object (create/update) a "$" key is just unknown
    assert check("Service", {"spec": {"$patch": "x"}}) != []
