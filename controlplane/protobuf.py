"""Decode the protobuf bodies unmodified kubectl >= 1.32 sends from its typed clients.

client-go >= 0.32 POSTs `application/vnd.kubernetes.protobuf` for typed creates, e.g.
`kubectl create namespace` and `kubectl create service clusterip` (reference §0.2). The wire form
is the 4-byte magic `k8s\\0` + runtime.Unknown{typeMeta{apiVersion, kind}, raw, ...}; `raw` is the
object in the field numbering of k8s.io/api's generated.proto. Only Namespace and Service (the
kinds kubectl's generators create here) are mapped; anything else is 415 "use JSON".
"""

from __future__ import annotations

import datetime as dt
from typing import Any

from controlplane import errors

MAGIC = b"k8s\x00"

# message name -> {field number: (json name, type, repeated)}
# types: str, int, bool, map (map<string,string>), time, ios (IntOrString), or a message name
Schema = dict[int, tuple[str, str, bool]]

MESSAGES: dict[str, Schema] = {
    "Unknown": {1: ("typeMeta", "TypeMeta", False), 2: ("raw", "bytes", False),
                3: ("contentEncoding", "str", False), 4: ("contentType", "str", False)},
    "TypeMeta": {1: ("apiVersion", "str", False), 2: ("kind", "str", False)},
    "ObjectMeta": {
        1: ("name", "str", False), 2: ("generateName", "str", False), 3: ("namespace", "str", False),
        5: ("uid", "str", False), 6: ("resourceVersion", "str", False), 7: ("generation", "int", False),
        8: ("creationTimestamp", "time", False), 9: ("deletionTimestamp", "time", False),
        10: ("deletionGracePeriodSeconds", "int", False), 11: ("labels", "map", False),
        12: ("annotations", "map", False), 13: ("ownerReferences", "OwnerReference", True),
        14: ("finalizers", "str", True),
    },
    "OwnerReference": {1: ("kind", "str", False), 3: ("name", "str", False), 4: ("uid", "str", False),
                       5: ("apiVersion", "str", False), 6: ("controller", "bool", False),
                       7: ("blockOwnerDeletion", "bool", False)},
    "Namespace": {1: ("metadata", "ObjectMeta", False), 2: ("spec", "NamespaceSpec", False),
                  3: ("status", "NamespaceStatus", False)},
    "NamespaceSpec": {1: ("finalizers", "str", True)},
    "NamespaceStatus": {1: ("phase", "str", False)},
    "Service": {1: ("metadata", "ObjectMeta", False), 2: ("spec", "ServiceSpec", False)},
    "ServiceSpec": {
        1: ("ports", "ServicePort", True), 2: ("selector", "map", False), 3: ("clusterIP", "str", False),
        4: ("type", "str", False), 5: ("externalIPs", "str", True), 7: ("sessionAffinity", "str", False),
        10: ("externalName", "str", False), 11: ("externalTrafficPolicy", "str", False),
        18: ("clusterIPs", "str", True), 19: ("ipFamilies", "str", True), 17: ("ipFamilyPolicy", "str", False),
        22: ("internalTrafficPolicy", "str", False),
    },
    "ServicePort": {1: ("name", "str", False), 2: ("protocol", "str", False), 3: ("port", "int", False),
                    4: ("targetPort", "ios", False), 5: ("nodePort", "int", False),
                    6: ("appProtocol", "str", False)},
    "IntOrString": {1: ("type", "int", False), 2: ("intVal", "int", False), 3: ("strVal", "str", False)},
    "Time": {1: ("seconds", "int", False), 2: ("nanos", "int", False)},
    "MapEntry": {1: ("key", "str", False), 2: ("value", "str", False)},
}

KINDS = {("v1", "Namespace"), ("v1", "Service")}


class _Bad(Exception):
    pass


def _varint(b: bytes, i: int) -> tuple[int, int]:
    n = shift = 0
    while True:
        if i >= len(b) or shift > 63:
            raise _Bad("truncated varint")
        c = b[i]
        i += 1
        n |= (c & 0x7F) << shift
        if not c & 0x80:
            return n, i
        shift += 7


def _fields(b: bytes) -> list[tuple[int, int, Any]]:
    out = []
    i = 0
    while i < len(b):
        key, i = _varint(b, i)
        num, wt = key >> 3, key & 7
        v: int | bytes
        if wt == 0:
            v, i = _varint(b, i)
        elif wt == 2:
            ln, i = _varint(b, i)
            if i + ln > len(b):
                raise _Bad("truncated field")
            v, i = b[i : i + ln], i + ln
        elif wt == 1:
            v, i = b[i : i + 8], i + 8
        elif wt == 5:
            v, i = b[i : i + 4], i + 4
        else:
            raise _Bad(f"unsupported wire type {wt}")
        out.append((num, wt, v))
    return out


def _str(v: Any) -> str:
    if not isinstance(v, bytes):
        raise _Bad("expected a string")
    return v.decode("utf-8")


def _int(v: Any) -> int:
    if not isinstance(v, int):
        raise _Bad("expected an integer")
    return v - (1 << 64) if v >= 1 << 63 else v


def decode_message(b: bytes, name: str, depth: int = 0) -> dict[str, Any]:
    if depth > 20:
        raise _Bad("nested too deeply")
    schema = MESSAGES[name]
    out: dict[str, Any] = {}
    for num, _wt, v in _fields(b):
        f = schema.get(num)
        if f is None:
            continue  # a field this server does not map: dropped
        key, typ, repeated = f
        if typ == "str":
            val: Any = _str(v)
        elif typ == "bytes":
            val = bytes(v)
        elif typ == "int":
            val = _int(v)
        elif typ == "bool":
            val = bool(_int(v))
        elif typ == "map":
            e = decode_message(v, "MapEntry", depth + 1)
            out.setdefault(key, {})[e.get("key", "")] = e.get("value", "")
            continue
        elif typ == "time":
            t = decode_message(v, "Time", depth + 1)
            val = dt.datetime.fromtimestamp(t.get("seconds", 0), dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
        elif typ == "ios":
            t = decode_message(v, "IntOrString", depth + 1)
            val = t.get("strVal", "") if t.get("type") == 1 else t.get("intVal", 0)
        else:
            if not isinstance(v, bytes):
                raise _Bad(f"expected a message for {key}")
            val = decode_message(v, typ, depth + 1)
        if repeated:
            out.setdefault(key, []).append(val)
        elif val not in ("", 0, {}):  # (False == 0)
            out[key] = val  # zero values are dropped, as Go's omitempty does when re-encoding to JSON
    return out


def decode(body: bytes) -> dict[str, Any]:
    """The JSON-shaped object in a protobuf request body, or ApiError 415."""
    if not body.startswith(MAGIC):
        raise errors.unsupported_media_type("application/vnd.kubernetes.protobuf", ["application/json"])
    try:
        unk = decode_message(body[len(MAGIC):], "Unknown")
        tm = unk.get("typeMeta") or {}
        av, kind = tm.get("apiVersion", ""), tm.get("kind", "")
        if (av, kind) not in KINDS or unk.get("contentEncoding"):
            raise errors.ApiError(
                415, "UnsupportedMediaType",
                f"protobuf bodies are accepted only for {', '.join(k for _, k in sorted(KINDS))}; send {kind or 'this'} "
                "as JSON (Content-Type: application/json)",
            )
        obj = decode_message(unk.get("raw", b""), kind)
    except _Bad as e:
        raise errors.bad_request(f"error decoding protobuf body: {e}") from None
    except (UnicodeDecodeError, ValueError, OverflowError, OSError) as e:
        raise errors.bad_request(f"error decoding protobuf body: {e}") from None
    return {"apiVersion": av, "kind": kind, **obj}
