"""PATCH bodies: JSON merge patch (RFC 7386), JSON patch (RFC 6902), strategic merge patch, and
(re-exported from `ssa`) server-side apply and managedFields bookkeeping.

Call signatures for the REST layer (H2a); each returns the patched object (a new dict; the input
is not modified) or raises `PatchError` (`.code` 400/409/422, `.reason`, `.details`, `str()` = message):

    merge_patch(current, patch)                       # application/merge-patch+json
    json_patch(current, ops)                          # application/json-patch+json
    strategic_merge_patch(current, patch, kind)       # application/strategic-merge-patch+json
    server_side_apply(current_or_None, applied, kind, manager=..., force=False,
                      api_version="v1", subresource="")   # application/apply-patch+yaml
    update_managed_fields(old_or_None, new, manager, operation, api_version, subresource="")

Strategic merge: `null` deletes; lists merge by the merge key of the upstream Go type
(schema.LISTS), other lists replace; directives `$patch: replace|delete|merge`, `$retainKeys`,
`$deleteFromPrimitiveList/<f>`, `$setElementOrder/<f>` as kubectl sends them.
"""

from __future__ import annotations

import copy
import importlib
import json
from typing import Any

import jsonpatch
import orjson

from controlplane import schema
from controlplane.schema import Type

Obj = dict[str, Any]

GENERIC_422 = "the server rejected our request due to an error in our request"
MAX_JSON_PATCH_OPS = 10000


def clone(v: Any) -> Any:
    """Deep copy of a JSON value, several times faster than copy.deepcopy."""
    try:
        return orjson.loads(orjson.dumps(v))
    except (TypeError, orjson.JSONEncodeError):
        return copy.deepcopy(v)


class PatchError(Exception):
    def __init__(self, code: int, reason: str, message: str, details: dict[str, Any] | None = None) -> None:
        super().__init__(message)
        self.code = code
        self.reason = reason
        self.message = message
        self.details = details


def _invalid_patch(patch: Any, err: str) -> PatchError:
    """What apiserver answers when a strategic merge patch cannot be applied (422, field `patch`)."""
    raw = json.dumps(patch, separators=(",", ":")) if not isinstance(patch, str) else patch
    msg = f"Invalid value: {json.dumps(raw)}: {err}"
    return PatchError(422, "Invalid", f' "" is invalid: patch: {msg}',
                      {"causes": [{"reason": "FieldValueInvalid", "message": msg, "field": "patch"}]})


# ---------------------------------------------------------------- RFC 7386


def _merge(target: Any, patch: Any) -> Any:
    if not isinstance(patch, dict):
        return copy.deepcopy(patch)
    out = dict(target) if isinstance(target, dict) else {}
    for k, v in patch.items():
        if v is None:
            out.pop(k, None)
        else:
            out[k] = _merge(out.get(k), v)
    return out


def merge_patch(current: Obj, patch: Any) -> Obj:
    result = _merge(clone(current), patch)
    if not isinstance(result, dict):
        raise PatchError(400, "BadRequest", "the merge patch must be a JSON object")
    return result


# ---------------------------------------------------------------- RFC 6902


def _json_patch_failed(msg: str) -> PatchError:
    return PatchError(422, "Invalid", GENERIC_422, {"causes": [{"reason": "UnexpectedServerResponse", "message": msg}]})


def json_patch(current: Obj, ops: Any) -> Obj:
    if not isinstance(ops, list):
        raise PatchError(400, "BadRequest", "json: cannot unmarshal object into Go value of type jsonpatch.Patch")
    if len(ops) > MAX_JSON_PATCH_OPS:
        raise PatchError(413, "RequestEntityTooLarge",
                         f"The allowed maximum operations in a JSON patch is {MAX_JSON_PATCH_OPS}, got {len(ops)}")
    for op in ops:
        if not isinstance(op, dict) or "op" not in op:
            raise PatchError(400, "BadRequest", "Unexpected kind: <nil>" if isinstance(op, dict) else "invalid JSON patch operation")
    result: Any = clone(current)
    for op in ops:
        try:
            result = jsonpatch.JsonPatch([op]).apply(result, in_place=True)
        except jsonpatch.InvalidJsonPatch as e:
            raise PatchError(400, "BadRequest", str(e)) from None
        except jsonpatch.JsonPatchTestFailed:
            raise _json_patch_failed(f"testing value {op.get('path')} failed: test failed") from None
        except (jsonpatch.JsonPatchException, jsonpatch.JsonPointerException, KeyError, IndexError, TypeError):
            raise _json_patch_failed(
                f"{op.get('op')} operation does not apply: doc is missing path: {json.dumps(op.get('path'))}: missing value"
            ) from None
    if not isinstance(result, dict):
        raise PatchError(422, "Invalid", GENERIC_422,
                         {"causes": [{"reason": "UnexpectedServerResponse", "message": "the result is not an object"}]})
    return result


# ---------------------------------------------------------------- strategic merge patch

_DIRECTIVE = "$patch"
_RETAIN = "$retainKeys"
_DEL_PRIM = "$deleteFromPrimitiveList/"
_ORDER = "$setElementOrder/"


def _field(t: Type | None, name: str) -> Type | None:
    if t is None or t.kind == "any":
        return None
    if t.kind == "struct":
        return t.fields.get(name)
    if t.kind == "map":
        return t.elem
    return None


def _strip(v: Any, t: Type | None) -> Any:
    """A patch value landing where nothing was: merge it against emptiness (drops directives)."""
    if isinstance(v, dict):
        return _smp_map({}, v, t)
    if isinstance(v, list):
        return _smp_list([], v, t, None)
    return copy.deepcopy(v)


def _smp_map(orig: Obj, patch: Obj, t: Type | None) -> Any:
    d = patch.get(_DIRECTIVE)
    if d == "replace":
        return _strip({k: v for k, v in patch.items() if k != _DIRECTIVE}, t)
    if d == "delete":
        return None
    if d not in (None, "merge"):
        raise ValueError(f"Unknown patch type: {d}")
    out = dict(orig)
    retain = patch.get(_RETAIN)
    if retain is not None:
        if not isinstance(retain, list):
            raise ValueError("$retainKeys must be a list")
        keep = set(retain)
        for k in list(out):
            if k not in keep:
                del out[k]
    orders: dict[str, list[Any]] = {}
    for k, v in patch.items():
        if k.startswith(_DEL_PRIM):
            f = k[len(_DEL_PRIM):]
            if isinstance(out.get(f), list) and isinstance(v, list):
                out[f] = [x for x in out[f] if x not in v]
        elif k.startswith(_ORDER):
            if not isinstance(v, list):
                raise ValueError(f"{k} must be a list")
            orders[k[len(_ORDER):]] = v
    for k, v in patch.items():
        if k in (_DIRECTIVE, _RETAIN) or k.startswith(_DEL_PRIM) or k.startswith(_ORDER):
            continue
        ft = _field(t, k)
        if v is None:
            out.pop(k, None)
            continue
        cur = out.get(k)
        if isinstance(v, dict):
            if v.get(_DIRECTIVE) == "delete" and len(v) == 1:
                out.pop(k, None)
                continue
            merged = _smp_map(cur if isinstance(cur, dict) else {}, v, ft)
            if merged is None:
                out.pop(k, None)
            else:
                out[k] = merged
        elif isinstance(v, list):
            out[k] = _smp_list(cur if isinstance(cur, list) else [], v, ft, orders.get(k))
        else:
            out[k] = copy.deepcopy(v)
    # $setElementOrder for a list the patch did not touch
    for f, order in orders.items():
        if f not in patch and isinstance(out.get(f), list):
            out[f] = _apply_order(out[f], order, _merge_key(_field(t, f)), out[f])
    return out


def _merge_key(t: Type | None) -> str:
    return t.merge_key if t is not None and t.kind == "list" else ""


def _smp_list(orig: list[Any], patch: list[Any], t: Type | None, order: list[Any] | None) -> list[Any]:
    elem = t.elem if t is not None and t.kind == "list" else None
    strategy = t.strategy if t is not None and t.kind == "list" else ""
    if any(isinstance(x, dict) and x.get(_DIRECTIVE) == "replace" for x in patch):
        return [_strip(x, elem) for x in patch if not (isinstance(x, dict) and x.get(_DIRECTIVE) == "replace")]
    if not strategy.startswith("merge"):
        return [_strip(x, elem) for x in patch]
    key = t.merge_key if t is not None else ""
    if not key:  # primitive set: union, keep original order, append new
        out = list(orig)
        for x in patch:
            if x not in out:
                out.append(copy.deepcopy(x))
        return _apply_order(out, order, "", orig) if order is not None else out
    out = list(orig)  # the caller's copy: items are replaced, never changed in place
    for item in patch:
        if not isinstance(item, dict):
            raise ValueError(f"the list items of a merge list must be objects keyed by {key!r}")
        if key not in item:
            raise ValueError(f"map: {item} does not contain declared merge key: {key}")
        kv = item[key]
        idx = next((i for i, x in enumerate(out) if isinstance(x, dict) and x.get(key) == kv), None)
        d = item.get(_DIRECTIVE)
        if d == "delete":
            out = [x for x in out if not (isinstance(x, dict) and x.get(key) == kv)]
            continue
        if idx is None:
            out.append(_strip(item, elem))
        else:
            merged = _smp_map(out[idx], item, elem)
            if merged is None:
                del out[idx]
            else:
                out[idx] = merged
    return _apply_order(out, order, key, orig) if order is not None else out


def _apply_order(items: list[Any], order: list[Any] | None, key: str, orig: list[Any]) -> list[Any]:
    """$setElementOrder: listed items in that order; items only the server has keep their place
    relative to the original list (upstream normalizeElementOrder)."""
    if order is None:
        return items

    def ident(x: Any) -> Any:
        v = x.get(key) if key and isinstance(x, dict) else x
        return json.dumps(v, sort_keys=True)

    wanted = [ident(o) for o in order]
    pos = {w: i for i, w in enumerate(wanted)}
    orig_idx = {ident(x): i for i, x in enumerate(orig)}
    listed = sorted((x for x in items if ident(x) in pos), key=lambda x: pos[ident(x)])
    server_only = [x for x in items if ident(x) not in pos]
    out: list[Any] = []
    si = 0
    for x in listed:
        # upstream mergeSortedSlice: a server-only item goes first unless both are in the
        # original list and the listed one came earlier there
        oi = orig_idx.get(ident(x))
        while si < len(server_only) and (oi is None or orig_idx.get(ident(server_only[si]), -1) < oi):
            out.append(server_only[si])
            si += 1
        out.append(x)
    out.extend(server_only[si:])
    return out


def strategic_merge_patch(current: Obj, patch: Any, kind: str) -> Obj:
    if not isinstance(patch, dict):
        raise _invalid_patch(patch, "the strategic merge patch must be a JSON object")
    try:
        result = _smp_map(clone(current), patch, schema.root(kind))
    except ValueError as e:
        raise _invalid_patch(patch, str(e)) from None
    if not isinstance(result, dict):
        raise _invalid_patch(patch, "the patch deletes the whole object")
    return result


def server_side_apply(
    current: Obj | None,
    applied: Any,
    kind: str,
    *,
    manager: str,
    force: bool = False,
    api_version: str = "v1",
    subresource: str = "",
) -> Obj:
    ssa = importlib.import_module("controlplane.ssa")
    return ssa.apply(current, applied, kind, manager=manager, force=force, api_version=api_version,
                     subresource=subresource)


def update_managed_fields(
    old: Obj | None, new: Obj, manager: str, operation: str = "Update", api_version: str = "v1", subresource: str = ""
) -> None:
    ssa = importlib.import_module("controlplane.ssa")
    ssa.record_update(old, new, manager, operation=operation, api_version=api_version, subresource=subresource)
