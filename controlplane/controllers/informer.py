"""Informers: a local cache of one resource kept current by list + watch against the registry,
with secondary indexes and event handlers (client-go's SharedIndexInformer, in miniature).

One informer per resource is shared by all controllers (`InformerFactory`). Handlers are plain
callables run on the event loop; they should only enqueue keys. After a watch ends or fails
(e.g. 410 Expired) the informer relists and replays the difference as add/update/delete, so
handlers see a consistent stream and controllers stay resync-safe.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Hashable, Iterable
from dataclasses import dataclass

from controlplane.controllers.api import Obj, Registry
from controlplane.controllers.objects import Key, key_of, rv_int, rv_of, uid_of

log = logging.getLogger("kpx.controllers.informer")

IndexFunc = Callable[[Obj], Iterable[Hashable]]
TOMBSTONES_KEPT = 4096


@dataclass(slots=True)
class Handler:
    on_add: Callable[[Obj], None] | None = None
    on_update: Callable[[Obj, Obj], None] | None = None
    on_delete: Callable[[Obj], None] | None = None
    origin: str = ""  # the controller that registered it (its own writes are not echoed back to it)


class Informer:
    def __init__(self, registry: Registry, resource: str) -> None:
        self.registry = registry
        self.resource = resource
        self._items: dict[Key, Obj] = {}
        self._handlers: list[Handler] = []
        self._index_funcs: dict[str, IndexFunc] = {}
        self._indices: dict[str, dict[Hashable, set[Key]]] = {}
        self._index_values: dict[str, dict[Key, tuple[Hashable, ...]]] = {}
        self._deleted_uids: dict[str, str] = {}  # uids we deleted ourselves -> origin (ordered, bounded)
        self._written: dict[Key, tuple[str, str, Obj | None]] = {}  # own writes: key -> (rv, origin, before)
        self.synced = asyncio.Event()
        self.last_rv = ""

    # --- registration (before start) ---
    def add_handler(
        self,
        on_add: Callable[[Obj], None] | None = None,
        on_update: Callable[[Obj, Obj], None] | None = None,
        on_delete: Callable[[Obj], None] | None = None,
        origin: str = "",
    ) -> None:
        self._handlers.append(Handler(on_add, on_update, on_delete, origin))

    def add_index(self, name: str, func: IndexFunc) -> None:
        if name in self._index_funcs:
            return
        self._index_funcs[name] = func
        self._indices[name] = {}
        self._index_values[name] = {}
        for k, obj in self._items.items():
            self._index(name, k, obj)

    # --- reads ---
    def get(self, namespace: str | None, name: str) -> Obj | None:
        return self._items.get((namespace or "", name))

    def items(self) -> Iterable[Obj]:
        return self._items.values()

    def keys(self) -> Iterable[Key]:
        return self._items.keys()

    def __len__(self) -> int:
        return len(self._items)

    def index_keys(self, name: str, value: Hashable) -> set[Key]:
        return self._indices[name].get(value, set())

    def by_index(self, name: str, value: Hashable) -> list[Obj]:
        items = self._items
        return [items[k] for k in self._indices[name].get(value, ())]

    def index_size(self, name: str, value: Hashable) -> int:
        return len(self._indices[name].get(value, ()))

    # --- own writes (so the next sync does not act on a stale cache) ---
    def write_through(self, obj: Obj, origin: str) -> None:
        """Record an object controller `origin` just wrote, so its next sync sees it. Handlers
        run when the watch event arrives, except those registered by `origin` itself."""
        k = key_of(obj)
        old = self._items.get(k)
        if old is not None and _older(obj, old):
            return
        self._written[k] = (rv_of(obj), origin, old)
        self._store(k, obj)

    def forget(self, obj: Obj, origin: str) -> None:
        """Record that controller `origin` just deleted `obj`: late events for its uid are
        ignored, the DELETED event reaches the other controllers' handlers only."""
        k = key_of(obj)
        cur = self._items.get(k)
        self._written.pop(k, None)
        if cur is not None and uid_of(cur) == uid_of(obj):
            self._remove(k)
        uid = uid_of(obj)
        if uid:
            self._deleted_uids[uid] = origin
            while len(self._deleted_uids) > TOMBSTONES_KEPT:
                del self._deleted_uids[next(iter(self._deleted_uids))]

    # --- the loop ---
    async def run(self) -> None:
        """List, then watch from the list's RV. A watch that just ends (the server closed a slow
        or timed-out stream) is resumed from the last RV seen; an ERROR (410 Expired: history
        gone) or a failure means a relist."""
        backoff = 0.05
        need_list = True
        while True:
            try:
                if need_list:
                    items, rv = await self.registry.list(self.resource)
                    self._replace(items)
                    self.last_rv = rv
                    self.synced.set()
                    need_list = False
                async for etype, obj in self.registry.watch(self.resource, resource_version=self.last_rv):
                    if etype == "ERROR":
                        log.info("informer=%s watch error %s; relisting",
                                 self.resource, obj.get("message") if isinstance(obj, dict) else obj)
                        need_list = True
                        break
                    if etype != "BOOKMARK":
                        self._apply(etype, obj)
                    self.last_rv = rv_of(obj) or self.last_rv
                    backoff = 0.05
                else:
                    await asyncio.sleep(0)  # ended cleanly: resume from last_rv
            except asyncio.CancelledError:
                raise
            except Exception as e:  # the registry failed: relist after a pause
                log.info("informer=%s watch failed (%s); relisting", self.resource, e)
                need_list = True
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 5.0)

    def _apply(self, etype: str, obj: Obj) -> None:
        k = key_of(obj)
        old = self._items.get(k)
        if etype == "DELETED":
            origin = self._deleted_uids.pop(uid_of(obj), None)
            if origin is not None:
                if old is not None and uid_of(old) == uid_of(obj):
                    self._remove(k)
                self._notify_delete(obj, skip=origin)
                return
            if old is None:
                return
            if uid_of(old) != uid_of(obj) and uid_of(obj):
                return  # a delete of an older incarnation; the cached one is newer
            self._remove(k)
            self._notify_delete(old)
            return
        if uid_of(obj) in self._deleted_uids:
            return  # late event for an object we deleted
        written = self._written.pop(k, None)
        if written is not None and written[0] == rv_of(obj) and old is not None and rv_of(old) == written[0]:
            _, origin, before = written  # the echo of our own write: tell the other controllers
            if before is None:
                self._notify_add(obj, skip=origin)
            else:
                self._notify_update(before, obj, skip=origin)
            return
        if old is not None and (rv_of(old) == rv_of(obj) or _older(obj, old)):
            return  # already cached, or a stale event
        self._store(k, obj)
        if old is None:
            self._notify_add(obj)
        else:
            self._notify_update(old, obj)

    def _replace(self, items: list[Obj]) -> None:
        fresh = {key_of(o): o for o in items}
        for k in [k for k in self._items if k not in fresh]:
            gone = self._items[k]
            self._remove(k)
            self._notify_delete(gone)
        self._deleted_uids.clear()
        self._written.clear()
        for k, obj in fresh.items():
            old = self._items.get(k)
            if old is not None and rv_of(old) == rv_of(obj):
                continue
            self._store(k, obj)
            if old is None:
                self._notify_add(obj)
            else:
                self._notify_update(old, obj)

    # --- internals ---
    def _store(self, k: Key, obj: Obj) -> None:
        self._items[k] = obj
        for name in self._index_funcs:
            self._index(name, k, obj)

    def _remove(self, k: Key) -> None:
        self._items.pop(k, None)
        for name in self._index_funcs:
            self._unindex(name, k)

    def _index(self, name: str, k: Key, obj: Obj) -> None:
        new = tuple(self._index_funcs[name](obj))
        values = self._index_values[name]
        old = values.get(k, ())
        if old == new:
            return
        idx = self._indices[name]
        for v in old:
            s = idx.get(v)
            if s is not None:
                s.discard(k)
                if not s:
                    del idx[v]
        for v in new:
            idx.setdefault(v, set()).add(k)
        if new:
            values[k] = new
        else:
            values.pop(k, None)

    def _unindex(self, name: str, k: Key) -> None:
        idx = self._indices[name]
        for v in self._index_values[name].pop(k, ()):
            s = idx.get(v)
            if s is not None:
                s.discard(k)
                if not s:
                    del idx[v]

    def _notify_add(self, obj: Obj, skip: str = "") -> None:
        for h in self._handlers:
            if h.on_add and not (skip and h.origin == skip):
                _safe(h.on_add, obj)

    def _notify_update(self, old: Obj, new: Obj, skip: str = "") -> None:
        for h in self._handlers:
            if h.on_update and not (skip and h.origin == skip):
                _safe(h.on_update, old, new)

    def _notify_delete(self, obj: Obj, skip: str = "") -> None:
        for h in self._handlers:
            if h.on_delete and not (skip and h.origin == skip):
                _safe(h.on_delete, obj)


def _older(a: Obj, b: Obj) -> bool:
    """Whether `a` is an older version of the same object than `b` (integer RVs only)."""
    ra, rb = rv_int(a), rv_int(b)
    return ra is not None and rb is not None and ra < rb and uid_of(a) == uid_of(b)


def _safe(fn: Callable[..., None], *args: Obj) -> None:
    try:
        fn(*args)
    except Exception:  # a handler bug must not stop the informer
        log.exception("informer handler failed")


class InformerFactory:
    """One shared informer per resource."""

    def __init__(self, registry: Registry) -> None:
        self.registry = registry
        self._informers: dict[str, Informer] = {}
        self._tasks: list[asyncio.Task[None]] = []

    def informer(self, resource: str) -> Informer:
        inf = self._informers.get(resource)
        if inf is None:
            inf = self._informers[resource] = Informer(self.registry, resource)
            if self._tasks:  # started already: start this one too
                self._tasks.append(asyncio.create_task(inf.run(), name=f"informer-{resource}"))
        return inf

    def start(self) -> None:
        for r, inf in self._informers.items():
            self._tasks.append(asyncio.create_task(inf.run(), name=f"informer-{r}"))

    async def wait_synced(self, resources: Iterable[str] | None = None) -> None:
        names = list(resources) if resources is not None else list(self._informers)
        await asyncio.gather(*(self._informers[r].synced.wait() for r in names))

    async def stop(self) -> None:
        for t in self._tasks:
            t.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._tasks.clear()
