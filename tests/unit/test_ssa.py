import copy
import json
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from controlplane import schema
from controlplane.patch import PatchError, server_side_apply, update_managed_fields
from controlplane.ssa import decode, encode, fieldset, path_string

pytestmark = pytest.mark.unit

PAYLOADS = json.loads((Path(__file__).parent / "data" / "kubectl_payloads.json").read_text())
VERSIONS = ["1.27", "1.33"]


def entry(obj, manager, operation=None):
    for e in obj["metadata"].get("managedFields", []):
        if e["manager"] == manager and (operation is None or e["operation"] == operation):
            return e
    return None


def svc_config(**spec):
    return {"apiVersion": "v1", "kind": "Service", "metadata": {"name": "web", "namespace": "default", "labels": {"app": "web"}},
            "spec": {"selector": {"app": "web"}, "ports": [{"port": 80, "targetPort": 8080}], **spec}}


def stored(obj):
    """What the registry would have stored after create: server metadata + defaulted fields."""
    o = copy.deepcopy(obj)
    o["metadata"].update(uid="u1", resourceVersion="5", creationTimestamp="2026-01-01T00:00:00Z")
    o["spec"].setdefault("type", "ClusterIP")
    o["spec"]["clusterIP"] = "10.96.0.50"
    for p in o["spec"]["ports"]:
        p.setdefault("protocol", "TCP")
    return o


@pytest.mark.parametrize("ver", VERSIONS)
def test_kubectl_server_side_apply_creates_with_upstream_fieldsv1(ver):
    p = PAYLOADS[f"ssa_service@{ver}"]
    assert p["content_type"] == "application/apply-patch+yaml"
    assert "fieldManager=kubectl&" in p["path"] and "force=false" in p["path"]
    out = server_side_apply(None, json.loads(p["body"]), "Service", manager="kubectl")
    assert out["metadata"]["name"] == "web" and out["spec"]["type"] == "NodePort"
    (e,) = out["metadata"]["managedFields"]
    assert {k: e[k] for k in ("manager", "operation", "apiVersion", "fieldsType")} == {
        "manager": "kubectl", "operation": "Apply", "apiVersion": "v1", "fieldsType": "FieldsV1"}
    assert e["time"].endswith("Z")
    assert e["fieldsV1"] == {
        "f:metadata": {"f:labels": {"f:app": {}, "f:team": {}}},
        "f:spec": {
            "f:ports": {
                'k:{"port":53,"protocol":"UDP"}': {".": {}, "f:name": {}, "f:port": {}, "f:protocol": {}},
                'k:{"port":80,"protocol":"TCP"}': {".": {}, "f:name": {}, "f:port": {}, "f:targetPort": {}},
                'k:{"port":9090,"protocol":"TCP"}': {".": {}, "f:name": {}, "f:port": {}},
            },
            "f:selector": {},
            "f:type": {},
        },
    }


@pytest.mark.parametrize("ver", VERSIONS)
def test_kubectl_ssa_over_unmanaged_object_conflicts_with_before_first_apply(ver):
    live = PAYLOADS[f"ssa_service@{ver}"]["live"]
    body = json.loads(PAYLOADS[f"ssa_service@{ver}"]["body"])
    with pytest.raises(PatchError) as ei:
        server_side_apply(live, body, "Service", manager="kubectl")
    err = ei.value
    assert err.code == 409 and err.reason == "Conflict"
    fields = {c["field"] for c in err.details["causes"]}
    assert fields == {'.spec.ports[port=80,protocol="TCP"].targetPort', ".spec.selector", ".spec.type"}
    assert all(c["reason"] == "FieldManagerConflict" for c in err.details["causes"])
    assert all(c["message"] == 'conflict with "before-first-apply" using v1' for c in err.details["causes"])
    assert str(err).startswith('Apply failed with 3 conflicts: conflicts with "before-first-apply" using v1:\n- ')
    # --force-conflicts (force=true in the captured request) takes them over
    pf = PAYLOADS[f"ssa_service_force@{ver}"]
    assert "force=true" in pf["path"]
    out = server_side_apply(live, json.loads(pf["body"]), "Service", manager="kubectl", force=True)
    assert out["spec"]["type"] == "NodePort" and out["spec"]["selector"] == {"app": "web", "v": "2"}
    assert out["spec"]["clusterIP"] == "10.96.0.50"  # unowned live fields survive
    assert [p["port"] for p in out["spec"]["ports"]] == [80, 443, 53, 9090]  # 443 owned by before-first-apply
    bfa = decode(entry(out, "before-first-apply")["fieldsV1"])
    assert ("f:spec", "f:type") not in bfa and ("f:spec", "f:clusterIP") in bfa
    assert out["metadata"]["uid"] == "u-1"


def test_single_conflict_message_with_update_manager():
    created = stored(svc_config())
    update_managed_fields(None, created, "kubectl-client-side-apply", "Update", "v1")
    with pytest.raises(PatchError) as ei:
        server_side_apply(created, svc_config(ports=[{"port": 80, "targetPort": 9999}]), "Service", manager="kubectl")
    assert str(ei.value) == ('Apply failed with 1 conflict: conflict with "kubectl-client-side-apply" using v1: '
                             '.spec.ports[port=80,protocol="TCP"].targetPort')


def test_same_value_is_shared_not_a_conflict_and_reapply_is_idempotent():
    created = stored(svc_config())
    update_managed_fields(None, created, "kubectl-create", "Update", "v1")
    a = server_side_apply(created, svc_config(), "Service", manager="kubectl")
    b = server_side_apply(a, svc_config(), "Service", manager="kubectl")
    strip = lambda o: {**o, "metadata": {k: v for k, v in o["metadata"].items() if k != "managedFields"}}  # noqa: E731
    assert strip(a) == strip(b) == strip(created)
    fs_apply = decode(entry(b, "kubectl", "Apply")["fieldsV1"])
    fs_create = decode(entry(b, "kubectl-create")["fieldsV1"])
    assert ("f:spec", "f:selector") in fs_apply and ("f:spec", "f:selector") in fs_create


def test_dropping_a_field_from_the_config_removes_it_unless_someone_else_owns_it():
    live = server_side_apply(None, svc_config(sessionAffinity="ClientIP"), "Service", manager="kubectl")
    live = stored(live)
    out = server_side_apply(live, svc_config(), "Service", manager="kubectl")
    assert "sessionAffinity" not in out["spec"]
    assert out["spec"]["clusterIP"] == "10.96.0.50"  # never owned by the applier: kept
    # a second applier that also set the value keeps it alive
    live2 = server_side_apply(live, {"apiVersion": "v1", "kind": "Service", "metadata": {"name": "web"},
                                     "spec": {"sessionAffinity": "ClientIP"}}, "Service", manager="other")
    out2 = server_side_apply(live2, svc_config(), "Service", manager="kubectl")
    assert out2["spec"]["sessionAffinity"] == "ClientIP"


def test_removing_a_list_item_owned_only_by_the_applier():
    cfg = svc_config(ports=[{"name": "a", "port": 80}, {"name": "b", "port": 81}])
    live = stored(server_side_apply(None, cfg, "Service", manager="kubectl"))
    out = server_side_apply(live, svc_config(ports=[{"name": "a", "port": 80}]), "Service", manager="kubectl")
    assert [p["port"] for p in out["spec"]["ports"]] == [80]


def test_two_appliers_different_fields_merge():
    live = stored(server_side_apply(None, svc_config(), "Service", manager="a"))
    out = server_side_apply(live, {"apiVersion": "v1", "kind": "Service", "metadata": {"name": "web", "labels": {"owner": "b"}}},
                            "Service", manager="b")
    assert out["metadata"]["labels"] == {"app": "web", "owner": "b"}
    assert decode(entry(out, "b")["fieldsV1"]) == {("f:metadata", "f:labels", "f:owner")}


def test_status_subresource_apply_touches_only_status():
    live = stored(svc_config())
    live["status"] = {"loadBalancer": {}}
    cfg = {"apiVersion": "v1", "kind": "Service", "metadata": {"name": "web"}, "spec": {"type": "Bogus"},
           "status": {"loadBalancer": {"ingress": [{"ip": "192.168.56.240"}]}}}
    out = server_side_apply(live, cfg, "Service", manager="lb", subresource="status")
    assert out["spec"] == live["spec"]
    assert out["status"]["loadBalancer"]["ingress"] == [{"ip": "192.168.56.240"}]
    e = entry(out, "lb")
    assert e["subresource"] == "status"


def test_apply_ignores_status_on_main_resource_and_rejects_bad_input():
    out = server_side_apply(None, {**svc_config(), "status": {"loadBalancer": {"ingress": [{"ip": "1.1.1.1"}]}}},
                            "Service", manager="k")
    assert "status" not in out
    with pytest.raises(PatchError) as ei:
        server_side_apply(None, svc_config(), "Service", manager="")
    assert ei.value.code == 400
    bad = svc_config()
    bad["metadata"]["managedFields"] = [{"manager": "x"}]
    with pytest.raises(PatchError, match="metadata.managedFields must be nil"):
        server_side_apply(None, bad, "Service", manager="k")
    with pytest.raises(PatchError):
        server_side_apply(None, {**svc_config(), "kind": "Pod"}, "Service", manager="k")


def test_update_takes_ownership_and_removed_fields_are_dropped():
    obj = stored(svc_config())
    update_managed_fields(None, obj, "kubectl-create", "Update", "v1")
    fs = decode(entry(obj, "kubectl-create")["fieldsV1"])
    assert ("f:spec", "f:clusterIP") in fs and ("f:metadata", "f:uid") not in fs
    assert all(p[0] != "f:status" for p in fs)
    new = copy.deepcopy(obj)
    new["metadata"]["labels"] = {"app": "web", "x": "1"}
    new["spec"]["ports"][0]["targetPort"] = 9090
    update_managed_fields(obj, new, "kubectl-edit", "Update", "v1")
    edit = decode(entry(new, "kubectl-edit")["fieldsV1"])
    assert edit == {("f:metadata", "f:labels", "f:x"),
                    ("f:spec", "f:ports", 'k:{"port":80,"protocol":"TCP"}', "f:targetPort")}
    create = decode(entry(new, "kubectl-create")["fieldsV1"])
    assert ("f:spec", "f:ports", 'k:{"port":80,"protocol":"TCP"}', "f:targetPort") not in create
    # no change -> no new entry, times kept
    again = copy.deepcopy(new)
    update_managed_fields(new, again, "noop", "Update", "v1")
    assert entry(again, "noop") is None


def test_managed_fields_reset():
    obj = stored(svc_config())
    update_managed_fields(None, obj, "a", "Update", "v1")
    new = copy.deepcopy(obj)
    new["metadata"]["managedFields"] = [{}]
    update_managed_fields(obj, new, "b", "Update", "v1")
    assert "managedFields" not in new["metadata"]


def test_pod_keys_and_path_strings():
    pod = {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "p", "finalizers": ["a/b"]},
           "spec": {"containers": [{"name": "c", "image": "x", "ports": [{"containerPort": 53, "protocol": "UDP"}]}]}}
    fs = fieldset({k: v for k, v in pod.items() if k in ("spec",)} | {"metadata": {"finalizers": ["a/b"]}},
                  schema.root("Pod"))
    assert ("f:metadata", "f:finalizers", 'v:"a/b"') in fs
    port = ("f:spec", "f:containers", 'k:{"name":"c"}', "f:ports", 'k:{"containerPort":53,"protocol":"UDP"}')
    assert port in fs
    assert path_string((*port, "f:protocol")) == '.spec.containers[name="c"].ports[containerPort=53,protocol="UDP"].protocol'
    assert path_string(("f:metadata", "f:finalizers", 'v:"a/b"')) == '.metadata.finalizers[="a/b"]'


labels = st.dictionaries(st.sampled_from(["a", "b", "c"]), st.text("xy", min_size=1, max_size=2), max_size=3)
ports = st.lists(st.fixed_dictionaries({"port": st.integers(1, 4)}, optional={"name": st.sampled_from(["p", "q"]),
                                                                               "protocol": st.sampled_from(["TCP", "UDP"])}),
                 max_size=3, unique_by=lambda p: (p["port"], p.get("protocol", "TCP")))


@settings(max_examples=100, deadline=None)
@given(labels, ports)
def test_fieldsv1_roundtrip(lbls, prts):
    obj = {"metadata": {"labels": lbls}, "spec": {"ports": prts, "selector": lbls}}
    fs = fieldset(obj, schema.root("Service"))
    assert decode(encode(fs)) == fs


def test_registry_recording_an_apply_again_does_not_duplicate_the_entry():
    out = server_side_apply(None, svc_config(), "Service", manager="kubectl")
    before = copy.deepcopy(out["metadata"]["managedFields"])
    defaulted = stored(out)
    update_managed_fields(None, defaulted, "kubectl", "Apply", "v1")
    assert defaulted["metadata"]["managedFields"] == before


def test_apply_create_then_registry_create_bookkeeping_keeps_the_apply_entry():
    out = server_side_apply(None, svc_config(), "Service", manager="kubectl")
    before = copy.deepcopy(out["metadata"]["managedFields"])
    defaulted = stored(out)
    update_managed_fields(None, defaulted, "kubectl", "Update", "v1")  # what a registry's create step does
    assert defaulted["metadata"]["managedFields"] == before
    again = server_side_apply(defaulted, svc_config(), "Service", manager="kubectl")  # re-apply: no conflict
    assert [e["operation"] for e in again["metadata"]["managedFields"]] == ["Apply"]


def _reference_diff(old, new, t):
    """The definition _diff implements: owned paths of new that are new or whose leaf value changed;
    owned paths of old that new no longer has."""
    from controlplane.ssa import _MISSING, _get

    new_fs, old_fs = fieldset(new, t, marks=True), fieldset(old, t, marks=True)
    parents = {q[:i] for q in new_fs for i in range(1, len(q))}
    changed = set()
    for p in new_fs:
        a, _ = _get(old, p, t)
        if a is _MISSING or (p not in parents and a != _get(new, p, t)[0]):
            changed.add(p)
    return changed, old_fs - new_fs


svc_specs = st.fixed_dictionaries({}, optional={
    "ports": ports, "selector": labels, "type": st.sampled_from(["ClusterIP", "NodePort"]),
    "externalIPs": st.lists(st.sampled_from(["1.1.1.1", "2.2.2.2"]), max_size=2),
    "sessionAffinityConfig": st.fixed_dictionaries({}, optional={"clientIP": st.fixed_dictionaries(
        {}, optional={"timeoutSeconds": st.integers(1, 3)})})})


@settings(max_examples=150, deadline=None)
@given(labels, svc_specs, labels, svc_specs)
def test_diff_matches_its_definition(l1, s1, l2, s2):
    from controlplane.ssa import _diff

    t = schema.root("Service")
    old = {"metadata": {"labels": l1}, "spec": s1}
    new = {"metadata": {"labels": l2}, "spec": s2}
    changed, removed = set(), set()
    _diff(old, new, t, (), changed, removed)
    want_changed, want_removed = _reference_diff(old, new, t)
    assert changed == want_changed
    assert removed - fieldset(new, t, marks=True) == want_removed


@pytest.mark.parametrize("ver", VERSIONS)
def test_kubectl_csa_to_ssa_migration(ver):
    """kubectl >= 1.26 moves client-side-apply ownership to its SSA manager with a JSON patch of
    metadata.managedFields (csaupgrade); the bookkeeping must keep what the client sent."""
    from controlplane.patch import json_patch

    p = PAYLOADS[f"ssa_migrate_service@{ver}"]
    live = p["live"]
    assert [e["manager"] for e in live["metadata"]["managedFields"]] == ["kubectl-client-side-apply"]
    (mig,) = [f for f in p["followups"] if f["content_type"] == "application/json-patch+json"]
    assert "fieldManager=kubectl&" in mig["path"]
    migrated = json_patch(live, json.loads(mig["body"]))
    update_managed_fields(live, migrated, "kubectl", "Update", "v1")
    assert [(e["manager"], e["operation"]) for e in migrated["metadata"]["managedFields"]] == [("kubectl", "Apply")]
    # now a changed apply by kubectl conflicts with nobody
    cfg = json.loads(p["body"])
    cfg["spec"]["ports"][0]["targetPort"] = 8090
    out = server_side_apply(migrated, cfg, "Service", manager="kubectl")
    assert out["spec"]["ports"][0]["targetPort"] == 8090


def test_finalizers_are_a_set_shared_between_managers():
    def ns(fins):
        return {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "p", "finalizers": fins},
                "spec": {"containers": [{"name": "c", "image": "x"}]}}

    live = server_side_apply(None, ns(["example.com/a"]), "Pod", manager="a")
    other = copy.deepcopy(live)
    other["metadata"]["finalizers"].append("example.com/b")
    update_managed_fields(live, other, "controller", "Update", "v1")
    assert decode(entry(other, "controller")["fieldsV1"]) == {("f:metadata", "f:finalizers", 'v:"example.com/b"')}
    again = server_side_apply(other, ns(["example.com/a"]), "Pod", manager="a")
    assert again["metadata"]["finalizers"] == ["example.com/a", "example.com/b"]
    dropped = server_side_apply(again, ns([]), "Pod", manager="a")
    assert dropped["metadata"]["finalizers"] == ["example.com/b"]


def test_update_entries_mark_new_maps_like_upstream():
    obj = stored(svc_config())
    obj["metadata"]["annotations"] = {"a": "1"}
    update_managed_fields(None, obj, "kubectl-create", "Update", "v1")
    f = entry(obj, "kubectl-create")["fieldsV1"]
    assert f["f:metadata"] == {"f:annotations": {".": {}, "f:a": {}}, "f:labels": {".": {}, "f:app": {}}}
    assert f["f:spec"]["f:selector"] == {}  # selector is an atomic map: one leaf
    # removing the whole map drops its "." too
    new = copy.deepcopy(obj)
    del new["metadata"]["annotations"]
    update_managed_fields(obj, new, "kubectl-edit", "Update", "v1")
    assert "f:annotations" not in entry(new, "kubectl-create")["fieldsV1"]["f:metadata"]
