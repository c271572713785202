"""Namespace controller: a namespace being deleted (deletionTimestamp set, phase Terminating)
gets its contents deleted, then its `kubernetes` finalizer removed through `/finalize`, after
which the registry removes it. Pods bound to nodes terminate gracefully (their node agent
confirms), so the controller rechecks until the namespace is empty."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from controlplane.controllers.api import Obj, Registry, is_conflict, is_not_found
from controlplane.controllers.base import Controller
from controlplane.controllers.informer import InformerFactory
from controlplane.controllers.objects import deleting, meta, uid_of

NAMESPACED_CONTENT = ("pods", "services", "endpointslices", "events")
FINALIZER = "kubernetes"


def finalized(ns: Obj) -> Obj | None:
    """The namespace with the `kubernetes` finalizer removed from spec.finalizers (None if it
    is not there: nothing to do)."""
    fins = list((ns.get("spec") or {}).get("finalizers") or ())
    if FINALIZER not in fins:
        return None
    out: dict[str, Any] = dict(ns)
    out["spec"] = {**(ns.get("spec") or {}), "finalizers": [f for f in fins if f != FINALIZER]}
    return out


class NamespaceController(Controller[str]):
    name = "namespace"
    needs = ("namespaces",)
    resync_period = 60.0

    def __init__(self, registry: Registry, informers: InformerFactory, recheck: float = 1.0) -> None:
        super().__init__(registry, informers)
        self.recheck = recheck
        self.namespaces = informers.informer("namespaces")
        self.namespaces.add_handler(self._event, lambda o, n: self._event(n), origin=self.name)

    def _event(self, ns: Obj) -> None:
        if deleting(ns):
            self.queue.add(meta(ns).get("name") or "")

    def all_keys(self) -> Iterable[str]:
        return [meta(n).get("name") or "" for n in self.namespaces.items() if deleting(n)]

    async def sync(self, name: str) -> None:
        ns = await self.registry.get("namespaces", None, name)
        if ns is None or not deleting(ns):
            return
        left = 0
        for resource in NAMESPACED_CONTENT:
            items, _ = await self.registry.list(resource, namespace=name)
            for obj in items:
                left += 1
                if deleting(obj):
                    continue  # already terminating (a pod waiting for its node agent)
                try:
                    await self.registry.delete(resource, name, meta(obj).get("name") or "",
                                               preconditions={"uid": uid_of(obj)})
                except Exception as e:
                    if not (is_not_found(e) or is_conflict(e)):
                        raise
        if left:
            for resource in NAMESPACED_CONTENT:
                items, _ = await self.registry.list(resource, namespace=name)
                if items:
                    self.queue.add_after(name, self.recheck)
                    return
        new = finalized(ns)
        if new is not None:
            await self.registry.update("namespaces", new, subresource="finalize")
