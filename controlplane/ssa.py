"""Server-side apply and managedFields, the structured-merge-diff way (field sets per manager).

Call signatures for the REST layer (H2a), usually through `controlplane.patch`:

    obj = ssa.apply(live_or_None, applied, kind, manager="kubectl", force=False,
                    api_version="v1", subresource="")        # raises patch.PatchError (409 on conflicts)
    ssa.record_update(old_or_None, new, manager, operation="Update", api_version="v1", subresource="")

`apply` returns the merged object with `metadata.managedFields` updated (the caller then defaults,
validates and writes it; a None live object means create). `record_update` updates
`new["metadata"]["managedFields"]` in place for a create/update/patch by `manager`.

Field sets are the upstream FieldsV1 encoding: `f:<field>`, `k:{"port":80,"protocol":"TCP"}` for
items of associative lists (keys per schema.LISTS, with key defaults), `v:<json>` for set items,
`.` for a node that is itself owned. Conflicts: an applied field owned by another manager whose
value the apply would change -> 409 Conflict with `FieldManagerConflict` causes, unless force.
"""

from __future__ import annotations

import json
from datetime import UTC, datetime
from typing import Any

from controlplane import schema
from controlplane.patch import PatchError, clone
from controlplane.schema import Type

Obj = dict[str, Any]


def _map(v: Any) -> dict[str, Any]:
    return v if isinstance(v, dict) else {}


def _list(v: Any) -> list[Any]:
    return v if isinstance(v, list) else []
Path = tuple[str, ...]
_MISSING = object()

_SERVER_META = ("name", "namespace", "uid", "resourceVersion", "creationTimestamp", "generation", "managedFields",
                "selfLink", "deletionTimestamp", "deletionGracePeriodSeconds")
_HAS_STATUS = {"Service", "Pod", "Node", "Namespace"}


def _now() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _dumps(v: Any) -> str:
    return json.dumps(v, sort_keys=True, separators=(",", ":"))


def _field(t: Type | None, name: str) -> Type | None:
    if t is None:
        return None
    if t.kind == "struct":
        return t.fields.get(name)
    if t.kind == "map":
        return t.elem
    return None


def _item_key(item: Any, t: Type) -> str:
    if not isinstance(item, dict):
        return "v:" + _dumps(item)
    key = {}
    for k in t.keys:
        v = item.get(k, t.key_defaults.get(k, _MISSING))
        if v is not _MISSING:
            key[k] = v
    return "k:" + _dumps(key)


def _strip(obj: Obj, kind: str, subresource: str) -> Obj:
    """The part of an object field ownership is tracked for."""
    o = {k: v for k, v in obj.items() if k not in ("apiVersion", "kind")}
    meta = o.get("metadata")
    if isinstance(meta, dict):
        meta = {k: v for k, v in meta.items() if k not in _SERVER_META}
        if meta:
            o["metadata"] = meta
        else:
            o.pop("metadata")
    if kind in _HAS_STATUS:
        if subresource == "status":
            o = {"status": o["status"]} if "status" in o else {}
        else:
            o.pop("status", None)
    return o


# ---------------------------------------------------------------- field sets


def fieldset(value: Any, t: Type | None, prefix: Path = (), *, marks: bool = False) -> set[Path]:
    """The paths `value` sets. `marks=True` is the Update form: a non-empty map (labels,
    annotations, ...) is itself a member too (FieldsV1 `.`), as upstream records it for updates."""
    out: set[Path] = set()
    _collect(value, t, prefix, out, marks)
    return out


def _is_map(t: Type | None) -> bool:
    return t is not None and t.kind == "map" and not t.atomic


def _collect(value: Any, t: Type | None, prefix: Path, out: set[Path], marks: bool = False) -> None:
    if isinstance(value, dict) and (t is None or (t.kind in ("struct", "map") and not t.atomic)):
        if not value:
            if prefix:
                out.add(prefix)
            return
        if marks and prefix and _is_map(t):
            out.add(prefix)
        for k, v in value.items():
            _collect(v, _field(t, k), (*prefix, "f:" + k), out, marks)
        return
    if isinstance(value, list) and t is not None and t.kind == "list" and t.list_type in ("map", "set") and value:
        for item in value:
            p = (*prefix, _item_key(item, t) if t.list_type == "map" else "v:" + _dumps(item))
            out.add(p)
            if t.list_type == "map" and isinstance(item, dict):
                for k, v in item.items():
                    _collect(v, _field(t.elem, k), (*p, "f:" + k), out, marks)
        return
    if prefix:
        out.add(prefix)


def _get(obj: Any, path: Path, t: Type | None) -> tuple[Any, Type | None]:
    cur: Any = obj
    for el in path:
        if el.startswith("f:"):
            if not isinstance(cur, dict) or el[2:] not in cur:
                return _MISSING, None
            cur, t = cur[el[2:]], _field(t, el[2:])
        else:
            if not isinstance(cur, list) or t is None or t.kind != "list":
                return _MISSING, None
            lt = t
            cur = next((x for x in cur if _item_key(x, lt) == el or ("v:" + _dumps(x)) == el), _MISSING)
            if cur is _MISSING:
                return _MISSING, None
            t = lt.elem
    return cur, t


def _delete(obj: Any, path: Path, t: Type | None) -> None:
    parent, pt = _get(obj, path[:-1], t)
    el = path[-1]
    if el.startswith("f:"):
        if isinstance(parent, dict):
            parent.pop(el[2:], None)
    elif isinstance(parent, list) and pt is not None and pt.kind == "list":
        lt = pt
        parent[:] = [x for x in parent if not (_item_key(x, lt) == el or ("v:" + _dumps(x)) == el)]


def encode(fs: set[Path]) -> Obj:
    """Field set -> FieldsV1 JSON."""
    root: Obj = {}
    for p in sorted(fs):
        node = root
        for el in p:
            node = node.setdefault(el, {})
        node["."] = node.get(".", {})
    def fin(n: Obj) -> Obj:
        kids = {k: fin(v) for k, v in n.items() if k != "."}
        if "." in n and kids:
            return {".": {}, **dict(sorted(kids.items()))}
        return dict(sorted(kids.items()))
    return fin(root)


def decode(f: Any, prefix: Path = ()) -> set[Path]:
    out: set[Path] = set()
    if not isinstance(f, dict):
        return out
    if not f and prefix:
        out.add(prefix)
    for k, v in f.items():
        if k == ".":
            if prefix:
                out.add(prefix)
        else:
            out |= decode(v, (*prefix, k))
    return out


def path_string(p: Path) -> str:
    """`.spec.ports[port=80,protocol="TCP"].targetPort`, as structured-merge-diff prints paths."""
    s = ""
    for el in p:
        if el.startswith("f:"):
            s += "." + el[2:]
        elif el.startswith("k:"):
            key = json.loads(el[2:])
            s += "[" + ",".join(f"{k}={_dumps(v)}" for k, v in key.items()) + "]"
        elif el.startswith("v:"):
            s += "[=" + el[2:] + "]"
        else:
            s += "[" + el[2:] + "]"
    return s


# ---------------------------------------------------------------- managedFields entries


def _entries(obj: Obj | None) -> list[Obj]:
    mf = _map(_map(obj).get("metadata")).get("managedFields")
    return [e for e in clone(mf) if isinstance(e, dict) and e] if isinstance(mf, list) else []


def _ident(e: Obj) -> tuple[str, str, str, str]:
    op = e.get("operation", "")
    return (e.get("manager", ""), op, "" if op == "Apply" else e.get("apiVersion", ""), e.get("subresource", ""))


def _manager_label(e: Obj) -> str:
    s = json.dumps(e.get("manager", ""))
    if e.get("subresource"):
        s += f" with subresource {json.dumps(e['subresource'])}"
    if e.get("operation") == "Update":
        s += f" using {e.get('apiVersion', '')}"
    return s


def _set_entries(obj: Obj, entries: list[Obj]) -> None:
    meta = obj.setdefault("metadata", {})
    kept = [e for e in entries if e.get("fieldsV1")]
    if kept:
        meta["managedFields"] = kept
    else:
        meta.pop("managedFields", None)


def _entry(manager: str, operation: str, api_version: str, subresource: str, fs: set[Path]) -> Obj:
    e: Obj = {"manager": manager, "operation": operation, "apiVersion": api_version, "time": _now(),
              "fieldsType": "FieldsV1", "fieldsV1": encode(fs)}
    if subresource:
        e["subresource"] = subresource
    return e


def _has_prefix(fs: set[Path], p: Path) -> bool:
    n = len(p)
    return any(q[:n] == p for q in fs)


# ---------------------------------------------------------------- Update / create bookkeeping


def _granular(t: Type | None, *kinds: str) -> bool:
    return t is None or (t.kind in kinds and not t.atomic)


def _diff(a: Any, b: Any, t: Type | None, prefix: Path, changed: set[Path], removed: set[Path]) -> None:
    """One walk over old (a) and new (b): paths set or changed in b, paths gone from a."""
    if a == b:
        return
    if a is _MISSING:
        _collect(b, t, prefix, changed, True)
        return
    if isinstance(a, dict) and isinstance(b, dict) and b and _granular(t, "struct", "map"):
        for k, v in b.items():
            _diff(a.get(k, _MISSING), v, _field(t, k), (*prefix, "f:" + k), changed, removed)
        for k, v in a.items():
            if k not in b:
                _collect(v, _field(t, k), (*prefix, "f:" + k), removed, True)
        if not a and prefix and not _is_map(t):
            removed.add(prefix)  # {} was a leaf; a map's own path stays a member
        return
    if (isinstance(a, list) and isinstance(b, list) and b and t is not None and t.kind == "list"
            and t.list_type in ("map", "set")):
        lt = t

        def key(x: Any) -> str:
            return _item_key(x, lt) if lt.list_type == "map" else "v:" + _dumps(x)

        old_items = {key(x): x for x in a}
        new_keys: set[str] = set()
        for item in b:
            k = key(item)
            new_keys.add(k)
            p = (*prefix, k)
            if k not in old_items:
                changed.add(p)
                if lt.list_type == "map" and isinstance(item, dict):
                    for f, v in item.items():
                        _collect(v, _field(lt.elem, f), (*p, "f:" + f), changed, True)
            elif lt.list_type == "map" and isinstance(item, dict) and isinstance(old_items[k], dict):
                oi = old_items[k]
                for f, v in item.items():
                    _diff(oi.get(f, _MISSING), v, _field(lt.elem, f), (*p, "f:" + f), changed, removed)
                for f, v in oi.items():
                    if f not in item:
                        _collect(v, _field(lt.elem, f), (*p, "f:" + f), removed, True)
        for k, x in old_items.items():
            if k not in new_keys:
                p = (*prefix, k)
                removed.add(p)
                if lt.list_type == "map" and isinstance(x, dict):
                    for f, v in x.items():
                        _collect(v, _field(lt.elem, f), (*p, "f:" + f), removed, True)
        if not a and prefix:
            removed.add(prefix)
        return
    # a leaf (or a change of shape): the new value is owned here, the old one's paths are gone
    if prefix:
        changed.add(prefix)
    old_paths: set[Path] = set()
    _collect(a, t, prefix, old_paths, True)
    removed |= old_paths - {prefix}
    if isinstance(b, dict | list) and b:
        sub: set[Path] = set()
        _collect(b, t, prefix, sub, True)
        if prefix not in sub:
            changed.discard(prefix)
        changed |= sub


def record_update(
    old: Obj | None, new: Obj, manager: str, *, operation: str = "Update", api_version: str = "v1", subresource: str = ""
) -> None:
    if operation == "Apply":
        return  # apply() has recorded the applier's set; defaulting afterwards is nobody's
    kind = new.get("kind") or _map(old).get("kind") or ""
    t = schema.root(kind)
    sent = (_map(new.get("metadata"))).get("managedFields")
    if old is None and isinstance(sent, list) and any(
        isinstance(e, dict) and e.get("manager") == manager and e.get("operation") == "Apply" for e in sent
    ):
        return  # a create by server-side apply (upsert): apply() has recorded it
    old_entries = _entries(old)
    if sent == [{}]:  # "Clearing ManagedFields" (api-concepts)
        new.setdefault("metadata", {}).pop("managedFields", None)
        return
    entries = _entries(new) if isinstance(sent, list) and sent != _map(_map(old).get("metadata")).get("managedFields") else old_entries
    new_view = _strip(new, kind, subresource)
    changed: set[Path] = set()
    removed: set[Path] = set()
    if old is None:
        changed = fieldset(new_view, t, marks=True)
    else:
        old_view = _strip(old, kind, subresource)
        _diff(old_view, new_view, t, (), changed, removed)
        if not changed and not removed:
            _set_entries(new, entries)
            return
        if not entries:
            # objects written before field tracking: their fields belong to before-first-apply
            before = fieldset(old_view, t, marks=True) - changed - removed
            if before:
                entries = [_entry("before-first-apply", "Update", api_version, "", before)]
    me = (manager, operation, api_version, subresource)
    mine: Obj | None = None
    for e in entries:
        fs = decode(e.get("fieldsV1"))
        if _ident(e) == me:
            mine = e
            fs = (fs - removed) | changed
        else:
            fs = fs - changed - removed
        e["fieldsV1"] = encode(fs) if fs else {}
    if mine is None and changed:
        entries.append(_entry(manager, operation, api_version, subresource, changed))
    elif mine is not None and changed:
        mine["time"] = _now()
    _set_entries(new, entries)


# ---------------------------------------------------------------- Apply


def _merge(live: Any, applied: Any, t: Type | None) -> Any:
    if isinstance(applied, dict) and isinstance(live, dict) and (t is None or (t.kind in ("struct", "map") and not t.atomic)):
        out = dict(live)
        for k, v in applied.items():
            if v is None:
                out.pop(k, None)
            else:
                out[k] = _merge(live.get(k, _MISSING), v, _field(t, k))
        return out
    if isinstance(applied, list) and isinstance(live, list) and t is not None and t.kind == "list" and t.list_type != "atomic":
        out_l = list(live)  # live is apply()'s own copy; items are replaced, not changed
        for item in applied:
            ik = _item_key(item, t) if t.list_type == "map" else "v:" + _dumps(item)
            idx = next((i for i, x in enumerate(out_l)
                        if (_item_key(x, t) if t.list_type == "map" else "v:" + _dumps(x)) == ik), None)
            if idx is None:
                out_l.append(_merge(_MISSING, item, t.elem))
            elif t.list_type == "map":
                out_l[idx] = _merge(out_l[idx], item, t.elem)
        return out_l
    if isinstance(applied, dict):
        return {k: _merge(_MISSING, v, _field(t, k)) for k, v in applied.items() if v is not None}
    return clone(applied)


def apply(
    live: Obj | None,
    applied: Any,
    kind: str,
    *,
    manager: str,
    force: bool = False,
    api_version: str = "v1",
    subresource: str = "",
) -> Obj:
    if not isinstance(applied, dict):
        raise PatchError(400, "BadRequest", "error decoding YAML: the apply configuration must be an object")
    if not manager:
        raise PatchError(400, "BadRequest", "PATCH, application/apply-patch+yaml requests require fieldManager to be set")
    if applied.get("kind") and kind and applied["kind"] != kind:
        raise PatchError(400, "BadRequest",
                         f"the kind of the apply configuration ({applied['kind']}) does not match the resource ({kind})")
    ameta = _map(applied.get("metadata"))
    if ameta.get("managedFields"):
        raise PatchError(400, "BadRequest", "metadata.managedFields must be nil")
    t = schema.root(kind)
    base = clone(live) if live is not None else {}
    entries = _entries(live)
    applied_view = _strip(applied, kind, subresource)
    new_fs = fieldset(applied_view, t)
    live_view = _strip(base, kind, subresource)
    if live is not None and not entries:
        before = fieldset(live_view, t, marks=True)
        if before:
            entries = [_entry("before-first-apply", "Update", api_version, "", before)]
    me = (manager, "Apply", "", subresource)
    prev: set[Path] = set()
    for e in entries:
        if _ident(e) == me:
            prev = decode(e.get("fieldsV1"))
    # the merged object
    merged_view = _merge(live_view, applied_view, t)
    others = [(e, decode(e.get("fieldsV1"))) for e in entries if _ident(e) != me]
    owned_by_others: set[Path] = set().union(*(fs for _, fs in others)) if others else set()
    for p in sorted(prev - new_fs, key=len):
        if not _has_prefix(owned_by_others, p) and not _has_prefix(new_fs, p):
            _delete(merged_view, p, t)
    # conflicts: a field another manager owns whose value this apply changes
    parents = {q[:i] for q in new_fs for i in range(1, len(q))}
    leaves = new_fs - parents
    conflicts: list[tuple[Obj, Path]] = []
    for e, fs in others:
        for p in sorted(fs & leaves):
            a, _ = _get(live_view, p, t)
            b, _ = _get(merged_view, p, t)
            if a is not _MISSING and a != b:
                conflicts.append((e, p))
    if conflicts and not force:
        raise _conflict_error(conflicts)
    lost: dict[int, set[Path]] = {}
    for e, p in conflicts:
        lost.setdefault(id(e), set()).add(p)
    out_entries: list[Obj] = []
    for e, fs in others:
        fs = fs - lost.get(id(e), set())
        e["fieldsV1"] = encode(fs) if fs else {}
        out_entries.append(e)
    out_entries.append(_entry(manager, "Apply", api_version, subresource, new_fs))
    # put the merged view back together with the untracked parts of the live object
    if subresource == "status":
        result = base
        result.pop("status", None)
        if "status" in merged_view:
            result["status"] = merged_view["status"]
    else:
        result = {k: base[k] for k in ("apiVersion", "kind") if k in base}
        result.update({k: applied[k] for k in ("apiVersion", "kind") if applied.get(k)})
        server_meta = {k: v for k, v in (_map(base.get("metadata"))).items() if k in _SERVER_META}
        result["metadata"] = {**(_map(merged_view.get("metadata"))), **server_meta}
        result.update({k: v for k, v in merged_view.items() if k != "metadata"})
        if kind in _HAS_STATUS and "status" in base:
            result["status"] = base["status"]
    if live is None:
        for k in ("name", "namespace", "generateName"):
            if ameta.get(k):
                result["metadata"][k] = ameta[k]
    _set_entries(result, out_entries)
    return result


def _conflict_error(conflicts: list[tuple[Obj, Path]]) -> PatchError:
    causes = [{"reason": "FieldManagerConflict", "message": f"conflict with {_manager_label(e)}",
               "field": path_string(p)} for e, p in conflicts]
    if len(conflicts) == 1:
        e, p = conflicts[0]
        msg = f"Apply failed with 1 conflict: conflict with {_manager_label(e)}: {path_string(p)}"
    else:
        by: dict[str, list[Path]] = {}
        for e, p in conflicts:
            by.setdefault(_manager_label(e), []).append(p)
        lines = []
        for label in sorted(by):
            lines.append(f"conflicts with {label}:")
            lines += [f"- {path_string(p)}" for p in by[label]]
        msg = f"Apply failed with {len(conflicts)} conflicts: " + "\n".join(lines)
    return PatchError(409, "Conflict", msg, {"causes": causes})
