"""Garbage collection: which objects are orphans."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import pytest

from controlplane.controllers.gc import absent_owners
from controlplane.controllers.namespace import finalized

pytestmark = pytest.mark.unit


def dep(*refs: dict[str, Any], ns: str = "default") -> dict[str, Any]:
    return {"metadata": {"name": "d", "namespace": ns, "uid": "d-uid", "ownerReferences": list(refs)}}


def ref(kind: str, name: str, uid: str) -> dict[str, Any]:
    return {"apiVersion": "v1", "kind": kind, "name": name, "uid": uid}


def lookup(live: set[tuple[str, str | None, str]]):  # type: ignore[no-untyped-def]
    def exists(resource: str, namespace: str | None, r: Mapping[str, Any]) -> bool:
        return (resource, namespace, r["uid"]) in live
    return exists


def test_orphan_when_every_owner_is_gone() -> None:
    d = dep(ref("Service", "web", "s1"))
    assert absent_owners(d, lookup(set())) == d["metadata"]["ownerReferences"]
    assert absent_owners(d, lookup({("services", "default", "s1")})) is None


def test_one_live_owner_keeps_it() -> None:
    d = dep(ref("Service", "web", "s1"), ref("Pod", "p", "p1"))
    assert absent_owners(d, lookup({("pods", "default", "p1")})) is None
    assert absent_owners(d, lookup(set())) is not None


def test_owner_matched_by_uid_in_right_scope() -> None:
    # a namespaced dependent's Node owner is looked up cluster-scoped
    d = dep(ref("Node", "n1", "n-uid"))
    assert absent_owners(d, lookup({("nodes", None, "n-uid")})) is None
    # same name, other uid (recreated owner) does not count
    assert absent_owners(dep(ref("Service", "web", "old")), lookup({("services", "default", "new")})) is not None


def test_unknown_kinds_and_no_owners_are_never_garbage() -> None:
    assert absent_owners(dep(ref("ReplicaSet", "rs", "r1")), lookup(set())) is None
    assert absent_owners({"metadata": {"name": "x"}}, lookup(set())) is None


def test_namespace_finalize_drops_only_kubernetes() -> None:
    ns = {"metadata": {"name": "t"}, "spec": {"finalizers": ["kubernetes", "other"]}}
    out = finalized(ns)
    assert out is not None and out["spec"]["finalizers"] == ["other"]
    assert ns["spec"]["finalizers"] == ["kubernetes", "other"]  # input untouched
    assert finalized({"metadata": {"name": "t"}, "spec": {}}) is None


def test_pending_finalizer_and_orphaning() -> None:
    from controlplane.controllers.gc import pending_finalizer, without_owner

    live = {"metadata": {"name": "s", "finalizers": ["orphan"]}}
    assert pending_finalizer(live) is None  # not being deleted
    going = {"metadata": {"name": "s", "deletionTimestamp": "2026-12-01T10:00:00Z",
                          "finalizers": ["orphan", "foregroundDeletion", "other"]}}
    assert pending_finalizer(going) == "foregroundDeletion"
    d = dep(ref("Service", "web", "s1"), ref("Node", "n", "n1"))
    assert [r["uid"] for r in without_owner(d, "s1")["metadata"]["ownerReferences"]] == ["n1"]
    assert "ownerReferences" not in without_owner(dep(ref("Service", "web", "s1")), "s1")["metadata"]
    assert len(d["metadata"]["ownerReferences"]) == 2  # input untouched
