"""The watch cache over both real backends: list/get from memory with resourceVersion injected,
read-your-writes, watch from the ring (and 410 when older), slow watchers cut off without
blocking writers or other watchers."""

from __future__ import annotations

import asyncio

import orjson
import pytest

from controlplane.store.base import Compacted
from controlplane.store.cache import CacheEvent, WatchCache, Watcher
from tests.integration.store_fixtures import StoreBackend, async_test

pytestmark = pytest.mark.integration


def svc(name: str, ns: str = "default") -> bytes:
    return orjson.dumps({"kind": "Service", "apiVersion": "v1", "metadata": {"name": name, "namespace": ns}})


async def take(w: Watcher, n: int, timeout: float = 10.0) -> list[CacheEvent]:
    return [await asyncio.wait_for(w.__anext__(), timeout) for _ in range(n)]


@async_test
async def test_list_and_get_from_memory_carry_resource_version(store_backend: StoreBackend) -> None:
    s = await store_backend.open()
    p = store_backend.prefix
    for i in range(30):
        await s.create(f"{p}ns{i % 2}/s{i:02d}", svc(f"s{i:02d}", f"ns{i % 2}"))
    cache = WatchCache(s, prefix=p)
    await cache.start()
    try:
        kv = await s.create(f"{p}ns0/late", svc("late", "ns0"))  # arrives through the watch
        await cache.wait_for_revision(kv.mod_revision)
        objs, rev, more = cache.list(p)
        assert rev == kv.mod_revision and not more and len(objs) == 31
        assert [o.key for o in objs] == sorted(o.key for o in objs)
        for o in objs:
            assert orjson.loads(o.raw) == o.obj
            assert o.obj["metadata"]["resourceVersion"] == str(o.rev)
        stored = {x.key: x.mod_revision for x in (await s.list(p))[0]}
        assert {o.key: o.rev for o in objs} == stored
        page, _, more = cache.list(p + "ns1/", limit=4)
        assert more and [o.key for o in page] == [f"{p}ns1/s{i:02d}" for i in (1, 3, 5, 7)]
        page2, _, _ = cache.list(p + "ns1/", start_after=page[-1].key, limit=4)
        assert [o.key for o in page2] == [f"{p}ns1/s{i:02d}" for i in (9, 11, 13, 15)]
        got = cache.get(f"{p}ns0/late")
        assert got is not None and got.rev == kv.mod_revision and cache.get(f"{p}ns0/nope") is None
    finally:
        await cache.close()
        await s.close()


@async_test
async def test_read_your_writes(store_backend: StoreBackend) -> None:
    s = await store_backend.open()
    # sqlite: the same client (one owner per file); etcd: writes by another client reach the cache
    writer = s if store_backend.kind == "sqlite" else await store_backend.open()
    p = store_backend.prefix
    cache = WatchCache(s, prefix=p)
    await cache.start()
    try:
        for i in range(20):
            kv = await writer.create(f"{p}ns/s{i}", svc(f"s{i}"))
            rev = await cache.consistent_revision()
            assert rev >= kv.mod_revision
            objs, at, _ = cache.list(p)
            assert at >= kv.mod_revision and f"{p}ns/s{i}" in [o.key for o in objs]
        kv = await writer.update(f"{p}ns/s0", svc("s0-changed"), (await writer.get(f"{p}ns/s0")).mod_revision)  # type: ignore[union-attr]
        await cache.wait_for_revision(kv.mod_revision)
        got = cache.get(f"{p}ns/s0")
        assert got is not None and got.obj["metadata"]["name"] == "s0-changed"
        # a write outside the cache's prefix advances the revision without an object to show
        outside = await writer.create(p[:-1] + "-elsewhere/x", b"{}")
        assert await cache.consistent_revision(timeout=5) == outside.mod_revision
        assert cache.get(p[:-1] + "-elsewhere/x") is None and cache.revision == outside.mod_revision
    finally:
        await cache.close()
        if writer is not s:
            await writer.close()
        await s.close()


@async_test
async def test_watch_from_ring_and_410_when_older(store_backend: StoreBackend) -> None:
    s = await store_backend.open()
    p = store_backend.prefix
    cache = WatchCache(s, prefix=p, history_revisions=10, history_seconds=0.0)
    await cache.start()
    try:
        start = cache.revision
        with pytest.raises(Compacted):
            cache.watch(p, start - 1)  # before the cache's initial state
        revs = []
        for i in range(40):
            revs.append((await s.create(f"{p}ns/s{i:02d}", svc(f"s{i:02d}"))).mod_revision)
        await cache.wait_for_revision(revs[-1])
        with pytest.raises(Compacted) as exc:
            cache.watch(p, revs[5])
        assert exc.value.compacted == cache.oldest_revision > revs[5]
        w = cache.watch(p, revs[-11])  # exactly the oldest still held
        evs = await take(w, 10)
        assert [e.rev for e in evs] == revs[-10:]
        d = await s.delete(f"{p}ns/s39")
        (ev,) = await take(w, 1)
        assert ev.type == "DELETE" and ev.rev == d.mod_revision
        assert ev.obj.obj["metadata"]["resourceVersion"] == str(d.mod_revision)
        assert ev.prev is not None and ev.prev.rev == revs[-1]
        w.close()
    finally:
        await cache.close()
        await s.close()


@async_test
async def test_slow_watcher_is_cut_off_fast_one_and_writers_continue(store_backend: StoreBackend) -> None:
    s = await store_backend.open()
    p = store_backend.prefix
    cache = WatchCache(s, prefix=p, watcher_queue=20)
    await cache.start()
    try:
        slow = cache.watch(p, cache.revision)
        fast = cache.watch(p, cache.revision)
        got: list[int] = []

        async def consume() -> None:
            async for ev in fast:
                got.append(ev.rev)
                if len(got) == 200:
                    return

        consumer = asyncio.create_task(consume())

        async def write(i: int) -> list[int]:
            return [
                (await s.create(f"{p}ns{i}/s{j}", svc(f"s{j}", f"ns{i}"))).mod_revision for j in range(25)
            ]

        # writers finish although `slow` never reads (it would block them if fan-out waited)
        revs = sorted(sum(await asyncio.wait_for(asyncio.gather(*(write(i) for i in range(8))), 60), []))
        await asyncio.wait_for(consumer, 20)
        assert got == revs
        assert slow.closed_reason == "too slow" and fast.closed_reason is None
        drained = [ev.rev async for ev in slow]  # what was queued before the cut, then the end
        assert drained == revs[: len(drained)] and len(drained) == 20
        # the client re-watches from its last revision and gets the rest
        again = cache.watch(p, drained[-1])
        rest = await take(again, len(revs) - len(drained))
        assert [e.rev for e in rest] == revs[len(drained) :]
        again.close()
        fast.close()
    finally:
        await cache.close()
        await s.close()


@async_test
async def test_watch_replays_more_than_its_queue_from_the_ring(store_backend: StoreBackend) -> None:
    s = await store_backend.open()
    p = store_backend.prefix
    cache = WatchCache(s, prefix=p, watcher_queue=16)
    await cache.start()
    try:
        start = cache.revision
        revs = [(await s.create(f"{p}ns/s{i:03d}", svc(f"s{i:03d}"))).mod_revision for i in range(100)]
        await cache.wait_for_revision(revs[-1])
        w = cache.watch(p + "ns/", start)
        evs = await take(w, 100)
        assert [e.rev for e in evs] == revs and w.closed_reason is None
        more = (await s.create(f"{p}ns/tail", svc("tail"))).mod_revision
        (ev,) = await take(w, 1)
        assert ev.rev == more and w.progress_revision == more
        w.close()
    finally:
        await cache.close()
        await s.close()
