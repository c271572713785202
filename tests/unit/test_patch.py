import copy
import json
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from controlplane.patch import PatchError, json_patch, merge_patch, strategic_merge_patch

pytestmark = pytest.mark.unit

PAYLOADS = json.loads((Path(__file__).parent / "data" / "kubectl_payloads.json").read_text())
VERSIONS = ["1.27", "1.33"]
LAST = "kubectl.kubernetes.io/last-applied-configuration"


def payload(name, ver):
    p = PAYLOADS[f"{name}@{ver}"]
    return copy.deepcopy(p["live"]), json.loads(p["body"]), p


# ---------------------------------------------------------------- real kubectl payloads


@pytest.mark.parametrize("ver", VERSIONS)
def test_kubectl_client_side_apply_service(ver):
    live, body, p = payload("csa_service", ver)
    assert p["content_type"] == "application/strategic-merge-patch+json"
    assert "fieldManager=kubectl-client-side-apply" in p["path"]
    out = strategic_merge_patch(live, body, "Service")
    assert out["metadata"]["labels"] == {"app": "web", "team": "net"}
    assert json.loads(out["metadata"]["annotations"][LAST])["spec"]["type"] == "NodePort"
    spec = out["spec"]
    assert spec["type"] == "NodePort" and spec["selector"] == {"app": "web", "v": "2"}
    # $setElementOrder/ports: 9090, 80, 53; 443 deleted; 80 merged (server fields kept)
    assert spec["ports"] == [
        {"name": "metrics", "port": 9090},
        {"name": "http", "port": 80, "targetPort": 8081, "protocol": "TCP"},
        {"name": "dns", "port": 53, "protocol": "UDP", "targetPort": 53},
    ]
    assert spec["clusterIP"] == "10.96.0.50"  # server-set field untouched
    assert live["spec"]["ports"][1]["port"] == 443  # input not modified


@pytest.mark.parametrize("ver", VERSIONS)
def test_kubectl_client_side_apply_pod(ver):
    live, body, _ = payload("csa_pod", ver)
    out = strategic_merge_patch(live, body, "Pod")
    assert out["metadata"]["finalizers"] == ["example.com/b"]
    (app,) = out["spec"]["containers"]
    assert app["name"] == "app" and app["image"] == "kpx/echo:2"
    assert app["env"] == [{"name": "B", "value": "3"}, {"name": "C", "value": "4"}]
    assert app["ports"] == [{"containerPort": 8080}]
    assert app["volumeMounts"] == [{"name": "data", "mountPath": "/data"}]
    # $retainKeys drops emptyDir, hostPath added
    assert out["spec"]["volumes"] == [{"name": "data", "hostPath": {"path": "/tmp/x"}}]
    # tolerations have no patch strategy: replaced
    assert out["spec"]["tolerations"] == [{"key": "b", "operator": "Exists"}]


@pytest.mark.parametrize("ver", VERSIONS)
def test_kubectl_label_is_merge_patch(ver):
    live, body, p = payload("label_service", ver)
    assert p["content_type"] == "application/merge-patch+json"
    out = merge_patch(live, body)
    assert out["metadata"]["labels"] == {"app": "web", "team": "net"}


@pytest.mark.parametrize("ver", VERSIONS)
def test_kubectl_patch_delete_directive(ver):
    live, body, _ = payload("patch_service_smp", ver)
    out = strategic_merge_patch(live, body, "Service")
    assert [p["port"] for p in out["spec"]["ports"]] == [80, 53]


# ---------------------------------------------------------------- strategic merge semantics


def test_smp_null_deletes_and_maps_merge():
    cur = {"metadata": {"labels": {"a": "1", "b": "2"}}, "spec": {"selector": {"x": "y"}}}
    out = strategic_merge_patch(cur, {"metadata": {"labels": {"a": None, "c": "3"}}, "spec": {"selector": None}}, "Service")
    assert out == {"metadata": {"labels": {"b": "2", "c": "3"}}, "spec": {}}


def test_smp_merge_key_append_and_merge():
    cur = {"spec": {"ports": [{"port": 80, "name": "http", "protocol": "TCP"}]}}
    out = strategic_merge_patch(cur, {"spec": {"ports": [{"port": 80, "targetPort": 8080}, {"port": 81, "name": "b"}]}}, "Service")
    assert out["spec"]["ports"] == [{"port": 80, "name": "http", "protocol": "TCP", "targetPort": 8080}, {"port": 81, "name": "b"}]


def test_smp_replace_directive_in_list_and_map():
    cur = {"spec": {"ports": [{"port": 80}, {"port": 81}], "selector": {"a": "1", "b": "2"}}}
    patch = {"spec": {"ports": [{"$patch": "replace"}, {"port": 90}], "selector": {"$patch": "replace", "c": "3"}}}
    out = strategic_merge_patch(cur, patch, "Service")
    assert out["spec"] == {"ports": [{"port": 90}], "selector": {"c": "3"}}


def test_smp_delete_map_directive():
    cur = {"spec": {"sessionAffinityConfig": {"clientIP": {"timeoutSeconds": 5}}, "type": "ClusterIP"}}
    out = strategic_merge_patch(cur, {"spec": {"sessionAffinityConfig": {"$patch": "delete"}}}, "Service")
    assert out["spec"] == {"type": "ClusterIP"}


def test_smp_finalizers_set_union_and_delete_from_primitive_list():
    cur = {"metadata": {"finalizers": ["a", "b"]}}
    out = strategic_merge_patch(cur, {"metadata": {"finalizers": ["c", "a"]}}, "Pod")
    assert out["metadata"]["finalizers"] == ["a", "b", "c"]
    out = strategic_merge_patch(cur, {"metadata": {"$deleteFromPrimitiveList/finalizers": ["a"]}}, "Pod")
    assert out["metadata"]["finalizers"] == ["b"]


def test_smp_lists_without_strategy_replace():
    cur = {"addressType": "IPv4", "endpoints": [{"addresses": ["10.0.0.1"]}, {"addresses": ["10.0.0.2"]}]}
    out = strategic_merge_patch(cur, {"endpoints": [{"addresses": ["10.0.0.3"]}]}, "EndpointSlice")
    assert out["endpoints"] == [{"addresses": ["10.0.0.3"]}]
    cur = {"spec": {"clusterIPs": ["10.96.0.1"], "externalIPs": ["1.1.1.1", "2.2.2.2"]}}
    out = strategic_merge_patch(cur, {"spec": {"externalIPs": ["3.3.3.3"]}}, "Service")
    assert out["spec"]["externalIPs"] == ["3.3.3.3"]


def test_smp_conditions_by_type_node_addresses():
    cur = {"status": {"conditions": [{"type": "Ready", "status": "False"}, {"type": "DiskPressure", "status": "False"}],
                      "addresses": [{"type": "InternalIP", "address": "192.168.56.11"}]}}
    patch = {"status": {"conditions": [{"type": "Ready", "status": "True"}],
                        "addresses": [{"type": "Hostname", "address": "node1"}]}}
    out = strategic_merge_patch(cur, patch, "Node")
    assert out["status"]["conditions"] == [{"type": "Ready", "status": "True"}, {"type": "DiskPressure", "status": "False"}]
    assert [a["type"] for a in out["status"]["addresses"]] == ["InternalIP", "Hostname"]


def test_smp_set_element_order_keeps_server_only_items_in_place():
    cur = {"spec": {"containers": [{"name": "a"}, {"name": "server"}, {"name": "b"}]}}
    patch = {"spec": {"$setElementOrder/containers": [{"name": "b"}, {"name": "a"}], "containers": [{"name": "b", "image": "x"}]}}
    out = strategic_merge_patch(cur, patch, "Pod")
    # as upstream's mergeSortedSlice: "server" was before "b" in the live list, so it stays first
    assert [c["name"] for c in out["spec"]["containers"]] == ["server", "b", "a"]
    cur = {"spec": {"containers": [{"name": "a"}, {"name": "server"}]}}
    patch = {"spec": {"$setElementOrder/containers": [{"name": "new"}, {"name": "a"}], "containers": [{"name": "new"}]}}
    out = strategic_merge_patch(cur, patch, "Pod")
    assert [c["name"] for c in out["spec"]["containers"]] == ["server", "new", "a"]


def test_smp_new_nested_value_has_no_directives():
    cur = {"spec": {}}
    out = strategic_merge_patch(cur, {"spec": {"containers": [{"name": "a", "env": [{"name": "X", "value": "1"}, {"$patch": "delete", "name": "Y"}]}]}}, "Pod")
    assert out["spec"]["containers"] == [{"name": "a", "env": [{"name": "X", "value": "1"}]}]


def test_smp_errors_are_422():
    with pytest.raises(PatchError) as ei:
        strategic_merge_patch({"spec": {}}, {"spec": {"ports": [{"name": "x"}]}}, "Service")
    assert ei.value.code == 422 and "does not contain declared merge key: port" in str(ei.value)
    with pytest.raises(PatchError) as ei:
        strategic_merge_patch({}, ["not", "an", "object"], "Service")
    assert ei.value.code == 422
    with pytest.raises(PatchError):
        strategic_merge_patch({}, {"$patch": "explode"}, "Service")


# ---------------------------------------------------------------- RFC 7386 / 6902


def test_merge_patch_rfc7386_examples():
    cur = {"a": "b", "c": {"d": "e", "f": "g"}}
    assert merge_patch(cur, {"a": "z", "c": {"f": None}}) == {"a": "z", "c": {"d": "e"}}
    assert merge_patch({"a": [1, 2]}, {"a": [3]}) == {"a": [3]}
    with pytest.raises(PatchError) as ei:
        merge_patch({"a": 1}, ["x"])
    assert ei.value.code == 400


def test_json_patch_ops_and_errors():
    cur = {"metadata": {"labels": {"a": "1"}}, "spec": {"ports": [{"port": 80}]}}
    out = json_patch(cur, [
        {"op": "add", "path": "/metadata/labels/b", "value": "2"},
        {"op": "replace", "path": "/spec/ports/0/port", "value": 81},
        {"op": "test", "path": "/metadata/labels/a", "value": "1"},
        {"op": "remove", "path": "/metadata/labels/a"},
    ])
    assert out == {"metadata": {"labels": {"b": "2"}}, "spec": {"ports": [{"port": 81}]}}
    with pytest.raises(PatchError) as ei:
        json_patch(cur, [{"op": "test", "path": "/metadata/labels/a", "value": "2"}])
    assert ei.value.code == 422 and ei.value.reason == "Invalid"
    assert str(ei.value) == "the server rejected our request due to an error in our request"
    assert ei.value.details and ei.value.details["causes"] == [
        {"reason": "UnexpectedServerResponse", "message": "testing value /metadata/labels/a failed: test failed"}]
    with pytest.raises(PatchError) as ei:
        json_patch(cur, [{"op": "add", "path": "/metadata/labels/z", "value": "1"}, {"op": "remove", "path": "/nope"}])
    assert ei.value.code == 422
    assert ei.value.details["causes"][0]["message"] == 'remove operation does not apply: doc is missing path: "/nope": missing value'
    assert "z" not in cur["metadata"]["labels"]  # never half-applied to the input
    with pytest.raises(PatchError) as ei:
        json_patch(cur, {"op": "add"})
    assert ei.value.code == 400
    with pytest.raises(PatchError) as ei:
        json_patch(cur, [{"op": "frobnicate", "path": "/a"}])
    assert ei.value.code == 400


json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-5, 5) | st.text("ab", max_size=2),
    lambda children: st.lists(children, max_size=3) | st.dictionaries(st.sampled_from("abcd"), children, max_size=3),
    max_leaves=10,
)
objects = st.dictionaries(st.sampled_from("abcd"), json_values, max_size=4)


def _no_nulls(v):
    if isinstance(v, dict):
        return {k: _no_nulls(x) for k, x in v.items() if x is not None}
    return v


@settings(max_examples=100, deadline=None)
@given(objects, objects)
def test_merge_patch_laws(doc, patch):
    out = merge_patch(doc, patch)
    # idempotent: applying the same patch twice changes nothing more
    assert merge_patch(out, patch) == out
    # every non-null patch key is in the result with the patch's (null-stripped) value
    for k, v in patch.items():
        if v is None:
            assert k not in out
        elif not isinstance(v, dict):
            assert out[k] == v


@settings(max_examples=100, deadline=None)
@given(objects, objects)
def test_json_patch_replace_document_roundtrip(doc, target):
    doc, target = _no_nulls(doc), _no_nulls(target)
    ops = [{"op": "remove", "path": f"/{k}"} for k in doc] + [{"op": "add", "path": f"/{k}", "value": v} for k, v in target.items()]
    assert json_patch(doc, ops) == target


def test_smp_owner_references_merge_by_uid():
    cur = {"metadata": {"ownerReferences": [{"uid": "u1", "kind": "Service", "name": "a"}]}}
    out = strategic_merge_patch(cur, {"metadata": {"ownerReferences": [
        {"uid": "u1", "controller": True}, {"uid": "u2", "kind": "Service", "name": "b"}]}}, "EndpointSlice")
    assert out["metadata"]["ownerReferences"] == [
        {"uid": "u1", "kind": "Service", "name": "a", "controller": True}, {"uid": "u2", "kind": "Service", "name": "b"}]
