"""Small accessors over JSON-shaped API objects, shared by the controllers."""

from __future__ import annotations

from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any

Key = tuple[str, str]  # (namespace or "", name)


def meta(obj: Mapping[str, Any]) -> Mapping[str, Any]:
    return obj.get("metadata") or {}


def key_of(obj: Mapping[str, Any]) -> Key:
    m = meta(obj)
    return (m.get("namespace") or "", m.get("name") or "")


def uid_of(obj: Mapping[str, Any]) -> str:
    return str(meta(obj).get("uid") or "")


def labels_of(obj: Mapping[str, Any]) -> Mapping[str, str]:
    return meta(obj).get("labels") or {}


def rv_of(obj: Mapping[str, Any]) -> str:
    return str(meta(obj).get("resourceVersion") or "")


def rv_int(obj: Mapping[str, Any]) -> int | None:
    """resourceVersion as an integer (kpx's store has one global revision), None when opaque."""
    try:
        return int(rv_of(obj))
    except ValueError:
        return None


def deleting(obj: Mapping[str, Any]) -> bool:
    return bool(meta(obj).get("deletionTimestamp"))


def parse_time(value: Any) -> datetime | None:
    """An RFC3339 timestamp (as the API writes them) -> aware datetime; None if absent/invalid."""
    if not value or not isinstance(value, str):
        return None
    try:
        t = datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        return None
    return t if t.tzinfo else t.replace(tzinfo=UTC)


def format_time(t: datetime) -> str:
    """RFC3339 in UTC the way metav1.Time serialises (seconds, `Z`)."""
    return t.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def now() -> datetime:
    return datetime.now(UTC)


def condition(obj: Mapping[str, Any], ctype: str) -> Mapping[str, Any] | None:
    for c in (obj.get("status") or {}).get("conditions") or ():
        if c.get("type") == ctype:
            return c
    return None


def condition_true(obj: Mapping[str, Any], ctype: str) -> bool:
    c = condition(obj, ctype)
    return c is not None and c.get("status") == "True"


def selector_matches(selector: Mapping[str, str], labels: Mapping[str, str]) -> bool:
    """Equality-based map selector (Service spec.selector, Pod nodeSelector)."""
    return all(labels.get(k) == v for k, v in selector.items())


TERMINAL_PHASES = frozenset({"Succeeded", "Failed"})


def pod_terminal(pod: Mapping[str, Any]) -> bool:
    return (pod.get("status") or {}).get("phase") in TERMINAL_PHASES


def node_ready(node: Mapping[str, Any]) -> bool:
    return condition_true(node, "Ready")
