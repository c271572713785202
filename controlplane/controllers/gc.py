"""Garbage collector: an object whose ownerReferences all point to owners that no longer exist
(matched by uid) is deleted (background propagation). Owners are looked up in the informer
caches first; a dependent that looks orphaned is confirmed with a live read of each owner
before it is deleted (an owner created a moment ago may not be in the cache yet). Owners of
kinds this apiserver does not serve are never judged absent."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import Any

from controlplane.controllers.api import (
    KIND_TO_RESOURCE,
    NAMESPACED,
    Obj,
    Registry,
    is_conflict,
    is_not_found,
)
from controlplane.controllers.base import Controller
from controlplane.controllers.informer import InformerFactory
from controlplane.controllers.objects import meta, uid_of

GC_RESOURCES = ("pods", "services", "endpointslices", "events", "nodes", "namespaces")
UID_INDEX = "gc-uid"
OWNER_INDEX = "gc-owner-uid"
GCKey = tuple[str, str, str]  # (resource, namespace, name)


def owner_refs(obj: Mapping[str, Any]) -> list[Mapping[str, Any]]:
    return [r for r in meta(obj).get("ownerReferences") or () if r.get("uid")]


def absent_owners(
    obj: Mapping[str, Any], exists: Callable[[str, str | None, Mapping[str, Any]], bool]
) -> list[Mapping[str, Any]] | None:
    """The owner references of `obj` whose owner does not exist, if ALL of them are absent and
    of known kinds (then `obj` is garbage); None if `obj` has a live or unknown owner, or none.
    `exists(resource, namespace, ref)` answers for one owner."""
    refs = owner_refs(obj)
    if not refs:
        return None
    ns = meta(obj).get("namespace") or None
    for r in refs:
        res = KIND_TO_RESOURCE.get(str(r.get("kind")))
        if res is None:
            return None
        if exists(res, ns if NAMESPACED[res] else None, r):
            return None
    return refs


def _second(fn: Callable[[Obj], None]) -> Callable[[Obj, Obj], None]:
    return lambda _old, new: fn(new)


class GarbageCollector(Controller[GCKey]):
    name = "garbagecollector"
    needs = GC_RESOURCES
    resync_period = 120.0

    def __init__(self, registry: Registry, informers: InformerFactory) -> None:
        super().__init__(registry, informers)
        self.deleted = 0
        self.caches = {r: informers.informer(r) for r in GC_RESOURCES}
        for r, inf in self.caches.items():
            inf.add_index(UID_INDEX, lambda o: [uid_of(o)] if uid_of(o) else [])
            inf.add_index(OWNER_INDEX, lambda o: [str(x["uid"]) for x in owner_refs(o)])
            on_change = self._dependent_event(r)
            inf.add_handler(on_change, _second(on_change), self._owner_deleted, origin=self.name)

    def _dependent_event(self, resource: str) -> Callable[[Obj], None]:
        def handler(obj: Obj) -> None:
            if owner_refs(obj):
                m = meta(obj)
                self.queue.add((resource, m.get("namespace") or "", m.get("name") or ""))
        return handler

    def _owner_deleted(self, owner: Obj) -> None:
        uid = uid_of(owner)
        if not uid:
            return
        for r, inf in self.caches.items():
            for dep in inf.by_index(OWNER_INDEX, uid):
                m = meta(dep)
                self.queue.add((r, m.get("namespace") or "", m.get("name") or ""))

    def all_keys(self) -> Iterable[GCKey]:
        out = []
        for r, inf in self.caches.items():
            for obj in inf.items():
                if owner_refs(obj):
                    m = meta(obj)
                    out.append((r, m.get("namespace") or "", m.get("name") or ""))
        return out

    def _in_cache(self, resource: str, namespace: str | None, ref: Mapping[str, Any]) -> bool:
        return bool(self.caches[resource].index_keys(UID_INDEX, str(ref["uid"])))

    async def sync(self, key: GCKey) -> None:
        resource, ns, name = key
        obj = self.caches[resource].get(ns, name)
        if obj is None or meta(obj).get("deletionTimestamp"):
            return
        if absent_owners(obj, self._in_cache) is None:
            return
        # confirm with live reads before deleting anything
        live: dict[tuple[str, str | None, str], bool] = {}
        for r in owner_refs(obj):
            res = KIND_TO_RESOURCE[str(r["kind"])]
            owner_ns = ns if NAMESPACED[res] else None
            cur = await self.registry.get(res, owner_ns, str(r.get("name") or ""))
            live[(res, owner_ns, str(r["uid"]))] = cur is not None and uid_of(cur) == r["uid"]
        if absent_owners(obj, lambda res, n, r: live.get((res, n, str(r["uid"])), True)) is None:
            return
        try:
            await self.registry.delete(resource, ns or None, name, preconditions={"uid": uid_of(obj)})
            self.deleted += 1
            self.log.info("controller=%s deleted %s %s/%s: owners gone",
                          self.name, resource, ns, name)
        except Exception as e:
            if not (is_not_found(e) or is_conflict(e)):
                raise
