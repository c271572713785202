"""What the controllers need from the apiserver's in-process registry (owned by
`controlplane.registry`), written as a Protocol so the controllers can be tested against any
implementation of the same shape.

Objects are plain JSON-shaped dicts, exactly what the REST API serves. The controllers never
mutate a dict they got from the registry or an informer; they build a new one to write.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any, Protocol

Obj = dict[str, Any]

# The resources the controllers read and write, and whether each is namespaced.
NAMESPACED = {"pods": True, "services": True, "endpointslices": True, "events": True, "nodes": False, "namespaces": False}
# ownerReference kind -> resource (the kinds this apiserver serves; anything else is unknown to GC).
KIND_TO_RESOURCE = {
    "Pod": "pods",
    "Service": "services",
    "EndpointSlice": "endpointslices",
    "Event": "events",
    "Node": "nodes",
    "Namespace": "namespaces",
}


class Registry(Protocol):
    """The in-process API (`controlplane.registry.Registry`): REST semantics minus HTTP."""

    async def get(self, resource: str, namespace: str | None, name: str) -> Obj | None:
        """The object, or None when it does not exist."""
        ...

    async def list(
        self, resource: str, namespace: str | None = None, label_selector: str = "", field_selector: str = ""
    ) -> tuple[list[Obj], str]: ...

    def watch(
        self, resource: str, namespace: str | None = None, resource_version: str = ""
    ) -> AsyncIterator[tuple[str, Obj]]:
        """(type, obj): ADDED/MODIFIED/DELETED/BOOKMARK, or one ERROR (a Status) that ends it."""
        ...

    async def create(self, resource: str, obj: Obj, namespace: str | None = None) -> Obj: ...

    async def update(self, resource: str, obj: Obj, *, subresource: str = "") -> Obj:
        """PUT (CAS on metadata.resourceVersion: ApiError 409); subresource "status" or "finalize"."""
        ...

    async def update_status(self, resource: str, obj: Obj) -> Obj: ...

    async def delete(
        self,
        resource: str,
        namespace: str | None,
        name: str,
        preconditions: dict[str, Any] | None = None,
        grace_period_seconds: int | None = None,
    ) -> Any: ...

    async def bind(self, namespace: str, name: str, binding: Obj) -> None:
        """pods/binding: set spec.nodeName (and PodScheduled=True) once."""
        ...


def error_code(exc: BaseException) -> int | None:
    """The HTTP status code an API error carries (the registry's ApiError, or a Status-like
    exception), or None for anything else (a bug, not an API answer)."""
    for attr in ("code", "status_code", "status"):
        v = getattr(exc, attr, None)
        if isinstance(v, int) and 100 <= v < 600:
            return v
    return None


def is_not_found(exc: BaseException) -> bool:
    return error_code(exc) == 404


def is_conflict(exc: BaseException) -> bool:
    return error_code(exc) == 409


class AsManager:
    """The registry, with every write recorded under `manager` in managedFields (upstream's
    kube-controller-manager / kube-scheduler), when the registry takes write options."""

    def __init__(self, registry: Registry, manager: str) -> None:
        self._r = registry
        self.manager = manager
        from controlplane import registry as real

        # another implementation of the protocol gets the calls unchanged
        self._opts: Any = real.WriteOptions if isinstance(registry, real.Registry) else None

    def _kw(self) -> dict[str, Any]:
        return {"opts": self._opts(field_manager=self.manager)} if self._opts is not None else {}

    async def get(self, resource: str, namespace: str | None, name: str) -> Obj | None:
        return await self._r.get(resource, namespace, name)

    async def list(self, resource: str, namespace: str | None = None, label_selector: str = "",
                   field_selector: str = "") -> tuple[list[Obj], str]:
        return await self._r.list(resource, namespace, label_selector, field_selector)

    def watch(self, resource: str, namespace: str | None = None,
              resource_version: str = "") -> AsyncIterator[tuple[str, Obj]]:
        return self._r.watch(resource, namespace, resource_version)

    async def create(self, resource: str, obj: Obj, namespace: str | None = None) -> Obj:
        return await self._r.create(resource, obj, namespace, **self._kw())  # type: ignore[call-arg]

    async def update(self, resource: str, obj: Obj, *, subresource: str = "") -> Obj:
        return await self._r.update(resource, obj, subresource=subresource, **self._kw())  # type: ignore[call-arg]

    async def update_status(self, resource: str, obj: Obj) -> Obj:
        return await self._r.update_status(resource, obj, **self._kw())  # type: ignore[call-arg]

    async def delete(self, resource: str, namespace: str | None, name: str,
                     preconditions: dict[str, Any] | None = None, grace_period_seconds: int | None = None) -> Any:
        return await self._r.delete(resource, namespace, name, preconditions, grace_period_seconds)

    async def bind(self, namespace: str, name: str, binding: Obj) -> None:
        await self._r.bind(namespace, name, binding, **self._kw())  # type: ignore[call-arg]
