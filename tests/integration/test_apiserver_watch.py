"""Watch wire behaviour over raw HTTPS: newline-terminated events, streaming lists (sendInitialEvents
with the initial-events-end bookmark), Table watches, fieldSelector'd item watches, DELETED objects,
fieldValidation Strict/Warn on writes."""

from __future__ import annotations

import http.client
import json
import uuid
from typing import Any

import pytest

pytestmark = pytest.mark.integration


def conn(srv: Any) -> http.client.HTTPSConnection:
    return http.client.HTTPSConnection("127.0.0.1", srv.port, context=srv.ssl_context(), timeout=15)


def req(srv: Any, method: str, path: str, body: Any = None, ctype: str = "application/json",
        headers: dict[str, str] | None = None) -> tuple[int, Any, http.client.HTTPResponse]:
    c = conn(srv)
    h = {"Authorization": f"Bearer {srv.token}", **(headers or {})}
    data = None
    if body is not None:
        data = json.dumps(body).encode()
        h["Content-Type"] = ctype
    c.request(method, path, body=data, headers=h)
    r = c.getresponse()
    raw = r.read()
    return r.status, json.loads(raw) if raw else None, r


def stream(srv: Any, path: str, accept: str = "application/json") -> list[dict[str, Any]]:
    """All events of a watch that ends by itself (timeoutSeconds); checks each is one JSON line."""
    c = conn(srv)
    c.request("GET", path, headers={"Authorization": f"Bearer {srv.token}", "Accept": accept})
    r = c.getresponse()
    assert r.status == 200, r.read()
    body = r.read()
    assert body.endswith(b"\n") or body == b""
    return [json.loads(line) for line in body.split(b"\n") if line]


def svc(name: str, labels: dict[str, str] | None = None) -> dict[str, Any]:
    return {"apiVersion": "v1", "kind": "Service", "metadata": {"name": name, "labels": labels or {}},
            "spec": {"ports": [{"port": 80}]}}


@pytest.fixture(scope="module")
def ns(apiserver: Any) -> str:
    name = f"watch-{uuid.uuid4().hex[:6]}"
    assert req(apiserver, "POST", "/api/v1/namespaces", {"metadata": {"name": name}})[0] == 201
    return name


def test_streaming_list_with_initial_events_end(apiserver: Any, ns: str) -> None:
    p = f"/api/v1/namespaces/{ns}/services"
    for i in range(3):
        assert req(apiserver, "POST", p, svc(f"s{i}"))[0] == 201
    evs = stream(apiserver, p + "?watch=1&sendInitialEvents=true&resourceVersionMatch=NotOlderThan"
                 "&allowWatchBookmarks=true&timeoutSeconds=1")
    assert [(e["type"], e["object"]["metadata"].get("name")) for e in evs[:3]] == [
        ("ADDED", "s0"), ("ADDED", "s1"), ("ADDED", "s2")]
    end = evs[3]
    assert end["type"] == "BOOKMARK"
    assert end["object"]["kind"] == "Service" and end["object"]["apiVersion"] == "v1"
    assert end["object"]["metadata"]["annotations"] == {"k8s.io/initial-events-end": "true"}
    assert int(end["object"]["metadata"]["resourceVersion"]) >= max(
        int(e["object"]["metadata"]["resourceVersion"]) for e in evs[:3])


def test_item_watch_deleted_event_and_selector(apiserver: Any, ns: str) -> None:
    p = f"/api/v1/namespaces/{ns}/services"
    code, made, _ = req(apiserver, "POST", p, svc("gone"))
    assert code == 201
    req(apiserver, "POST", p, svc("other"))
    code, deleted, _ = req(apiserver, "DELETE", f"{p}/gone")
    assert code == 200
    evs = stream(apiserver, f"{p}?watch=true&fieldSelector=metadata.name%3Dgone&resourceVersion="
                 f"{made['metadata']['resourceVersion']}&timeoutSeconds=1")
    assert [e["type"] for e in evs] == ["DELETED"]
    obj = evs[0]["object"]
    assert obj["kind"] == "Service" and obj["metadata"]["uid"] == made["metadata"]["uid"]
    assert int(obj["metadata"]["resourceVersion"]) > int(made["metadata"]["resourceVersion"])


def test_table_watch_has_columns_once(apiserver: Any, ns: str) -> None:
    p = f"/api/v1/namespaces/{ns}/services"
    code, lst, _ = req(apiserver, "GET", p)
    rv = lst["metadata"]["resourceVersion"]
    req(apiserver, "POST", p, svc("t1"))
    req(apiserver, "POST", p, svc("t2"))
    accept = "application/json;as=Table;v=v1;g=meta.k8s.io,application/json"
    evs = stream(apiserver, f"{p}?watch=true&resourceVersion={rv}&timeoutSeconds=1", accept)
    assert [e["type"] for e in evs] == ["ADDED", "ADDED"]
    first, second = evs[0]["object"], evs[1]["object"]
    assert first["kind"] == "Table" and [c["name"] for c in first["columnDefinitions"]][:3] == [
        "Name", "Type", "Cluster-IP"]
    assert not second["columnDefinitions"]
    assert second["rows"][0]["cells"][0] == "t2"
    assert second["rows"][0]["object"]["kind"] == "PartialObjectMetadata"


def test_table_list_columns(apiserver: Any, ns: str) -> None:
    accept = "application/json;as=Table;v=v1;g=meta.k8s.io,application/json"
    code, table, r = req(apiserver, "GET", "/api/v1/namespaces", headers={"Accept": accept})
    assert code == 200 and table["kind"] == "Table"
    assert [c["name"] for c in table["columnDefinitions"]] == ["Name", "Status", "Age"]
    row = next(x for x in table["rows"] if x["cells"][0] == ns)
    assert row["cells"][1] == "Active"


def test_field_validation_modes(apiserver: Any, ns: str) -> None:
    p = f"/api/v1/namespaces/{ns}/services"
    bad = svc("fv")
    bad["spec"]["bogus"] = 1
    code, st, _ = req(apiserver, "POST", p + "?fieldValidation=Strict", bad)
    assert code == 400 and 'unknown field "spec.bogus"' in st["message"]
    code, obj, r = req(apiserver, "POST", p + "?fieldValidation=Warn", bad)
    assert code == 201 and "bogus" not in obj["spec"]
    assert r.getheader("Warning") == '299 - "unknown field \\"spec.bogus\\""'
    code, st, _ = req(apiserver, "POST", p + "?fieldValidation=Nope", svc("fv2"))
    assert code == 400
    code, st, _ = req(apiserver, "POST", p, {**svc("fv3"), "spec": {"ports": [{"port": "eighty"}]}})
    assert code == 400 and "cannot unmarshal" in st["message"]
