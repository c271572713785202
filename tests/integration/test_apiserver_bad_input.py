"""Bad requests get the Status code/reason kube-apiserver gives them, nothing is half-written, and the
server stays up."""

from __future__ import annotations

import json
import time
import uuid
from typing import Any

import pytest

pytestmark = pytest.mark.integration

JSON = {"Content-Type": "application/json"}


def call(srv: Any, method: str, path: str, body: Any = None, ctype: str = "application/json",
         raw: bytes | None = None) -> tuple[int, dict[str, Any], dict[str, str]]:
    data = raw if raw is not None else (json.dumps(body).encode() if body is not None else None)
    headers = {"Authorization": f"Bearer {srv.token}"}
    if data is not None:
        headers["Content-Type"] = ctype
    code, hdrs, out = srv.request(method, path, data, headers)
    try:
        doc = json.loads(out) if out else {}
    except ValueError:
        doc = {"_raw": out.decode(errors="replace")}
    return code, doc, hdrs


def status(srv: Any, method: str, path: str, body: Any = None, **kw: Any) -> tuple[int, str, dict[str, Any]]:
    code, doc, _ = call(srv, method, path, body, **kw)
    if code >= 400:
        assert doc.get("kind") == "Status" and doc.get("code") == code and doc.get("status") == "Failure", doc
    return code, doc.get("reason", ""), doc


@pytest.fixture(scope="module")
def ns(apiserver: Any) -> str:
    name = f"bad-{uuid.uuid4().hex[:6]}"
    code, _, _ = call(apiserver, "POST", "/api/v1/namespaces", {"metadata": {"name": name}})
    assert code == 201
    return name


def svc(name: str, **spec: Any) -> dict[str, Any]:
    return {"apiVersion": "v1", "kind": "Service", "metadata": {"name": name},
            "spec": {"ports": [{"port": 80}], **spec}}


def test_bodies(apiserver: Any, ns: str) -> None:
    p = f"/api/v1/namespaces/{ns}/services"
    code, reason, doc = status(apiserver, "POST", p, raw=b"k8s\x00\x0a\x09\x0a\x02v1\x12\x03Pod",
                               ctype="application/vnd.kubernetes.protobuf")
    assert (code, reason) == (415, "UnsupportedMediaType") and "JSON" in doc["message"]
    code, reason, _ = status(apiserver, "POST", p, raw=b"x" * (3 * 1024 * 1024 + 10))
    assert code == 413
    assert status(apiserver, "POST", p, raw=b'{"kind": "Service", ')[:2] == (400, "BadRequest")
    assert status(apiserver, "POST", p, raw=b"kind: [unclosed", ctype="application/yaml")[:2] == (400, "BadRequest")
    assert status(apiserver, "POST", p, raw=b"a: &x [1]\nb: *x\n", ctype="application/yaml")[:2] == (
        400, "BadRequest")
    assert status(apiserver, "POST", p, raw=b"[1,2]")[:2] == (400, "BadRequest")
    assert status(apiserver, "POST", p, raw=b"")[:2] == (400, "BadRequest")
    assert status(apiserver, "POST", p, raw=b"{}", ctype="application/cbor")[:2] == (415, "UnsupportedMediaType")
    # YAML is a fine body
    code, _, _ = call(apiserver, "POST", p, raw=b"apiVersion: v1\nkind: Service\nmetadata: {name: from-yaml}\n"
                      b"spec: {ports: [{port: 80}]}\n", ctype="application/yaml")
    assert code == 201


def test_type_and_identity_mismatches(apiserver: Any, ns: str) -> None:
    p = f"/api/v1/namespaces/{ns}/services"
    assert status(apiserver, "POST", p, {**svc("k"), "kind": "Pod"})[:2] == (400, "BadRequest")
    assert status(apiserver, "POST", p, {**svc("k"), "apiVersion": "apps/v1"})[:2] == (400, "BadRequest")
    body = svc("k")
    body["metadata"]["namespace"] = "elsewhere"
    assert status(apiserver, "POST", p, body)[:2] == (400, "BadRequest")
    assert call(apiserver, "POST", p, svc("k"))[0] == 201
    _, cur, _ = call(apiserver, "GET", f"{p}/k")
    cur["metadata"]["name"] = "other"
    assert status(apiserver, "PUT", f"{p}/k", cur)[:2] == (400, "BadRequest")
    # cluster-scoped kind under a namespace path: no such URL
    assert status(apiserver, "GET", f"/api/v1/namespaces/{ns}/nodes")[:2] == (404, "NotFound")
    # namespaced create into a namespace that does not exist
    code, reason, doc = status(apiserver, "POST", "/api/v1/namespaces/no-such-ns/services", svc("x"))
    assert (code, reason) == (404, "NotFound") and doc["message"] == 'namespaces "no-such-ns" not found'


def test_invalid_objects_422_and_nothing_written(apiserver: Any, ns: str) -> None:
    p = f"/api/v1/namespaces/{ns}/services"
    code, reason, doc = status(apiserver, "POST", p, svc("bad-port", ports=[{"port": 0}]))
    assert (code, reason) == (422, "Invalid")
    causes = doc["details"]["causes"]
    assert any(c["field"] == "spec.ports[0].port" for c in causes), causes
    assert doc["message"].startswith('Service "bad-port" is invalid: ')
    assert status(apiserver, "GET", f"{p}/bad-port")[:2] == (404, "NotFound")
    code, reason, doc = status(apiserver, "POST", p, svc("Bad_Name"))
    assert (code, reason) == (422, "Invalid") and doc["details"]["causes"][0]["field"] == "metadata.name"
    code, reason, _ = status(apiserver, "POST", p, {"apiVersion": "v1", "kind": "Service", "metadata": {}})
    assert (code, reason) == (422, "Invalid")

    # an IP already taken is refused, and the failed create does not leak the IP it asked for
    code, first, _ = call(apiserver, "POST", p, svc("ip-a"))
    assert code == 201
    ip = first["spec"]["clusterIP"]
    code, reason, doc = status(apiserver, "POST", p, svc("ip-b", clusterIP=ip))
    assert (code, reason) == (422, "Invalid") and "already allocated" in doc["message"]
    assert call(apiserver, "DELETE", f"{p}/ip-a")[0] == 200
    code, again, _ = call(apiserver, "POST", p, svc("ip-c", clusterIP=ip))
    assert code == 201 and again["spec"]["clusterIP"] == ip


def test_selectors_and_resource_versions(apiserver: Any, ns: str) -> None:
    p = f"/api/v1/namespaces/{ns}/services"
    assert status(apiserver, "GET", p + "?labelSelector=a%20in%20b")[:2] == (400, "BadRequest")
    assert status(apiserver, "GET", p + "?labelSelector=%21%21")[:2] == (400, "BadRequest")
    code, reason, doc = status(apiserver, "GET", p + "?fieldSelector=spec.nope%3Dx")
    assert (code, reason) == (400, "BadRequest") and "field label not supported" in doc["message"]
    assert status(apiserver, "GET", p + "?resourceVersion=abc")[:2] == (400, "BadRequest")
    assert status(apiserver, "GET", p + "?limit=x")[:2] == (400, "BadRequest")
    assert status(apiserver, "GET", p + "?continue=garbage")[:2] == (400, "BadRequest")
    assert status(apiserver, "GET", p + "?resourceVersion=0&resourceVersionMatch=Exact")[:2] == (422, "Invalid")
    assert status(apiserver, "GET", p + "?resourceVersionMatch=NotOlderThan")[:2] == (422, "Invalid")
    assert status(apiserver, "GET", p + "?watch=1&sendInitialEvents=true")[:2] == (422, "Invalid")
    assert status(apiserver, "GET", p + "?watch=1&resourceVersionMatch=NotOlderThan&resourceVersion=1")[:2] == (
        422, "Invalid")
    assert status(apiserver, "GET", p + "?watch=maybe")[:2] == (400, "BadRequest")
    # a resourceVersion from the future: the server waits briefly, then 504 ResourceVersionTooLarge
    t0 = time.monotonic()
    code, reason, doc = status(apiserver, "GET", p + "?resourceVersion=999999999&resourceVersionMatch=NotOlderThan")
    assert (code, reason) == (504, "Timeout") and time.monotonic() - t0 < 10
    assert doc["details"]["causes"][0]["reason"] == "ResourceVersionTooLarge"


def test_conflicts_and_preconditions(apiserver: Any, ns: str) -> None:
    p = f"/api/v1/namespaces/{ns}/services"
    code, obj, _ = call(apiserver, "POST", p, svc("cas"))
    assert code == 201
    assert status(apiserver, "POST", p, svc("cas"))[:2] == (409, "AlreadyExists")
    stale = json.loads(json.dumps(obj))
    obj["metadata"]["labels"] = {"v": "2"}
    assert call(apiserver, "PUT", f"{p}/cas", obj)[0] == 200
    stale["metadata"]["labels"] = {"v": "stale"}
    code, reason, doc = status(apiserver, "PUT", f"{p}/cas", stale)
    assert (code, reason) == (409, "Conflict") and "the object has been modified" in doc["message"]
    code, reason, _ = status(apiserver, "DELETE", f"{p}/cas",
                             {"kind": "DeleteOptions", "apiVersion": "v1", "preconditions": {"uid": "wrong"}})
    assert (code, reason) == (409, "Conflict")
    assert status(apiserver, "PATCH", f"{p}/cas", {"metadata": {"resourceVersion": "1", "labels": {"x": "y"}}},
                  ctype="application/merge-patch+json")[:2] == (409, "Conflict")
    _, now, _ = call(apiserver, "GET", f"{p}/cas")
    assert now["metadata"]["labels"] == {"v": "2"}


def test_patch_and_verbs(apiserver: Any, ns: str) -> None:
    p = f"/api/v1/namespaces/{ns}/services"
    assert call(apiserver, "POST", p, svc("pv"))[0] == 201
    assert status(apiserver, "PATCH", f"{p}/pv", {"a": 1}, ctype="text/plain")[:2] == (415, "UnsupportedMediaType")
    assert status(apiserver, "PATCH", f"{p}/pv", {"a": 1}, ctype="application/json-patch+json")[:2] == (
        400, "BadRequest")
    assert status(apiserver, "PATCH", f"{p}/pv", [{"op": "remove", "path": "/nope"}],
                  ctype="application/json-patch+json")[0] in (422, 400)
    assert status(apiserver, "PATCH", f"{p}/pv", {"a": 1}, ctype="application/apply-patch+yaml")[:2] == (
        422, "Invalid")  # no fieldManager
    assert status(apiserver, "PUT", p, svc("pv"))[:2] == (405, "MethodNotAllowed")
    assert status(apiserver, "POST", f"{p}/pv", svc("pv"))[:2] == (405, "MethodNotAllowed")
    assert status(apiserver, "GET", f"{p}/pv/binding")[:2] == (404, "NotFound")
    assert status(apiserver, "GET", "/api/v1/frobs")[:2] == (404, "NotFound")
    assert status(apiserver, "GET", "/apis/apps/v1/namespaces/default/deployments")[:2] == (404, "NotFound")
    assert status(apiserver, "GET", "/nonsense")[:2] == (404, "NotFound")
    assert status(apiserver, "POST", f"{p}?dryRun=Bogus", svc("dry"))[0] in (400, 422)


def test_dry_run_writes_nothing(apiserver: Any, ns: str) -> None:
    p = f"/api/v1/namespaces/{ns}/services"
    code, obj, _ = call(apiserver, "POST", p + "?dryRun=All", svc("dry"))
    assert code == 201 and obj["metadata"]["uid"] and obj["spec"]["clusterIP"]
    assert status(apiserver, "GET", f"{p}/dry")[:2] == (404, "NotFound")
    assert call(apiserver, "POST", p, svc("dry"))[0] == 201
    code, obj, _ = call(apiserver, "DELETE", f"{p}/dry?dryRun=All")
    assert code == 200
    assert call(apiserver, "GET", f"{p}/dry")[0] == 200


def test_server_still_up(apiserver: Any) -> None:
    assert apiserver.get("/healthz") == b"ok"
    assert apiserver.proc.poll() is None
    assert "Traceback" not in apiserver.log()


def test_unknown_field_with_control_characters_warns_safely(apiserver: Any, ns: str) -> None:
    """fieldValidation=Warn names unknown fields in Warning headers: a field name holding control
    characters is escaped there (it once made the server drop the connection)."""
    p = f"/api/v1/namespaces/{ns}/services"
    assert call(apiserver, "POST", p, svc("ctl"))[0] == 201
    code, doc, hdrs = call(apiserver, "PATCH", f"{p}/ctl?fieldValidation=Warn",
                           raw=b'{"metadata": {"\\u001f": null, "\\u00e9": 1}}', ctype="application/merge-patch+json")
    assert code == 200, doc
    warning = " ".join(v for k, v in hdrs.items() if k.lower() == "warning")
    assert "\\u001f" in warning and "\x1f" not in warning
