"""fieldValidation (Strict / Warn / Ignore): unknown and duplicate fields, pruning, type errors.

Call signatures for the REST layer (H2a):

    problems = fieldvalidation.check(kind, obj, raw=body_bytes, patch_type="", api_version="v1")
        # -> list[Problem]; str(p) = 'unknown field "spec.foo"' / 'duplicate field "spec.type"'.
        #    Also PRUNES the unknown fields from obj in place (built-in kinds never store them).
    fieldvalidation.prune(kind, obj, patch_type=...)   # fieldValidation=Ignore: drop unknown fields only
        # (pass patch_type="strategic" for an SMP body; without it, SMP directives are kept)
    msg = fieldvalidation.strict_message(kind, problems, api_version)   # 400 BadRequest text:
        # 'Service in version "v1" cannot be handled as a Service: strict decoding error: unknown field "spec.foo"'
    errs = fieldvalidation.type_errors(kind, obj)   # wrong JSON types -> 400 whatever the mode
    msg = fieldvalidation.decode_message(kind, errs[0], api_version)

Strict -> 400 with strict_message; Warn -> one `Warning: 299 - "<str(p)>"` header per problem.
`raw` is the request body (JSON, or YAML for apply): duplicates can only be seen there; for a
patch, obj may be the patch body (with patch_type="strategic" its `$` directives are skipped).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from controlplane import schema
from controlplane.schema import Type


@dataclass(frozen=True, slots=True)
class Problem:
    kind: str  # "unknown" | "duplicate"
    path: str

    def __str__(self) -> str:
        return f'{self.kind} field "{self.path}"'


def _join(prefix: str, key: str) -> str:
    return f"{prefix}.{key}" if prefix else key


_LEAF = ("any", "scalar")


def _is_directive(k: str) -> bool:
    """Strategic merge patch directives: not fields, and never names of real fields."""
    return k in ("$patch", "$retainKeys") or k.startswith(("$setElementOrder/", "$deleteFromPrimitiveList/"))


def _walk_unknown(v: Any, t: Type | None, path: str, out: list[Problem], prune: bool, smp: bool = False) -> None:
    if t is None or t.kind in _LEAF:
        return
    if t.kind == "struct" and isinstance(v, dict):
        fields = t.fields
        for k in list(v):
            ft = fields.get(k)
            if ft is None:
                if smp and _is_directive(k):
                    continue
                out.append(Problem("unknown", _join(path, k)))
                if prune:
                    del v[k]
            elif ft.kind not in _LEAF:
                _walk_unknown(v[k], ft, _join(path, k), out, prune, smp)
    elif t.kind == "map" and isinstance(v, dict):
        if t.elem is not None and t.elem.kind not in _LEAF:
            for k, x in v.items():
                if not (smp and _is_directive(k)):
                    _walk_unknown(x, t.elem, _join(path, k), out, prune, smp)
    elif t.kind == "list" and isinstance(v, list) and t.elem is not None and t.elem.kind not in _LEAF:
        for i, x in enumerate(v):
            _walk_unknown(x, t.elem, f"{path}[{i}]", out, prune, smp)


def unknown_fields(kind: str, obj: Any, *, prune: bool = False, smp: bool = False) -> list[Problem]:
    """`smp=True`: obj is a strategic merge patch body, whose `$` directives are not fields."""
    t = schema.root(kind)
    out: list[Problem] = []
    if t is not None:
        _walk_unknown(obj, t, "", out, prune, smp)
    return out


def prune(kind: str, obj: Any, *, patch_type: str | None = None) -> None:
    """Drop unknown fields in place. Without `patch_type` the body may be a strategic merge
    patch, so its directives are kept; patch_type="" (a full object) drops them too."""
    unknown_fields(kind, obj, prune=True, smp=patch_type is None or patch_type == "strategic")


class _Pairs(list[tuple[str, Any]]):
    pass


def _dups(v: Any, path: str, out: list[Problem]) -> None:
    if isinstance(v, _Pairs):
        seen: set[str] = set()
        for k, x in v:
            if k in seen:
                out.append(Problem("duplicate", _join(path, k)))
            seen.add(k)
            _dups(x, _join(path, k), out)
    elif isinstance(v, list):
        for i, x in enumerate(v):
            _dups(x, f"{path}[{i}]", out)


def duplicate_fields(raw: bytes | str | None) -> list[Problem]:
    if not raw:
        return []
    try:
        tree = json.loads(raw, object_pairs_hook=_Pairs)
    except (ValueError, UnicodeDecodeError):
        return _yaml_duplicates(raw)
    out: list[Problem] = []
    _dups(tree, "", out)
    return out


def _yaml_duplicates(raw: bytes | str) -> list[Problem]:
    import yaml

    out: list[Problem] = []

    def walk(node: Any, path: str) -> None:
        if isinstance(node, yaml.MappingNode):
            seen: set[str] = set()
            for k, v in node.value:
                key = str(k.value)
                if key in seen:
                    out.append(Problem("duplicate", _join(path, key)))
                seen.add(key)
                walk(v, _join(path, key))
        elif isinstance(node, yaml.SequenceNode):
            for i, v in enumerate(node.value):
                walk(v, f"{path}[{i}]")

    try:
        walk(yaml.compose(raw), "")
    except yaml.YAMLError:
        return []
    return out


def check(
    kind: str, obj: Any, *, raw: bytes | str | None = None, patch_type: str = "", api_version: str = "v1"
) -> list[Problem]:
    """Duplicates in the request body, then unknown fields of the object (pruned in place).
    `obj` may be the patch body itself (patch_type "strategic" | "merge" | "apply"): directives are
    skipped and the pruned patch then carries no unknown field into storage."""
    return duplicate_fields(raw) + unknown_fields(kind, obj, prune=True, smp=patch_type == "strategic")


def strict_message(kind: str, problems: list[Problem], api_version: str = "v1") -> str:
    return (f'{kind} in version "{api_version.rsplit("/", 1)[-1]}" cannot be handled as a {kind}: '
            "strict decoding error: " + ", ".join(str(p) for p in problems))


# ---------------------------------------------------------------- type errors (any mode)

_GO = {"integer": "int32", "string": "string", "boolean": "bool", "number": "float64"}
_JSON_KIND = {bool: "bool", int: "number", float: "number", str: "string", list: "array", dict: "object"}


def _go_kind(v: Any) -> str:
    return _JSON_KIND.get(type(v), "value")


def _walk_types(v: Any, t: Type | None, path: str, owner: str, out: list[str]) -> None:
    if v is None or t is None or t.kind == "any":
        return
    where = f"Go struct field {owner}.{path}" if owner else "Go value"
    if t.kind == "scalar":
        ok = {"integer": isinstance(v, int) and not isinstance(v, bool),
              "number": isinstance(v, int | float) and not isinstance(v, bool),
              "string": isinstance(v, str), "boolean": isinstance(v, bool)}.get(t.name, True)
        if not ok:
            out.append(f"json: cannot unmarshal {_go_kind(v)} into {where} of type {_GO.get(t.name, t.name)}")
        return
    if t.kind in ("struct", "map"):
        if not isinstance(v, dict):
            out.append(f"json: cannot unmarshal {_go_kind(v)} into {where} of type "
                       f"{'map[string]string' if t.kind == 'map' else 'struct'}")
            return
        for k, x in v.items():
            ft = t.fields.get(k) if t.kind == "struct" else t.elem
            sub_owner = t.name[2:] if t.kind == "struct" and t.name.startswith("V1") else owner
            _walk_types(x, ft, _join(path, k), sub_owner, out)
        return
    if t.kind == "list":
        if not isinstance(v, list):
            out.append(f"json: cannot unmarshal {_go_kind(v)} into {where} of type []")
            return
        for x in v:
            _walk_types(x, t.elem, path, owner, out)


def type_errors(kind: str, obj: Any) -> list[str]:
    t = schema.root(kind)
    out: list[str] = []
    if t is not None:
        _walk_types(obj, t, "", "", out)
    return out


def decode_message(kind: str, err: str, api_version: str = "v1") -> str:
    return f'{kind} in version "{api_version.rsplit("/", 1)[-1]}" cannot be handled as a {kind}: {err}'
