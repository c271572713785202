"""The object schema of the served kinds, as data: known fields per type, and the list/map
semantics strategic merge patch and server-side apply need.

    from controlplane import schema
    t = schema.root("Service")            # -> Type (struct) for the kind, or None
    t.fields["spec"].fields["ports"]     # -> Type(kind="list", elem=..., list_type="map", keys=("port","protocol"))

Known fields come from `schema_data.json`, generated from the official Python client's models
(which mirror the upstream OpenAPI; regenerate with `python -m controlplane.schema`); the list
strategies (patchStrategy/patchMergeKey for SMP, listType/listMapKey for SSA) are the table below,
keyed by the upstream Go type name and field, so they hold wherever a type is reused.
The same data can feed /openapi/v3 (`openapi_schemas()`).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from typing import Any

DATA = Path(__file__).with_name("schema_data.json")

ROOTS = {
    "Service": "V1Service",
    "EndpointSlice": "V1EndpointSlice",
    "Pod": "V1Pod",
    "Node": "V1Node",
    "Namespace": "V1Namespace",
}

# (type, field) -> (smp strategy, smp merge key, ssa list type, ssa keys, key defaults)
# smp strategy "" = replace (atomic); "merge" (merge by key, or set-union for primitive lists);
# "merge,retainKeys". ssa list type: "atomic" | "map" | "set".
ListRule = tuple[str, str, str, tuple[str, ...], dict[str, Any]]
_M = "merge"
LISTS: dict[tuple[str, str], ListRule] = {
    ("V1ObjectMeta", "finalizers"): (_M, "", "set", (), {}),
    ("V1ObjectMeta", "ownerReferences"): (_M, "uid", "map", ("uid",), {}),
    ("V1ServiceSpec", "ports"): (_M, "port", "map", ("port", "protocol"), {"protocol": "TCP"}),
    ("V1ServiceStatus", "conditions"): (_M, "type", "map", ("type",), {}),
    ("V1PodSpec", "containers"): (_M, "name", "map", ("name",), {}),
    ("V1PodSpec", "initContainers"): (_M, "name", "map", ("name",), {}),
    ("V1PodSpec", "ephemeralContainers"): (_M, "name", "map", ("name",), {}),
    ("V1PodSpec", "volumes"): ("merge,retainKeys", "name", "map", ("name",), {}),
    ("V1PodSpec", "imagePullSecrets"): (_M, "name", "map", ("name",), {}),
    ("V1PodSpec", "hostAliases"): (_M, "ip", "map", ("ip",), {}),
    ("V1PodSpec", "topologySpreadConstraints"): (_M, "topologyKey", "map", ("topologyKey", "whenUnsatisfiable"), {}),
    ("V1PodSpec", "schedulingGates"): (_M, "name", "map", ("name",), {}),
    ("V1PodSpec", "resourceClaims"): ("merge,retainKeys", "name", "map", ("name",), {}),
    ("V1Container", "ports"): (_M, "containerPort", "map", ("containerPort", "protocol"), {"protocol": "TCP"}),
    ("V1Container", "env"): (_M, "name", "map", ("name",), {}),
    ("V1Container", "volumeMounts"): (_M, "mountPath", "map", ("mountPath",), {}),
    ("V1Container", "volumeDevices"): (_M, "devicePath", "map", ("devicePath",), {}),
    ("V1EphemeralContainer", "ports"): (_M, "containerPort", "map", ("containerPort", "protocol"), {"protocol": "TCP"}),
    ("V1EphemeralContainer", "env"): (_M, "name", "map", ("name",), {}),
    ("V1EphemeralContainer", "volumeMounts"): (_M, "mountPath", "map", ("mountPath",), {}),
    ("V1PodStatus", "conditions"): (_M, "type", "map", ("type",), {}),
    ("V1PodStatus", "podIPs"): (_M, "ip", "map", ("ip",), {}),
    ("V1PodStatus", "hostIPs"): (_M, "ip", "map", ("ip",), {}),
    ("V1NodeSpec", "podCIDRs"): (_M, "", "set", (), {}),
    ("V1NodeStatus", "addresses"): (_M, "type", "map", ("type",), {}),
    ("V1NodeStatus", "conditions"): (_M, "type", "map", ("type",), {}),
    ("V1NamespaceStatus", "conditions"): (_M, "type", "map", ("type",), {}),
}
# maps that are atomic for SSA (x-kubernetes-map-type: atomic) -> owned as one leaf
ATOMIC_MAPS: set[tuple[str, str]] = {("V1ServiceSpec", "selector"), ("V1PodSpec", "nodeSelector")}
# struct types that SSA treats as atomic (x-kubernetes-map-type atomic on the struct)
ATOMIC_STRUCTS: set[str] = {"V1LocalObjectReference", "V1ObjectReference", "V1TypedLocalObjectReference",
                            "V1ObjectFieldSelector", "V1ResourceFieldSelector", "V1ConfigMapKeySelector",
                            "V1SecretKeySelector", "V1NodeSelector"}


@dataclass(frozen=True, eq=False)
class Type:
    kind: str  # "scalar" | "struct" | "map" | "list" | "any"
    name: str = ""  # Go-ish type name for structs (V1ServiceSpec), scalar type for scalars
    fields: dict[str, Type] = field(default_factory=dict)
    elem: Type | None = None
    # lists
    strategy: str = ""
    merge_key: str = ""
    list_type: str = "atomic"
    keys: tuple[str, ...] = ()
    key_defaults: dict[str, Any] = field(default_factory=dict)
    atomic: bool = False  # maps/structs owned as a whole by SSA


ANY = Type("any")
_SCALARS = {"str": "string", "int": "integer", "bool": "boolean", "float": "number", "datetime": "string",
            "date": "string", "object": "any", "bytearray": "string"}


def _parse(spec: str) -> tuple[str, str]:
    m = re.fullmatch(r"List\[(.+)\]", spec)
    if m:
        return "list", m.group(1)
    m = re.fullmatch(r"Dict\[str, (.+)\]", spec)
    if m:
        return "map", m.group(1)
    return "ref", spec


@cache
def _data() -> dict[str, dict[str, str]]:
    d: dict[str, dict[str, str]] = json.loads(DATA.read_text())
    return d


def _build(tname: str, memo: dict[str, Type], owner: str = "", fname: str = "") -> Type:
    kind, inner = _parse(tname)
    if kind == "list":
        elem = _build(inner, memo)
        rule = LISTS.get((owner, fname))
        if rule:
            strat, mkey, ltype, keys, kdef = rule
            return Type("list", elem=elem, strategy=strat, merge_key=mkey, list_type=ltype, keys=keys, key_defaults=kdef)
        return Type("list", elem=elem)
    if kind == "map":
        return Type("map", elem=_build(inner, memo), atomic=(owner, fname) in ATOMIC_MAPS)
    if inner in _SCALARS:
        s = _SCALARS[inner]
        return ANY if s == "any" else Type("scalar", s)
    if inner in memo:
        return memo[inner]
    types = _data()
    if inner not in types:
        return ANY
    t = Type("struct", inner, atomic=inner in ATOMIC_STRUCTS)
    memo[inner] = t
    for f, ft in types[inner].items():
        t.fields[f] = _build(ft, memo, inner, f)
    return t


@cache
def _all() -> dict[str, Type]:
    memo: dict[str, Type] = {}
    return {kind: _build(tn, memo) for kind, tn in ROOTS.items()}


def root(kind: str) -> Type | None:
    return _all().get(kind)


# ---------------------------------------------------------------- OpenAPI v3 fragments


def openapi_schemas() -> dict[str, Any]:
    """components.schemas for the served kinds (names like upstream: io.k8s.api.core.v1.Service)."""
    out: dict[str, Any] = {}
    seen: set[str] = set()

    def ref(t: Type) -> dict[str, Any]:
        if t.kind == "scalar":
            return {"type": t.name}
        if t.kind == "any":
            return {"x-kubernetes-preserve-unknown-fields": True}
        if t.kind == "map":
            assert t.elem is not None
            return {"type": "object", "additionalProperties": ref(t.elem)}
        if t.kind == "list":
            assert t.elem is not None
            d: dict[str, Any] = {"type": "array", "items": ref(t.elem)}
            if t.list_type != "atomic":
                d["x-kubernetes-list-type"] = t.list_type
            if t.keys:
                d["x-kubernetes-list-map-keys"] = list(t.keys)
            if t.strategy:
                d["x-kubernetes-patch-strategy"] = t.strategy
            if t.merge_key:
                d["x-kubernetes-patch-merge-key"] = t.merge_key
            return d
        name = _openapi_name(t.name)
        if t.name not in seen:
            seen.add(t.name)
            out[name] = {"type": "object", "properties": {f: ref(ft) for f, ft in t.fields.items()}}
        return {"$ref": f"#/components/schemas/{name}"}

    for kind, t in _all().items():
        ref(t)
        group = "discovery" if kind == "EndpointSlice" else ""
        out[_openapi_name(t.name)]["x-kubernetes-group-version-kind"] = [
            {"group": "discovery.k8s.io" if group else "", "version": "v1", "kind": kind}]
    return out


def _openapi_name(tname: str) -> str:
    m = re.fullmatch(r"(V1|DiscoveryV1|CoreV1)(.+)", tname)
    base = m.group(2) if m else tname
    discovery = {"EndpointSlice", "Endpoint", "EndpointConditions", "EndpointHints", "ForZone", "ForNode",
                 "EndpointPort"}
    if base in ("ObjectMeta", "ManagedFieldsEntry", "OwnerReference", "LabelSelector", "LabelSelectorRequirement",
                "Time", "Condition"):
        return f"io.k8s.apimachinery.pkg.apis.meta.v1.{base}"
    if base in discovery and not (m and m.group(1) == "CoreV1"):
        return f"io.k8s.api.discovery.v1.{base}"
    return f"io.k8s.api.core.v1.{base}"


# ---------------------------------------------------------------- generator (dev only)


def generate() -> dict[str, dict[str, str]]:
    """Walk the official client's models from the five roots; JSON names and type strings only."""
    from kubernetes.client import models  # dev dependency, only needed to regenerate

    out: dict[str, dict[str, str]] = {}

    def visit(tname: str) -> None:
        kind, inner = _parse(tname)
        if kind != "ref":
            visit(inner)
            return
        if inner in _SCALARS or inner in out:
            return
        cls = getattr(models, inner, None)
        if cls is None:
            return
        out[inner] = {}
        for attr, ts in cls.openapi_types.items():
            out[inner][cls.attribute_map[attr]] = ts
        for ts in cls.openapi_types.values():
            visit(ts)

    for t in ROOTS.values():
        visit(t)
    return dict(sorted(out.items()))


if __name__ == "__main__":
    DATA.write_text(json.dumps(generate(), indent=0, sort_keys=True, separators=(",", ":")) + "\n")
    print(f"wrote {DATA} ({DATA.stat().st_size} bytes)")
