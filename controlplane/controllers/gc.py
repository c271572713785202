"""Garbage collector: an object whose ownerReferences all point to owners that no longer exist
(matched by uid) is deleted (background propagation). Owners are looked up in the informer
caches first; a dependent that looks orphaned is confirmed with a live read of each owner
before it is deleted (an owner created a moment ago may not be in the cache yet). Owners of
kinds this apiserver does not serve are never judged absent.

Deleting with propagationPolicy Orphan or Foreground leaves the owner with an `orphan` or
`foregroundDeletion` finalizer; the collector finishes those deletions: Orphan removes the
owner's reference from every dependent, Foreground deletes the dependents and waits until those
with blockOwnerDeletion are gone; then it removes the finalizer so the owner goes."""

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

# Events are left out: they never own anything, seldom have owners, and caching every Event of a
# busy cluster would cost more than it collects (the namespace controller removes them anyway).
GC_RESOURCES = ("pods", "services", "endpointslices", "nodes", "namespaces")
UID_INDEX = "gc-uid"
OWNER_INDEX = "gc-owner-uid"
GCKey = tuple[str, str, str, str]  # (DEPENDENT | OWNER, resource, namespace, name)
DEPENDENT, OWNER = "dependent", "owner"
ORPHAN_FINALIZER, FOREGROUND_FINALIZER = "orphan", "foregroundDeletion"


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


def pending_finalizer(obj: Mapping[str, Any]) -> str | None:
    """The GC finalizer an owner being deleted waits on (foreground first), if any."""
    m = meta(obj)
    if not m.get("deletionTimestamp"):
        return None
    fins = m.get("finalizers") or ()
    for f in (FOREGROUND_FINALIZER, ORPHAN_FINALIZER):
        if f in fins:
            return f
    return None


def without_owner(dep: Mapping[str, Any], owner_uid: str) -> dict[str, Any]:
    """`dep` with its references to `owner_uid` removed (Orphan propagation)."""
    m = dict(meta(dep))
    m["ownerReferences"] = [r for r in m.get("ownerReferences") or () if r.get("uid") != owner_uid]
    if not m["ownerReferences"]:
        del m["ownerReferences"]
    return {**dep, "metadata": m}


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
            m = meta(obj)
            if owner_refs(obj):
                self.queue.add((DEPENDENT, resource, m.get("namespace") or "", m.get("name") or ""))
            if pending_finalizer(obj):
                self.queue.add((OWNER, resource, m.get("namespace") or "", m.get("name") or ""))
        return handler

    def _owner_deleted(self, owner: Obj) -> None:
        uid = uid_of(owner)
        if not uid:
            return
        for r, inf in self.caches.items():
            for dep in inf.by_index(OWNER_INDEX, uid):
                m = meta(dep)
                self.queue.add((DEPENDENT, r, m.get("namespace") or "", m.get("name") or ""))
        # a dependent gone may let a foreground deletion of its owner finish
        ns = meta(owner).get("namespace") or ""
        for ref in owner_refs(owner):
            res = KIND_TO_RESOURCE.get(str(ref.get("kind")))
            if res is not None:
                self.queue.add((OWNER, res, ns if NAMESPACED[res] else "", str(ref.get("name") or "")))

    def all_keys(self) -> Iterable[GCKey]:
        out = []
        for r, inf in self.caches.items():
            for obj in inf.items():
                m = meta(obj)
                if owner_refs(obj):
                    out.append((DEPENDENT, r, m.get("namespace") or "", m.get("name") or ""))
                if pending_finalizer(obj):
                    out.append((OWNER, r, m.get("namespace") or "", m.get("name") or ""))
        return out

    def _in_cache(self, resource: str, namespace: str | None, ref: Mapping[str, Any]) -> bool:
        return bool(self.caches[resource].index_keys(UID_INDEX, str(ref["uid"])))

    async def sync(self, key: GCKey) -> None:
        work, resource, ns, name = key
        if work == OWNER:
            await self._finish_owner(resource, ns, name)
            return
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

    async def _finish_owner(self, resource: str, ns: str, name: str) -> None:
        owner = self.caches[resource].get(ns, name)
        if owner is None:
            return
        fin = pending_finalizer(owner)
        if fin is None:
            return
        uid = uid_of(owner)
        deps = [(r, d) for r, inf in self.caches.items() for d in inf.by_index(OWNER_INDEX, uid)]
        if fin == ORPHAN_FINALIZER:
            for r, d in deps:
                try:
                    await self.registry.update(r, without_owner(d, uid))
                except Exception as e:
                    if not is_not_found(e):
                        raise
        else:
            blocking = False
            for r, d in deps:
                m = meta(d)
                if not m.get("deletionTimestamp"):
                    try:
                        await self.registry.delete(r, m.get("namespace") or None, m.get("name") or "",
                                                   preconditions={"uid": uid_of(d)})
                        self.deleted += 1
                    except Exception as e:
                        if not (is_not_found(e) or is_conflict(e)):
                            raise
                blocking = blocking or any(x.get("uid") == uid and x.get("blockOwnerDeletion")
                                           for x in owner_refs(d))
            if blocking:
                self.queue.add_after((OWNER, resource, ns, name), 1.0)  # deletions of dependents also requeue
                return
        live = await self.registry.get(resource, ns or None, name)
        if live is None or uid_of(live) != uid or fin not in (meta(live).get("finalizers") or ()):
            return
        m = dict(meta(live))
        m["finalizers"] = [f for f in m.get("finalizers") or () if f != fin]
        await self.registry.update(resource, {**live, "metadata": m})
        self.log.info("controller=%s %s %s/%s: %s deletion done", self.name, resource, ns, name, fin)
