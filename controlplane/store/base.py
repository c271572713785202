"""The storage contract every backend (SQLite, etcd) and the watch cache implement.

A flat key space (`/registry/<resource>/<namespace>/<name>`, cluster-scoped objects without the
namespace segment) with ONE global revision, as etcd has: every create, update or delete makes a
new revision; `mod_revision` of a key is its resourceVersion. Values are the object's JSON bytes
*without* metadata.resourceVersion (the reader injects it from mod_revision, as kube-apiserver does).
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Literal, Protocol


@dataclass(frozen=True, slots=True)
class KV:
    key: str
    value: bytes
    mod_revision: int
    create_revision: int


@dataclass(frozen=True, slots=True)
class Event:
    """One change. For DELETE, `kv.value` is the last value and `kv.mod_revision` the delete's revision."""

    type: Literal["PUT", "DELETE"]
    kv: KV
    prev: KV | None  # the value before this change (None for a create)


class StoreError(Exception):
    pass


class KeyExists(StoreError):
    """create: the key is live already."""


class KeyNotFound(StoreError):
    """update/delete/get of a key that is not live."""


class Conflict(StoreError):
    """compare-and-swap failed: the key's mod_revision is not the expected one."""

    def __init__(self, key: str, current: KV | None) -> None:
        super().__init__(key)
        self.current = current


class Compacted(StoreError):
    """The asked-for revision is older than the oldest one kept (-> 410 Expired)."""

    def __init__(self, requested: int, compacted: int) -> None:
        super().__init__(f"required revision {requested} has been compacted (oldest {compacted})")
        self.requested = requested
        self.compacted = compacted


class FutureRevision(StoreError):
    """The asked-for revision is newer than the store's current revision."""


class Store(Protocol):
    """What a backend offers. All methods are coroutines on the apiserver's event loop."""

    async def start(self) -> None: ...

    async def close(self) -> None: ...

    async def current_revision(self) -> int: ...

    async def compacted_revision(self) -> int: ...

    async def get(self, key: str) -> KV | None: ...

    async def list(
        self, prefix: str, *, revision: int = 0, start_after: str = "", limit: int = 0
    ) -> tuple[list[KV], int, bool]:
        """Live keys under prefix, ordered by key, as of `revision` (0 = now).

        Returns (kvs, revision the list is consistent at, more-available).
        Raises Compacted / FutureRevision for a revision outside the kept history."""
        ...

    async def create(self, key: str, value: bytes) -> KV: ...

    async def update(self, key: str, value: bytes, expected_revision: int) -> KV:
        """CAS: write only if the key's mod_revision is `expected_revision` (else Conflict)."""
        ...

    async def delete(self, key: str, expected_revision: int = 0) -> KV:
        """Delete (CAS when expected_revision != 0); returns the deleted KV at the delete's revision."""
        ...

    def watch(self, prefix: str, from_revision: int) -> AsyncIterator[Event]:
        """Every event under prefix with revision > from_revision, in revision order, forever.
        Raises Compacted if from_revision < compacted_revision() (from this call when the store
        already knows, else from the first __anext__). Close it with `aclose()`."""
        ...

    async def compact(self, revision: int) -> None:
        """Drop history before `revision`: afterwards list(revision=R) and watch(from_revision=R)
        work for R >= revision and raise Compacted for R < revision. No-op if already compacted
        there; FutureRevision if revision > current_revision()."""
        ...
