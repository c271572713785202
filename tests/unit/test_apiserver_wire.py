"""Pure pieces of the apiserver's wire format: URL parsing, continue tokens, Status errors, tables,
discovery, the OpenAPI stub, protobuf decoding, Event shape conversion."""

import json

import orjson
import pytest

from controlplane import discovery, errors, eventconv, openapi, paging, protobuf, resources, tables
from controlplane.errors import ApiError
from controlplane.handlers import parse_resource_path

pytestmark = pytest.mark.unit


@pytest.mark.parametrize("path,want", [
    ("/api/v1/namespaces", ("namespaces", None, "", "")),
    ("/api/v1/namespaces/default", ("namespaces", None, "default", "")),
    ("/api/v1/namespaces/default/status", ("namespaces", None, "default", "status")),
    ("/api/v1/namespaces/default/finalize", ("namespaces", None, "default", "finalize")),
    ("/api/v1/namespaces/default/services", ("services", "default", "", "")),
    ("/api/v1/namespaces/default/services/web", ("services", "default", "web", "")),
    ("/api/v1/namespaces/default/pods/p/binding", ("pods", "default", "p", "binding")),
    ("/api/v1/services", ("services", None, "", "")),
    ("/api/v1/nodes/n1/status", ("nodes", None, "n1", "status")),
    ("/apis/discovery.k8s.io/v1/namespaces/x/endpointslices/e", ("endpointslices", "x", "e", "")),
    ("/apis/events.k8s.io/v1/events", ("events", None, "", "")),
])
def test_resource_paths(path, want):
    t = parse_resource_path(path)
    assert t is not None
    assert (t.res.resource, t.namespace, t.name, t.subresource) == want


@pytest.mark.parametrize("path", ["/api/v1/frobs", "/api/v1/namespaces/x/nodes", "/api/v1/services/web",
                                  "/api/v1/namespaces/d/services/web/scale", "/apis/apps/v1/deployments",
                                  "/api/v1/namespaces/d/services/a/b/c", "/api", "/apis/discovery.k8s.io/v1"])
def test_non_resource_paths(path):
    assert parse_resource_path(path) is None


def test_continue_tokens_round_trip_and_reject_garbage():
    tok = paging.encode(42, "/registry/services/default/web")
    back = paging.decode(tok)
    assert (back.rv, back.start_after) == (42, "/registry/services/default/web")
    for bad in ["", "!!!", paging.encode(0, "/registry/x"), "eyJ2IjoxfQ"]:
        with pytest.raises(ApiError) as e:
            paging.decode(bad)
        assert e.value.code == 400


def test_status_objects():
    st = errors.not_found("services", "x").status()
    assert st == {"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
                  "message": 'services "x" not found', "reason": "NotFound",
                  "details": {"name": "x", "kind": "services"}, "code": 404}
    c = errors.conflict("endpointslices", "e", "discovery.k8s.io")
    assert c.code == 409 and c.message.startswith('Operation cannot be fulfilled on endpointslices.discovery.k8s.io "e"')
    inv = errors.invalid("Service", "x", [errors.cause("spec.ports[0].port", "Invalid value: 0: must be 1-65535")])
    assert inv.code == 422 and inv.message == 'Service "x" is invalid: spec.ports[0].port: Invalid value: 0: must be 1-65535'
    assert inv.status()["details"]["causes"][0]["reason"] == "FieldValueInvalid"
    tl = errors.too_large_resource_version(10, 5)
    assert tl.code == 504 and tl.status()["details"]["causes"][0]["reason"] == "ResourceVersionTooLarge"
    assert errors.expired_rv(3, 9).status()["reason"] == "Expired"


@pytest.mark.parametrize("secs,want", [(0, "0s"), (59, "59s"), (119, "119s"), (125, "2m5s"), (600, "10m"),
                                       (3 * 3600 + 60, "3h1m"), (10 * 3600, "10h"), (3 * 86400 + 3600, "3d1h"),
                                       (30 * 86400, "30d"), (800 * 86400, "2y70d"), (-5, "<invalid>")])
def test_human_duration(secs, want):
    assert tables.human_duration(secs) == want


def test_service_table_row():
    svc = {"metadata": {"name": "web", "creationTimestamp": "2020-01-01T00:00:00Z"},
           "spec": {"type": "NodePort", "clusterIP": "10.96.0.10", "selector": {"app": "web"},
                    "ports": [{"port": 80, "nodePort": 30080, "protocol": "TCP"}, {"port": 53, "protocol": "UDP"}]}}
    t = tables.table(resources.by_name("services"), [svc])
    cells = t["rows"][0]["cells"]
    assert [c["name"] for c in t["columnDefinitions"]] == ["Name", "Type", "Cluster-IP", "External-IP", "Port(s)",
                                                           "Age", "Selector"]
    assert cells[:5] == ["web", "NodePort", "10.96.0.10", "<none>", "80:30080/TCP,53/UDP"]
    assert cells[6] == "app=web"
    assert t["rows"][0]["object"]["kind"] == "PartialObjectMetadata"


def test_pod_node_endpointslice_rows():
    pod = {"metadata": {"name": "p"}, "spec": {"containers": [{}, {}], "nodeName": "n1"},
           "status": {"phase": "Running", "podIP": "10.244.1.5",
                      "containerStatuses": [{"ready": True, "restartCount": 2}, {"ready": False, "restartCount": 1}]}}
    assert tables.table(resources.by_name("pods"), [pod])["rows"][0]["cells"][:7] == [
        "p", "1/2", "Running", 3, tables.age(pod), "10.244.1.5", "n1"]
    node = {"metadata": {"name": "n", "labels": {"node-role.kubernetes.io/control-plane": ""}},
            "status": {"conditions": [{"type": "Ready", "status": "True"}],
                       "addresses": [{"type": "InternalIP", "address": "192.168.56.11"}]}}
    assert tables.table(resources.by_name("nodes"), [node])["rows"][0]["cells"][:3] == ["n", "Ready", "control-plane"]
    es = {"metadata": {"name": "e"}, "addressType": "IPv4", "ports": [{"port": 80}],
          "endpoints": [{"addresses": [f"10.0.0.{i}"]} for i in range(5)]}
    assert tables.table(resources.by_name("endpointslices", "discovery.k8s.io"), [es])["rows"][0]["cells"][:4] == [
        "e", "IPv4", "80", "10.0.0.0,10.0.0.1,10.0.0.2 + 2 more..."]


def test_discovery_documents():
    core = discovery.resource_list("", "v1")
    names = {r["name"]: r for r in core["resources"]}
    assert names["services"]["shortNames"] == ["svc"] and names["services"]["namespaced"]
    assert names["pods/binding"]["verbs"] == ["create"]
    assert not names["nodes"]["namespaced"]
    groups = {g["name"] for g in discovery.api_group_list()["groups"]}
    assert groups == {"discovery.k8s.io", "events.k8s.io"}
    assert discovery.resource_list("apps", "v1") is None


def test_openapi_stub_declares_field_validation_on_patch():
    root = orjson.loads(openapi.root_doc())
    url = root["paths"]["api/v1"]["serverRelativeURL"]
    assert url.startswith("/openapi/v3/api/v1?hash=")
    doc = orjson.loads(openapi.lookup("api/v1") or b"{}")
    op = doc["paths"]["/api/v1/namespaces/{namespace}/services/{name}"]["patch"]
    assert op["x-kubernetes-group-version-kind"] == {"group": "", "version": "v1", "kind": "Service"}
    assert "fieldValidation" in {p["name"] for p in op["parameters"]}
    assert openapi.lookup("apis/apps/v1") is None


def _pb_field(num: int, payload: bytes) -> bytes:
    return bytes([num << 3 | 2, len(payload)]) + payload


def test_protobuf_namespace():
    meta = _pb_field(1, b"foo") + _pb_field(11, _pb_field(1, b"a") + _pb_field(2, b"b"))
    ns = _pb_field(1, meta)
    tm = _pb_field(1, b"v1") + _pb_field(2, b"Namespace")
    body = protobuf.MAGIC + _pb_field(1, tm) + _pb_field(2, ns)
    assert protobuf.decode(body) == {"apiVersion": "v1", "kind": "Namespace",
                                     "metadata": {"name": "foo", "labels": {"a": "b"}}}
    with pytest.raises(ApiError) as e:
        protobuf.decode(protobuf.MAGIC + _pb_field(1, _pb_field(1, b"v1") + _pb_field(2, b"Pod")))
    assert e.value.code == 415 and "JSON" in e.value.message
    with pytest.raises(ApiError) as e:
        protobuf.decode(protobuf.MAGIC + b"\x0a\x50")
    assert e.value.code == 400


def test_event_shapes_round_trip():
    core = {"kind": "Event", "apiVersion": "v1", "metadata": {"name": "e"}, "involvedObject": {"name": "x"},
            "message": "m", "reason": "R", "source": {"component": "c"}, "count": 2, "reportingComponent": "rc"}
    new = eventconv.to_events_v1(core)
    assert new["apiVersion"] == "events.k8s.io/v1" and new["note"] == "m" and new["regarding"] == {"name": "x"}
    assert new["deprecatedCount"] == 2 and new["reportingController"] == "rc"
    assert json.dumps(eventconv.to_core(new), sort_keys=True) == json.dumps(core, sort_keys=True)


def test_event_table_row():
    ev = {"apiVersion": "v1", "kind": "Event", "metadata": {"name": "p1.abc"}, "type": "Warning",
          "reason": "FailedScheduling", "message": "0/0 nodes are available.", "count": 3,
          "involvedObject": {"kind": "Pod", "name": "p1"}, "source": {"component": "default-scheduler"},
          "lastTimestamp": "2020-01-01T00:00:00Z", "firstTimestamp": "2020-01-01T00:00:00Z"}
    t = tables.table(resources.by_name("events"), [ev])
    assert [c["name"] for c in t["columnDefinitions"] if c["priority"] == 0] == [
        "Last Seen", "Type", "Reason", "Object", "Message"]
    cells = t["rows"][0]["cells"]
    assert cells[1:4] == ["Warning", "FailedScheduling", "pod/p1"] and cells[5] == "default-scheduler"
    assert cells[6] == "0/0 nodes are available." and cells[8] == 3 and cells[9] == "p1.abc"
    new = tables.table(resources.by_name("events", "events.k8s.io"), [eventconv.to_events_v1(ev)])
    assert new["rows"][0]["cells"][:9] == cells[:9]
