"""/openapi/v3 stub: enough for kubectl >= 1.29 to delegate validation to the server.

cli-runtime's query_param_verifier_v3 looks, per GVK, for a PATCH operation tagged with
x-kubernetes-group-version-kind that declares the `fieldValidation` query parameter; finding it,
kubectl sends `fieldValidation=Strict` and lets the server reject unknown fields. No schemas are
published (so `kubectl explain` is out of scope). The `hash` changes whenever the document does.
"""

from __future__ import annotations

import functools
import hashlib
from typing import Any

import orjson

from controlplane import resources
from controlplane.discovery import KUBE_VERSION

_PARAMS = [
    {"name": n, "in": "query", "schema": {"type": "string"}, "uniqueItems": True}
    for n in ("dryRun", "fieldManager", "fieldValidation", "force", "pretty")
]


def _gv_path(group: str, version: str) -> str:
    return f"apis/{group}/{version}" if group else f"api/{version}"


def _op(r: resources.Resource, action: str) -> dict[str, Any]:
    return {
        "operationId": f"{action}{r.kind}",
        "x-kubernetes-action": action,
        "x-kubernetes-group-version-kind": {"group": r.group, "version": r.version, "kind": r.kind},
        "parameters": _PARAMS if action in ("patch", "put", "post") else [],
        "responses": {"200": {"description": "OK"}},
    }


def _doc(group: str, version: str) -> dict[str, Any]:
    paths: dict[str, Any] = {}
    for r in resources.in_group_version(group, version):
        base = "/" + _gv_path(group, version)
        if r.namespaced:
            coll = f"{base}/namespaces/{{namespace}}/{r.resource}"
        else:
            coll = f"{base}/{r.resource}"
        item = f"{coll}/{{name}}"
        paths[coll] = {"get": _op(r, "list"), "post": _op(r, "post")}
        paths[item] = {"get": _op(r, "get"), "put": _op(r, "put"), "patch": _op(r, "patch"),
                       "delete": _op(r, "delete")}
        for sub in r.subresources:
            if sub in ("status",):
                paths[f"{item}/{sub}"] = {"get": _op(r, "get"), "put": _op(r, "put"), "patch": _op(r, "patch")}
    return {
        "openapi": "3.0.0",
        "info": {"title": "Kubernetes", "version": KUBE_VERSION["gitVersion"]},
        "paths": paths,
        "components": {"schemas": {}},
    }


@functools.cache
def group_version_doc(group: str, version: str) -> bytes | None:
    if not resources.in_group_version(group, version):
        return None
    return orjson.dumps(_doc(group, version))


@functools.cache
def root_doc() -> bytes:
    paths = {}
    for g, vs in resources.groups():
        for v in vs:
            doc = group_version_doc(g, v) or b""
            h = hashlib.sha512(doc).hexdigest()[:32].upper()
            p = _gv_path(g, v)
            paths[p] = {"serverRelativeURL": f"/openapi/v3/{p}?hash={h}"}
    return orjson.dumps({"paths": paths})


def lookup(path: str) -> bytes | None:
    """path after /openapi/v3/ (e.g. "api/v1", "apis/discovery.k8s.io/v1")."""
    parts = [p for p in path.split("/") if p]
    if len(parts) == 2 and parts[0] == "api":
        return group_version_doc("", parts[1])
    if len(parts) == 3 and parts[0] == "apis":
        return group_version_doc(parts[1], parts[2])
    return None
