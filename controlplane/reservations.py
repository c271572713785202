"""ClusterIP / NodePort reservations in the shared store, so apiservers sharing one etcd never hand the
same value to two Services (kube-apiserver keeps its allocations in etcd for the same reason).

Each allocated value is a key `/kpx/allocations/{clusterips|nodeports}/<value>` created with
compare-and-swap (create fails if the key exists) before the Service is written; the value names
the owning Service key and when it was reserved. A reservation whose owner no longer holds the
value and which is older than STALE_AFTER seconds (an apiserver died between reserving and
writing) is taken over by CAS. Keys live outside /registry/, so no resource lists or watches them.
Only used when the store can be shared (etcd); a SQLite store belongs to one process.
"""

from __future__ import annotations

import time
from typing import Any

import orjson

from controlplane.store import base

PREFIX = "/kpx/allocations/"
STALE_AFTER = 30.0


def _key(kind: str, value: str | int) -> str:
    return f"{PREFIX}{kind}/{value}"


class Taken(Exception):
    def __init__(self, kind: str, value: str | int) -> None:
        super().__init__(f"{kind} {value} is held by another Service")
        self.kind = kind
        self.value = value


class Reservations:
    def __init__(self, store: base.Store, holds: Any) -> None:
        """holds(owner_key, kind, value) -> bool: does that Service (per the watch cache) hold it."""
        self.store = store
        self.holds = holds

    async def reserve(self, owner: str, kind: str, value: str | int) -> None:
        key = _key(kind, value)
        doc = orjson.dumps({"owner": owner, "at": time.time()})
        try:
            await self.store.create(key, doc)
            return
        except base.KeyExists:
            pass
        kv = await self.store.get(key)
        if kv is None:  # released meanwhile: try once more
            try:
                await self.store.create(key, doc)
                return
            except base.KeyExists:
                raise Taken(kind, value) from None
        try:
            cur = orjson.loads(kv.value)
        except orjson.JSONDecodeError:
            cur = {}
        if cur.get("owner") == owner:
            return
        fresh = time.time() - float(cur.get("at") or 0) < STALE_AFTER
        if fresh or self.holds(str(cur.get("owner") or ""), kind, value):
            raise Taken(kind, value)
        try:
            await self.store.update(key, doc, kv.mod_revision)
        except (base.Conflict, base.KeyNotFound):
            raise Taken(kind, value) from None

    async def release(self, owner: str, kind: str, value: str | int) -> None:
        key = _key(kind, value)
        kv = await self.store.get(key)
        if kv is None:
            return
        try:
            if orjson.loads(kv.value).get("owner") != owner:
                return
        except orjson.JSONDecodeError:
            pass
        try:
            await self.store.delete(key, kv.mod_revision)
        except (base.Conflict, base.KeyNotFound):
            pass

    async def ensure(self, held: list[tuple[str, str, str | int]]) -> int:
        """At start-up: reservations for values stored Services hold but nobody reserved (data written
        before reservations existed). Returns how many were created."""
        have: set[str] = set()
        after = ""
        while True:
            kvs, _, more = await self.store.list(PREFIX, start_after=after, limit=5000)
            have.update(kv.key for kv in kvs)
            if not more or not kvs:
                break
            after = kvs[-1].key
        n = 0
        for owner, kind, value in held:
            if _key(kind, value) not in have:
                try:
                    await self.store.create(_key(kind, value), orjson.dumps({"owner": owner, "at": 0}))
                    n += 1
                except base.KeyExists:
                    pass
        return n
