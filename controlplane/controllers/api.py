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
