"""Legacy discovery documents (always application/json): /api, /apis, /apis/G, resource lists, /version.

Aggregated discovery is deliberately not offered: client-go picks the format from the response
Content-Type, and legacy JSON works for every kubectl 1.27-1.33 (reference §0.5, §2.1).
"""

from __future__ import annotations

from typing import Any

from controlplane import resources

KUBE_VERSION = {"major": "1", "minor": "33", "gitVersion": "v1.33.0-kpx"}


def version() -> dict[str, Any]:
    return {
        **KUBE_VERSION,
        "gitCommit": "0000000000000000000000000000000000000000",
        "gitTreeState": "clean",
        "buildDate": "2026-01-01T00:00:00Z",
        "goVersion": "go1.24.0",
        "compiler": "gc",
        "platform": "linux/amd64",
    }


def api_versions(server_address: str) -> dict[str, Any]:
    return {
        "kind": "APIVersions",
        "versions": ["v1"],
        "serverAddressByClientCIDRs": [{"clientCIDR": "0.0.0.0/0", "serverAddress": server_address}],
    }


def _group(name: str, versions: list[str]) -> dict[str, Any]:
    vs = [{"groupVersion": f"{name}/{v}", "version": v} for v in versions]
    return {"name": name, "versions": vs, "preferredVersion": vs[0]}


def api_group_list() -> dict[str, Any]:
    return {
        "kind": "APIGroupList",
        "apiVersion": "v1",
        "groups": [_group(g, vs) for g, vs in resources.groups() if g],
    }


def api_group(name: str) -> dict[str, Any] | None:
    for g, vs in resources.groups():
        if g and g == name:
            return {"kind": "APIGroup", "apiVersion": "v1", **_group(g, vs)}
    return None


def resource_list(group: str, version: str) -> dict[str, Any] | None:
    rs = resources.in_group_version(group, version)
    if not rs:
        return None
    out: list[dict[str, Any]] = []
    for r in rs:
        entry: dict[str, Any] = {
            "name": r.resource,
            "singularName": r.singular,
            "namespaced": r.namespaced,
            "kind": r.kind,
            "verbs": list(r.verbs),
        }
        if r.short_names:
            entry["shortNames"] = list(r.short_names)
        if r.categories:
            entry["categories"] = list(r.categories)
        out.append(entry)
        for sub in r.subresources:
            if sub in r.create_only_subresources:
                verbs, kind = ["create"], "Binding"
            elif sub == "finalize":
                verbs, kind = ["update"], r.kind
            else:
                verbs, kind = ["get", "patch", "update"], r.kind
            out.append({"name": f"{r.resource}/{sub}", "singularName": "", "namespaced": r.namespaced,
                        "kind": kind, "verbs": verbs})
    gv = f"{group}/{version}" if group else version
    return {"kind": "APIResourceList", "apiVersion": "v1", "groupVersion": gv, "resources": out}
