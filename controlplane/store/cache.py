"""The watch cache: the apiserver's in-memory view of the store, fed by the store's own watch.

- Current objects, keyed and kept in key order, each as a CachedObject holding the decoded dict
  AND its JSON bytes with metadata.resourceVersion injected, so a LIST is a join of bytes.
- A ring of recent events (>= history_revisions revisions AND >= history_seconds) serving
  watch-from-revision; older than the ring -> Compacted (the REST layer sends a 410 ERROR event).
- Fan-out through bounded per-watcher queues: a watcher whose queue is full is closed
  (closed_reason "too slow"; the client re-watches from its last revision). Writers and other
  watchers never wait for a slow one.

Writes do not pass through here: they go to the store, and the cache learns of them through the
watch, in revision order, exactly like every other apiserver process sharing the store.
"""

from __future__ import annotations

import asyncio
import bisect
import contextlib
import logging
import time
from collections import deque
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any, Literal

import orjson

from controlplane.store.base import KV, Compacted, Event, FutureRevision, Store, StoreError
from controlplane.store.keys import prefix_end

log = logging.getLogger("kpx.store.cache")


@dataclass(frozen=True, slots=True)
class CachedObject:
    key: str
    rev: int  # mod_revision = metadata.resourceVersion
    obj: dict[str, Any]  # decoded, RV injected; shared, never mutate
    raw: bytes  # JSON of obj
    create_revision: int = 0


@dataclass(frozen=True, slots=True)
class CacheEvent:
    type: Literal["PUT", "DELETE"]
    key: str
    rev: int
    obj: CachedObject  # PUT: new state; DELETE: last state with rev = the delete's revision
    prev: CachedObject | None  # state before (None for a create)


def ingest(kv: KV, rev: int | None = None) -> CachedObject:
    """Decode a stored value and inject metadata.resourceVersion = str(rev or kv.mod_revision)."""
    r = kv.mod_revision if rev is None else rev
    try:
        obj = orjson.loads(kv.value)
    except orjson.JSONDecodeError:
        obj = None
    if not isinstance(obj, dict):
        return CachedObject(kv.key, r, {}, kv.value, kv.create_revision)
    meta = obj.get("metadata")
    if not isinstance(meta, dict):
        meta = obj["metadata"] = {}
    rv = str(r)
    had_rv = "resourceVersion" in meta
    meta["resourceVersion"] = rv
    raw = None if had_rv else _splice_rv(kv.value, rv)
    if raw is None:
        raw = _compact_bytes(orjson.dumps(obj))
    return CachedObject(kv.key, r, obj, raw, kv.create_revision)


_META = b'"metadata":{'


def _splice_rv(value: bytes, rv: str) -> bytes | None:
    """The stored JSON with "resourceVersion" inserted as the first field of the top-level
    metadata, built in one exact-size allocation (no re-encode). None when the top-level
    metadata cannot be located with certainty: only scalar fields may precede it."""
    i = value.find(_META)
    if i < 0 or value.find(b"{", 1, i) >= 0:
        return None
    j = i + len(_META)
    sep = b"" if value[j : j + 1] == b"}" else b","
    return b"".join((value[:j], b'"resourceVersion":"', rv.encode(), b'"', sep, value[j:]))


def _compact_bytes(b: bytes) -> bytes:
    """orjson's result keeps its growth buffer (>= 4 KiB for a 1 KiB object); an exact-size copy
    makes 60k cached objects ~180 MiB smaller."""
    return bytes(memoryview(b))


class Watcher:
    """Async iterator of CacheEvent for one client watch."""

    def __init__(self, cache: WatchCache, prefix: str, after: int, maxlen: int) -> None:
        self._cache = cache
        self.prefix = prefix
        self.last_revision = after  # newest revision handed to the consumer (or the start point)
        self._queued_rev = after  # newest revision put in the queue
        self._maxlen = maxlen
        self._queue: deque[CacheEvent] = deque()
        self._wake = asyncio.Event()
        self._live = False  # receiving pushes (False while catching up from the ring)
        self.closed_reason: str | None = None

    # called by the cache (event-loop thread)
    def _push(self, ev: CacheEvent) -> None:
        if ev.rev <= self._queued_rev:
            return
        if len(self._queue) >= self._maxlen:
            self._close("too slow")
            return
        self._queue.append(ev)
        self._queued_rev = ev.rev
        self._wake.set()

    def _close(self, reason: str) -> None:
        if self.closed_reason is None:
            self.closed_reason = reason
            self._cache._unregister(self)
            self._wake.set()

    def close(self) -> None:
        self._close("closed")

    @property
    def progress_revision(self) -> int:
        """Newest revision this watcher has seen everything up to (for BOOKMARK events)."""
        if self._live and not self._queue and self.closed_reason is None:
            return max(self.last_revision, self._cache.revision)
        return self.last_revision

    def __aiter__(self) -> AsyncIterator[CacheEvent]:
        return self

    async def __anext__(self) -> CacheEvent:
        while True:
            if self._queue:
                ev = self._queue.popleft()
                self.last_revision = ev.rev
                return ev
            if self.closed_reason is not None:
                raise StopAsyncIteration
            if not self._live:
                self._cache._catch_up(self)
                continue
            self._wake.clear()
            await self._wake.wait()


class WatchCache:
    def __init__(
        self,
        store: Store,
        *,
        prefix: str = "",
        history_revisions: int = 1000,
        history_seconds: float = 300.0,
        watcher_queue: int = 1000,
        clock: Any = time.monotonic,
    ) -> None:
        self.store = store
        self.prefix = prefix
        self.history_revisions = history_revisions
        self.history_seconds = history_seconds
        self.watcher_queue = watcher_queue
        self.clock = clock
        self.revision = 0  # newest revision applied
        self.oldest_revision = 0  # a watch from R >= this is served from the ring
        self._objects: dict[str, CachedObject] = {}
        self._keys: list[str] = []  # sorted
        self._ring: list[CacheEvent] = []
        self._ring_times: list[float] = []
        self._ring_start = 0  # index of the first live entry in _ring (amortised trimming)
        self._watchers: dict[str, set[Watcher]] = {}  # prefix -> live watchers
        self._waiters: list[tuple[int, asyncio.Future[None]]] = []
        self._task: asyncio.Task[None] | None = None

    # ------------------------------------------------------------ lifecycle

    async def start(self) -> None:
        await self._load()
        self._task = asyncio.get_running_loop().create_task(self._follow(), name="kpx-watch-cache")

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        for ws in list(self._watchers.values()):
            for w in list(ws):
                w._close("cache closed")
        for _, fut in self._waiters:
            if not fut.done():
                fut.set_exception(StoreError("watch cache closed"))
        self._waiters.clear()

    async def _load(self) -> None:
        objects: dict[str, CachedObject] = {}
        start_after = ""
        rev = 0
        while True:
            kvs, rev, more = await self.store.list(
                self.prefix, revision=rev, start_after=start_after, limit=10_000
            )
            for kv in kvs:
                objects[kv.key] = ingest(kv)
            if not more:
                break
            start_after = kvs[-1].key
        self._objects = objects
        self._keys = sorted(objects)
        self._ring = []
        self._ring_times = []
        self._ring_start = 0
        self.revision = rev
        self.oldest_revision = rev
        self._wake_waiters()

    async def _follow(self) -> None:
        backoff = 0.05
        while True:
            try:
                # the whole key space, not just our prefix: a write elsewhere still advances the
                # revision, so consistent_revision() never waits for an event that cannot come
                async for ev in self.store.watch("", self.revision):
                    self._apply(ev)
                    backoff = 0.05
            except asyncio.CancelledError:
                raise
            except Compacted:
                log.warning(
                    "component=store watch cache fell behind compaction at %d; reloading", self.revision
                )
                await self._resync()
            except Exception as e:  # store restart, connection loss: retry from the last revision
                log.warning("component=store watch cache lost the store watch (%s); retrying", e)
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, 1.0)

    async def _resync(self) -> None:
        for ws in list(self._watchers.values()):
            for w in list(ws):
                w._close("resync")
        await self._load()

    # ------------------------------------------------------------ ingest

    def _apply(self, ev: Event) -> None:
        kv = ev.kv
        if kv.mod_revision <= self.revision:
            return
        key = kv.key
        if not key.startswith(self.prefix):
            self.revision = kv.mod_revision
            if self._waiters:
                self._wake_waiters()
            return
        prev = self._objects.get(key)
        if ev.type == "PUT":
            obj = ingest(kv)
            if prev is None:
                bisect.insort(self._keys, key)
            self._objects[key] = obj
            cev = CacheEvent("PUT", key, kv.mod_revision, obj, prev)
        else:
            if prev is not None:
                del self._objects[key]
                i = bisect.bisect_left(self._keys, key)
                if i < len(self._keys) and self._keys[i] == key:
                    del self._keys[i]
            if kv.value or prev is None:
                obj = ingest(kv)  # the last value, at the delete's revision
            else:  # a backend that lost the last value (etcd prev_kv after compaction)
                obj = CachedObject(
                    key, kv.mod_revision, *_with_rv(prev, kv.mod_revision), prev.create_revision
                )
            cev = CacheEvent("DELETE", key, kv.mod_revision, obj, prev)
        self.revision = kv.mod_revision
        now = self.clock()
        self._ring.append(cev)
        self._ring_times.append(now)
        self._trim(now)
        self._fan_out(cev)
        if self._waiters:
            self._wake_waiters()

    def _trim(self, now: float) -> None:
        n = len(self._ring) - self._ring_start
        start = self._ring_start
        limit = now - self.history_seconds
        while n > self.history_revisions and self._ring_times[start] < limit:
            self.oldest_revision = self._ring[start].rev
            start += 1
            n -= 1
        if start != self._ring_start:
            self._ring_start = start
            if start > 4096 and start * 2 > len(self._ring):
                del self._ring[:start]
                del self._ring_times[:start]
                self._ring_start = 0

    def _fan_out(self, ev: CacheEvent) -> None:
        key = ev.key
        for prefix, ws in list(self._watchers.items()):
            if key.startswith(prefix):
                for w in list(ws):
                    w._push(ev)

    # ------------------------------------------------------------ reads

    def get(self, key: str) -> CachedObject | None:
        return self._objects.get(key)

    def list(
        self, prefix: str, start_after: str = "", limit: int = 0
    ) -> tuple[list[CachedObject], int, bool]:
        """Objects under prefix in key order (after start_after), at self.revision; (objs, rev, more)."""
        keys = self._keys
        i = (
            bisect.bisect_right(keys, start_after)
            if start_after and start_after >= prefix
            else bisect.bisect_left(keys, prefix)
        )
        out: list[CachedObject] = []
        objects = self._objects
        n = len(keys)
        while i < n:
            k = keys[i]
            if not k.startswith(prefix):
                break
            if limit and len(out) >= limit:
                return out, self.revision, True
            out.append(objects[k])
            i += 1
        return out, self.revision, False

    def count(self, prefix: str) -> int:
        lo = bisect.bisect_left(self._keys, prefix)
        end = prefix_end(prefix)
        hi = bisect.bisect_left(self._keys, end) if end else len(self._keys)
        return hi - lo

    async def wait_for_revision(self, rev: int, timeout: float = 3.0) -> None:
        """Return once the cache has applied revision `rev`; FutureRevision after `timeout` s."""
        if self.revision >= rev:
            return
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        entry = (rev, fut)
        self._waiters.append(entry)
        try:
            await asyncio.wait_for(fut, timeout)
        except TimeoutError:
            raise FutureRevision(f"revision {rev} not reached (cache at {self.revision})") from None
        finally:
            with contextlib.suppress(ValueError):
                self._waiters.remove(entry)

    async def consistent_revision(self, timeout: float = 3.0) -> int:
        """The store's current revision, once the cache has caught up with it (read-your-writes)."""
        rev = await self.store.current_revision()
        await self.wait_for_revision(rev, timeout)
        return rev

    def _wake_waiters(self) -> None:
        rev = self.revision
        keep = []
        for r, fut in self._waiters:
            if r <= rev:
                if not fut.done():
                    fut.set_result(None)
            else:
                keep.append((r, fut))
        self._waiters[:] = keep

    # ------------------------------------------------------------ watch

    def watch(self, prefix: str, from_revision: int) -> Watcher:
        """Events under prefix with revision > from_revision. Raises Compacted when from_revision is
        older than the ring holds (the caller answers 410 Expired)."""
        if from_revision < self.oldest_revision:
            raise Compacted(from_revision, self.oldest_revision)
        w = Watcher(self, prefix, from_revision, self.watcher_queue)
        self._catch_up(w)
        return w

    def _ring_index_after(self, rev: int) -> int:
        return bisect.bisect_right(self._ring, rev, lo=self._ring_start, key=_rev_of)

    def _catch_up(self, w: Watcher) -> None:
        """Fill w's queue from the ring; once it holds everything up to now, make it live."""
        if w.closed_reason is not None:
            return
        if w._queued_rev < self.oldest_revision:
            w._close("too slow")  # the ring moved past it while it was catching up
            return
        i = self._ring_index_after(w._queued_rev)
        ring = self._ring
        n = len(ring)
        prefix = w.prefix
        room = w._maxlen - len(w._queue)
        while i < n and room > 0:
            ev = ring[i]
            if ev.key.startswith(prefix):
                w._queue.append(ev)
                room -= 1
            w._queued_rev = ev.rev
            i += 1
        if i >= n:
            w._queued_rev = max(w._queued_rev, self.revision)
            w._live = True
            self._watchers.setdefault(prefix, set()).add(w)

    def _unregister(self, w: Watcher) -> None:
        ws = self._watchers.get(w.prefix)
        if ws is not None:
            ws.discard(w)
            if not ws:
                del self._watchers[w.prefix]

    @property
    def watcher_count(self) -> int:
        return sum(len(ws) for ws in self._watchers.values())


def _rev_of(ev: CacheEvent) -> int:
    return ev.rev


def _with_rv(last: CachedObject, rev: int) -> tuple[dict[str, Any], bytes]:
    """A DELETE event's object: the last state, with resourceVersion = the delete's revision."""
    obj = dict(last.obj)
    meta = dict(obj.get("metadata") or {})
    meta["resourceVersion"] = str(rev)
    obj["metadata"] = meta
    return obj, _compact_bytes(orjson.dumps(obj))
