"""Object lifecycle semantics over REST: finalizers + deletionTimestamp, deletecollection, pods/binding,
status subresources, graceful pod deletion, generation, two listen addresses."""

from __future__ import annotations

import json
import uuid
from typing import Any

import pytest

pytestmark = pytest.mark.integration


def call(srv: Any, method: str, path: str, body: Any = None, ctype: str = "application/json") -> tuple[int, Any]:
    data = json.dumps(body).encode() if body is not None else None
    headers = {"Content-Type": ctype} if data is not None else {}
    code, _, out = srv.request(method, path, data, headers)
    return code, json.loads(out) if out else None


def events_since(srv: Any, path: str, rv: str) -> list[tuple[str, dict[str, Any]]]:
    code, _, out = srv.request("GET", f"{path}{'&' if '?' in path else '?'}watch=1&resourceVersion={rv}"
                                      "&timeoutSeconds=1")
    assert code == 200
    return [(e["type"], e["object"]) for e in map(json.loads, out.splitlines())]


@pytest.fixture(scope="module")
def ns(apiserver: Any) -> str:
    name = f"sem-{uuid.uuid4().hex[:6]}"
    assert call(apiserver, "POST", "/api/v1/namespaces", {"metadata": {"name": name}})[0] == 201
    return name


def svc(name: str, **meta: Any) -> dict[str, Any]:
    return {"apiVersion": "v1", "kind": "Service", "metadata": {"name": name, **meta},
            "spec": {"ports": [{"port": 80}]}}


def test_finalizers_hold_deletion(apiserver: Any, ns: str) -> None:
    p = f"/api/v1/namespaces/{ns}/services"
    code, made = call(apiserver, "POST", p, svc("fin", finalizers=["example.com/hold"]))
    assert code == 201
    rv = made["metadata"]["resourceVersion"]
    code, marked = call(apiserver, "DELETE", f"{p}/fin")
    assert code == 200 and marked["metadata"]["deletionTimestamp"]
    code, still = call(apiserver, "GET", f"{p}/fin")
    assert code == 200 and still["metadata"]["deletionTimestamp"] == marked["metadata"]["deletionTimestamp"]
    # no new finalizers once deleting
    code, st = call(apiserver, "PATCH", f"{p}/fin", {"metadata": {"finalizers": ["example.com/hold", "b/c"]}},
                    "application/merge-patch+json")
    assert code == 422, st
    # removing the last finalizer removes the object
    code, _ = call(apiserver, "PATCH", f"{p}/fin", {"metadata": {"finalizers": None}}, "application/merge-patch+json")
    assert code == 200
    assert call(apiserver, "GET", f"{p}/fin")[0] == 404
    evs = events_since(apiserver, p + "?fieldSelector=metadata.name%3Dfin", rv)
    assert [t for t, _ in evs] == ["MODIFIED", "DELETED"]
    assert evs[0][1]["metadata"]["deletionTimestamp"]


def test_deletecollection_by_label(apiserver: Any, ns: str) -> None:
    p = f"/api/v1/namespaces/{ns}/services"
    for i in range(4):
        assert call(apiserver, "POST", p, svc(f"dc{i}", labels={"grp": "a" if i < 3 else "b"}))[0] == 201
    code, gone = call(apiserver, "DELETE", p + "?labelSelector=grp%3Da")
    assert code == 200 and gone["kind"] == "ServiceList"
    assert sorted(o["metadata"]["name"] for o in gone["items"]) == ["dc0", "dc1", "dc2"]
    code, left = call(apiserver, "GET", p + "?labelSelector=grp")
    assert [o["metadata"]["name"] for o in left["items"]] == ["dc3"]


def test_binding_status_and_graceful_pod_delete(apiserver: Any, ns: str) -> None:
    p = f"/api/v1/namespaces/{ns}/pods"
    # schedulerName elsewhere: kpx's own scheduler leaves this pod to us
    pod = {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "bp"},
           "spec": {"schedulerName": "not-kpx", "containers": [{"name": "c", "image": "kpx/echo"}]}}
    code, made = call(apiserver, "POST", p, pod)
    assert code == 201 and made["status"]["phase"] == "Pending" and made["metadata"]["generation"] == 1
    binding = {"apiVersion": "v1", "kind": "Binding", "metadata": {"name": "bp"},
               "target": {"apiVersion": "v1", "kind": "Node", "name": "node-x"}}
    assert call(apiserver, "POST", f"{p}/bp/binding", binding)[0] == 201
    code, bound = call(apiserver, "GET", f"{p}/bp")
    assert bound["spec"]["nodeName"] == "node-x"
    assert any(c["type"] == "PodScheduled" and c["status"] == "True" for c in bound["status"]["conditions"])
    assert call(apiserver, "POST", f"{p}/bp/binding", binding)[0] == 409  # already bound

    # status goes through /status only: a PUT of the object keeps the stored status
    bound["status"]["phase"] = "Running"
    bound["status"]["podIP"] = "10.244.9.9"
    code, after_put = call(apiserver, "PUT", f"{p}/bp", bound)
    assert code == 200 and after_put["status"]["phase"] == "Pending"
    _, cur = call(apiserver, "GET", f"{p}/bp")
    cur["status"]["phase"] = "Running"
    cur["status"]["podIP"] = "10.244.9.9"
    cur["metadata"]["labels"] = {"ignored": "yes"}
    code, after_status = call(apiserver, "PUT", f"{p}/bp/status", cur)
    assert code == 200 and after_status["status"]["podIP"] == "10.244.9.9"
    assert "ignored" not in (after_status["metadata"].get("labels") or {})
    code, listed = call(apiserver, "GET", f"{p}?fieldSelector=status.podIP%3D10.244.9.9")
    assert [o["metadata"]["name"] for o in listed["items"]] == ["bp"]

    # a bound pod is deleted gracefully: marked first, removed by the final grace-0 delete
    code, marked = call(apiserver, "DELETE", f"{p}/bp")
    assert code == 200 and marked["metadata"]["deletionTimestamp"]
    assert marked["metadata"]["deletionGracePeriodSeconds"] == 30
    assert call(apiserver, "GET", f"{p}/bp")[0] == 200
    code, _ = call(apiserver, "DELETE", f"{p}/bp", {"kind": "DeleteOptions", "apiVersion": "v1",
                                                     "gracePeriodSeconds": 0,
                                                     "preconditions": {"uid": made["metadata"]["uid"]}})
    assert code == 200
    assert call(apiserver, "GET", f"{p}/bp")[0] == 404


def test_generation_bumps_on_spec_changes_only(apiserver: Any, ns: str) -> None:
    p = f"/api/v1/namespaces/{ns}/services"
    code, made = call(apiserver, "POST", p, svc("gen"))
    assert made["metadata"]["generation"] == 1
    _, lab = call(apiserver, "PATCH", f"{p}/gen", {"metadata": {"labels": {"a": "b"}}}, "application/merge-patch+json")
    assert lab["metadata"]["generation"] == 1
    _, spec = call(apiserver, "PATCH", f"{p}/gen", {"spec": {"ports": [{"port": 81}]}}, "application/merge-patch+json")
    assert spec["metadata"]["generation"] == 2
    # a no-op patch writes nothing: same resourceVersion
    _, same = call(apiserver, "PATCH", f"{p}/gen", {"metadata": {"labels": {"a": "b"}}},
                   "application/merge-patch+json")
    assert same["metadata"]["resourceVersion"] == spec["metadata"]["resourceVersion"]


def test_two_bind_addresses(apiserver_factory: Any) -> None:
    srv = apiserver_factory("--bind-address", "127.0.0.1,127.0.0.2", "--controllers", "")
    import ssl
    import urllib.request

    ctx = ssl.create_default_context(cafile=str(srv.ca))
    ctx.check_hostname = False  # 127.0.0.2 is not in the certificate's SANs
    with urllib.request.urlopen(f"https://127.0.0.2:{srv.port}/healthz", context=ctx, timeout=5) as r:
        assert r.read() == b"ok"
    assert srv.get("/healthz") == b"ok"
