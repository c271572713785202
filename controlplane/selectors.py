"""Label and field selectors: parse once (ApiError 400 on bad syntax), then match objects cheaply.

Label grammar (apimachinery pkg/labels): comma-separated requirements `k`, `!k`, `k=v`, `k==v`,
`k!=v`, `k in (a,b)`, `k notin (a,b)`, `k>n`, `k<n`. Field grammar (pkg/fields): `f=v`, `f==v`,
`f!=v`, comma = AND, `\\` escapes. Field labels per kind follow k/k pkg/apis/core/v1/conversion.go.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from controlplane.errors import ApiError, bad_request

_LABEL_VALUE = re.compile(r"^(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?$")
_NAME_PART = re.compile(r"^([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9]$")
_DNS_SUBDOMAIN = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")


def valid_label_key(key: str) -> str | None:
    """None if `key` is a qualified name, else why not."""
    prefix, _, name = key.rpartition("/")
    if "/" in key and not prefix:
        return "prefix part must be non-empty"
    if prefix and (len(prefix) > 253 or not _DNS_SUBDOMAIN.match(prefix)):
        return "prefix part must be a lowercase RFC 1123 subdomain"
    if not name or len(name) > 63 or not _NAME_PART.match(name):
        return (
            "name part must consist of alphanumeric characters, '-', '_' or '.', and must start and end with an "
            "alphanumeric character (max 63 characters)"
        )
    return None


def valid_label_value(value: str) -> str | None:
    if len(value) > 63 or not _LABEL_VALUE.match(value):
        return (
            "a valid label must be an empty string or consist of alphanumeric characters, '-', '_' or '.', and "
            "must start and end with an alphanumeric character (max 63 characters)"
        )
    return None


@dataclass(frozen=True, slots=True)
class Requirement:
    key: str
    op: str  # exists, !, =, !=, in, notin, gt, lt
    values: tuple[str, ...] = ()

    def matches(self, labels: dict[str, str]) -> bool:
        op = self.op
        if op == "exists":
            return self.key in labels
        if op == "!":
            return self.key not in labels
        has = self.key in labels
        v = labels.get(self.key)
        if op in ("=", "in"):
            return has and v in self.values
        if op in ("!=", "notin"):
            return not has or v not in self.values
        if not has:
            return False
        try:
            n = int(v or "")
        except ValueError:
            return False
        return n > int(self.values[0]) if op == "gt" else n < int(self.values[0])


class LabelSelector:
    __slots__ = ("reqs",)

    def __init__(self, reqs: tuple[Requirement, ...]) -> None:
        self.reqs = reqs

    @property
    def empty(self) -> bool:
        return not self.reqs

    def matches(self, labels: dict[str, str] | None) -> bool:
        if not self.reqs:
            return True
        labels = labels or {}
        return all(r.matches(labels) for r in self.reqs)

    def equality_value(self, key: str) -> str | None:
        for r in self.reqs:
            if r.key == key and (r.op == "=" or (r.op == "in" and len(r.values) == 1)):
                return r.values[0]
        return None


_TOKEN = re.compile(r"\s*(\(|\)|,|!=|==|=|!|>|<|[^\s(),!=<>]+)")


def _lbad(sel: str, why: str) -> ApiError:
    return bad_request(f"unable to parse requirement: {why}" if why else f"couldn't parse the selector string \"{sel}\"")


def parse_label_selector(sel: str) -> LabelSelector:
    sel = sel.strip()
    if not sel:
        return LabelSelector(())
    pos = 0
    toks: list[str] = []
    while pos < len(sel):
        m = _TOKEN.match(sel, pos)
        if not m or m.end() == pos:
            if sel[pos:].strip() == "":
                break
            raise bad_request(f"unable to parse requirement: unexpected character at {pos} in \"{sel}\"")
        toks.append(m.group(1))
        pos = m.end()
    reqs: list[Requirement] = []
    i = 0

    def take() -> str:
        nonlocal i
        if i >= len(toks):
            raise bad_request(f"unable to parse requirement: unexpected end of selector \"{sel}\"")
        t = toks[i]
        i += 1
        return t

    def peek() -> str | None:
        return toks[i] if i < len(toks) else None

    def check_key(k: str) -> None:
        if k in ("(", ")", ",", "=", "==", "!=", "!", ">", "<"):
            raise bad_request(f"unable to parse requirement: found '{k}', expected: identifier")
        why = valid_label_key(k)
        if why:
            raise bad_request(f'unable to parse requirement: invalid label key "{k}": {why}')

    def check_value(v: str) -> str:
        why = valid_label_value(v)
        if why:
            raise bad_request(f'unable to parse requirement: invalid label value: "{v}": {why}')
        return v

    while True:
        t = take()
        if t == "!":
            k = take()
            check_key(k)
            reqs.append(Requirement(k, "!"))
        else:
            check_key(t)
            nxt = peek()
            if nxt is None or nxt == ",":
                reqs.append(Requirement(t, "exists"))
            elif nxt in ("=", "==", "!="):
                take()
                nv = peek()
                if nv is None or nv == ",":
                    v = ""
                else:
                    v = take()
                    if v in ("(", ")", "=", "==", "!=", "!", ">", "<"):
                        raise bad_request(f"unable to parse requirement: found '{v}', expected: identifier")
                reqs.append(Requirement(t, "!=" if nxt == "!=" else "=", (check_value(v),)))
            elif nxt in (">", "<"):
                take()
                v = take()
                try:
                    int(v)
                except ValueError:
                    raise bad_request(
                        f"unable to parse requirement: for 'Gt', 'Lt' operators, the value must be an integer: {v!r}"
                    ) from None
                reqs.append(Requirement(t, "gt" if nxt == ">" else "lt", (v,)))
            elif nxt in ("in", "notin"):
                take()
                if take() != "(":
                    raise bad_request("unable to parse requirement: found '" + toks[i - 1] + "', expected: '('")
                vals: list[str] = []
                while True:
                    v = take()
                    if v == ")":
                        break
                    if v == ",":
                        continue
                    if v in ("(", "=", "==", "!=", "!", ">", "<"):
                        raise bad_request(f"unable to parse requirement: found '{v}', expected: ',', ')' or identifier")
                    vals.append(check_value(v))
                if not vals and nxt == "in":
                    raise bad_request("unable to parse requirement: for 'in', 'notin' operators, values set can't be empty")
                reqs.append(Requirement(t, nxt, tuple(vals)))
            else:
                raise bad_request(
                    f"unable to parse requirement: found '{nxt}', expected: in, notin, =, ==, !=, gt, lt"
                )
        nxt = peek()
        if nxt is None:
            break
        if take() != ",":
            raise bad_request(f"unable to parse requirement: found '{toks[i - 1]}', expected: ','")
        if peek() is None:
            raise bad_request(f"unable to parse requirement: unexpected end of selector \"{sel}\"")
    return LabelSelector(tuple(reqs))


# ---- field selectors -------------------------------------------------------------------------

def _g(obj: dict[str, Any], *path: str, default: str = "") -> str:
    cur: Any = obj
    for p in path:
        if not isinstance(cur, dict):
            return default
        cur = cur.get(p)
        if cur is None:
            return default
    if isinstance(cur, bool):
        return "true" if cur else "false"
    return str(cur)


FieldGetter = Callable[[dict[str, Any]], str]

_COMMON: dict[str, FieldGetter] = {
    "metadata.name": lambda o: _g(o, "metadata", "name"),
    "metadata.namespace": lambda o: _g(o, "metadata", "namespace"),
}

def _involved(f: str) -> FieldGetter:
    return lambda o: _g(o, "involvedObject", f)


_EVENT_FIELDS: dict[str, FieldGetter] = {
    **{
        f"involvedObject.{f}": _involved(f)
        for f in ("kind", "namespace", "name", "uid", "apiVersion", "resourceVersion", "fieldPath")
    },
    "reason": lambda o: _g(o, "reason"),
    "reportingComponent": lambda o: _g(o, "reportingComponent"),
    "source": lambda o: _g(o, "source", "component"),
    "type": lambda o: _g(o, "type"),
}

FIELDS: dict[str, dict[str, FieldGetter]] = {
    "pods": {
        "spec.nodeName": lambda o: _g(o, "spec", "nodeName"),
        "spec.restartPolicy": lambda o: _g(o, "spec", "restartPolicy"),
        "spec.schedulerName": lambda o: _g(o, "spec", "schedulerName"),
        "spec.serviceAccountName": lambda o: _g(o, "spec", "serviceAccountName"),
        "spec.hostNetwork": lambda o: _g(o, "spec", "hostNetwork", default="false"),
        "status.phase": lambda o: _g(o, "status", "phase"),
        "status.podIP": lambda o: _g(o, "status", "podIP"),
        "status.podIPs": lambda o: _g(o, "status", "podIP"),
        "status.nominatedNodeName": lambda o: _g(o, "status", "nominatedNodeName"),
    },
    "services": {
        "spec.clusterIP": lambda o: _g(o, "spec", "clusterIP"),
        "spec.type": lambda o: _g(o, "spec", "type"),
    },
    "nodes": {"spec.unschedulable": lambda o: _g(o, "spec", "unschedulable", default="false")},
    "namespaces": {"status.phase": lambda o: _g(o, "status", "phase")},
    "events": _EVENT_FIELDS,
    "endpointslices": {},
}

# events.k8s.io/v1 spellings of the same labels (objects are stored in the core shape).
_EVENT_ALIASES = {
    **{f"regarding.{f}": f"involvedObject.{f}"
       for f in ("kind", "namespace", "name", "uid", "apiVersion", "resourceVersion", "fieldPath")},
    "reportingController": "reportingComponent",
}


@dataclass(frozen=True, slots=True)
class FieldRequirement:
    field: str
    op: str  # = or !=
    value: str
    getter: FieldGetter


class FieldSelector:
    __slots__ = ("reqs",)

    def __init__(self, reqs: tuple[FieldRequirement, ...]) -> None:
        self.reqs = reqs

    @property
    def empty(self) -> bool:
        return not self.reqs

    def matches(self, obj: dict[str, Any]) -> bool:
        for r in self.reqs:
            v = r.getter(obj)
            if (v == r.value) != (r.op == "="):
                return False
        return True

    def equality_value(self, field: str) -> str | None:
        for r in self.reqs:
            if r.field == field and r.op == "=":
                return r.value
        return None


def _split_unescaped(s: str, sep: str) -> list[str]:
    out: list[str] = []
    cur: list[str] = []
    i = 0
    while i < len(s):
        c = s[i]
        if c == "\\" and i + 1 < len(s):
            cur.append(s[i : i + 2])
            i += 2
            continue
        if c == sep:
            out.append("".join(cur))
            cur = []
        else:
            cur.append(c)
        i += 1
    out.append("".join(cur))
    return out


def _unescape(s: str) -> str:
    out: list[str] = []
    i = 0
    while i < len(s):
        c = s[i]
        if c == "\\":
            if i + 1 >= len(s) or s[i + 1] not in "\\,=!":
                raise bad_request(f"invalid field selector: invalid escape sequence in {s!r}")
            out.append(s[i + 1])
            i += 2
            continue
        if c in ",=":
            raise bad_request(f"invalid field selector: unescaped {c!r} in value {s!r}")
        out.append(c)
        i += 1
    return "".join(out)


def parse_field_selector(sel: str, resource: str) -> FieldSelector:
    sel = sel.strip()
    if not sel:
        return FieldSelector(())
    allowed = {**_COMMON, **FIELDS.get(resource, {})}
    reqs: list[FieldRequirement] = []
    for part in _split_unescaped(sel, ","):
        if not part:
            raise bad_request(f"invalid field selector: empty requirement in {sel!r}")
        m = re.match(r"^([^=!]*)(!=|==|=)(.*)$", part, re.S)
        if not m:
            raise bad_request(f"invalid selector: '{part}'; can't understand '{part}'")
        fld, op, raw = m.group(1).strip(), m.group(2), m.group(3)
        if resource == "events":
            fld = _EVENT_ALIASES.get(fld, fld)
        getter = allowed.get(fld)
        if getter is None:
            raise bad_request(f'field label not supported: {fld}' if fld else f"invalid selector: '{part}'")
        reqs.append(FieldRequirement(fld, "!=" if op == "!=" else "=", _unescape(raw), getter))
    return FieldSelector(tuple(reqs))


class Selector:
    """A label and a field selector together, matched against a whole object."""

    __slots__ = ("labels", "fields")

    def __init__(self, labels: LabelSelector, fields: FieldSelector) -> None:
        self.labels = labels
        self.fields = fields

    @property
    def empty(self) -> bool:
        return self.labels.empty and self.fields.empty

    def matches(self, obj: dict[str, Any] | None) -> bool:
        if obj is None:
            return False
        if self.empty:
            return True
        return self.labels.matches(obj.get("metadata", {}).get("labels")) and self.fields.matches(obj)


EVERYTHING = Selector(LabelSelector(()), FieldSelector(()))


def parse(label_selector: str, field_selector: str, resource: str) -> Selector:
    if not label_selector and not field_selector:
        return EVERYTHING
    return Selector(parse_label_selector(label_selector), parse_field_selector(field_selector, resource))
