"""The storage contract (controlplane.store.base), the SAME tests against SQLite and real etcd."""

from __future__ import annotations

import asyncio
import random
import uuid

import pytest

from controlplane.store.base import (
    Compacted,
    Conflict,
    Event,
    FutureRevision,
    KeyExists,
    KeyNotFound,
    Store,
    StoreError,
)
from controlplane.store.etcd import EtcdStore
from tests.integration.store_fixtures import EtcdServer, StoreBackend, async_test

pytestmark = pytest.mark.integration


async def next_events(it, n: int, timeout: float = 10.0) -> list[Event]:
    out = []
    for _ in range(n):
        out.append(await asyncio.wait_for(it.__anext__(), timeout))
    return out


@async_test
async def test_crud(store_backend: StoreBackend) -> None:
    s = await store_backend.open()
    k = store_backend.prefix + "default/a"
    try:
        kv = await s.create(k, b'{"a":1}')
        assert kv.key == k and kv.value == b'{"a":1}' and kv.mod_revision == kv.create_revision > 0
        assert await s.get(k) == kv
        with pytest.raises(KeyExists):
            await s.create(k, b"{}")
        kv2 = await s.update(k, b'{"a":2}', kv.mod_revision)
        assert kv2.mod_revision > kv.mod_revision and kv2.create_revision == kv.create_revision
        assert (await s.get(k)) == kv2
        gone = await s.delete(k)
        assert gone.value == b'{"a":2}' and gone.mod_revision > kv2.mod_revision
        assert await s.get(k) is None
        with pytest.raises(KeyNotFound):
            await s.update(k, b"{}", gone.mod_revision)
        with pytest.raises(KeyNotFound):
            await s.delete(k)
        again = await s.create(k, b'{"a":3}')  # a new incarnation after delete
        assert again.create_revision == again.mod_revision > gone.mod_revision
    finally:
        await s.close()


@async_test
async def test_cas_conflict(store_backend: StoreBackend) -> None:
    s = await store_backend.open()
    k = store_backend.prefix + "default/cas"
    try:
        kv = await s.create(k, b"1")
        kv2 = await s.update(k, b"2", kv.mod_revision)
        with pytest.raises(Conflict) as exc:
            await s.update(k, b"3", kv.mod_revision)  # stale revision
        assert exc.value.current == kv2
        with pytest.raises(Conflict):
            await s.delete(k, kv.mod_revision)
        assert (await s.get(k)) == kv2
        # 8 writers racing from the same revision: exactly one wins, nothing is lost silently
        results = await asyncio.gather(
            *(s.update(k, f"w{i}".encode(), kv2.mod_revision) for i in range(8)), return_exceptions=True
        )
        wins = [r for r in results if not isinstance(r, BaseException)]
        assert len(wins) == 1 and all(isinstance(r, Conflict) for r in results if r not in wins)
        assert (await s.get(k)) == wins[0]
        await s.delete(k, wins[0].mod_revision)
        assert await s.get(k) is None
    finally:
        await s.close()


@async_test
async def test_one_global_revision_across_keys(store_backend: StoreBackend) -> None:
    s = await store_backend.open()
    p = store_backend.prefix
    try:
        start = await s.current_revision()
        revs = []
        for i in range(5):
            revs.append((await s.create(f"{p}ns{i}/x", b"{}")).mod_revision)
        kv = await s.get(f"{p}ns0/x")
        assert kv is not None
        revs.append((await s.update(f"{p}ns0/x", b"{}", kv.mod_revision)).mod_revision)
        revs.append((await s.delete(f"{p}ns3/x")).mod_revision)
        assert revs == list(range(start + 1, start + 8))  # every write, any key, is the next revision
        assert await s.current_revision() == revs[-1]
    finally:
        await s.close()


@async_test
async def test_list_order_pagination_and_at_revision(store_backend: StoreBackend) -> None:
    s = await store_backend.open()
    p = store_backend.prefix
    try:
        names = [f"{p}ns{i % 3}/svc{i:02d}" for i in range(20)]
        for n in random.sample(names, len(names)):
            await s.create(n, n.encode())
        await s.create(p[:-1] + "x/outside", b"{}")  # shares the string prefix minus '/', not the range
        kvs, rev, more = await s.list(p)
        assert [kv.key for kv in kvs] == sorted(names) and not more
        assert rev == await s.current_revision()
        # pages: limit + start_after, every page consistent at the first page's revision
        pages, after = [], ""
        while True:
            page, prev, more = await s.list(p, revision=rev, start_after=after, limit=6)
            assert prev == rev
            pages.append([kv.key for kv in page])
            if not more:
                break
            after = page[-1].key
        assert [len(x) for x in pages] == [6, 6, 6, 2]
        assert sum(pages, []) == sorted(names)
        # one namespace only
        kvs, _, _ = await s.list(f"{p}ns1/")
        assert [kv.key for kv in kvs] == sorted(n for n in names if "/ns1/" in n)
        # later writes do not change a list at the old revision
        first = kvs[0]
        await s.update(first.key, b"changed", first.mod_revision)
        await s.delete(names[0])
        await s.create(f"{p}ns9/new", b"{}")
        old, at, _ = await s.list(p, revision=rev)
        assert at == rev and [kv.key for kv in old] == sorted(names)
        assert {kv.key: kv.value for kv in old}[first.key] == first.key.encode()
        now, _, _ = await s.list(p)
        assert names[0] not in [kv.key for kv in now] and f"{p}ns9/new" in [kv.key for kv in now]
        assert {kv.key: kv.value for kv in now}[first.key] == b"changed"
        with pytest.raises(FutureRevision):
            await s.list(p, revision=await s.current_revision() + 1000)
    finally:
        await s.close()


@async_test
async def test_watch_replays_history_then_follows_in_order(store_backend: StoreBackend) -> None:
    s = await store_backend.open()
    p = store_backend.prefix
    try:
        a = await s.create(p + "ns/a", b"a1")
        a2 = await s.update(p + "ns/a", b"a2", a.mod_revision)
        b = await s.create(p + "ns/b", b"b1")
        await s.create(p[:-1] + "-other/x", b"not under prefix")
        it = s.watch(p, a.mod_revision - 1)  # replay starts with a's create
        evs = await next_events(it, 3)
        assert [(e.type, e.kv.key, e.kv.value) for e in evs] == [
            ("PUT", p + "ns/a", b"a1"),
            ("PUT", p + "ns/a", b"a2"),
            ("PUT", p + "ns/b", b"b1"),
        ]
        assert evs[0].prev is None and evs[1].prev is not None and evs[1].prev.value == b"a1"
        d = await s.delete(p + "ns/a", a2.mod_revision)
        writes = [await s.create(f"{p}ns/c{i}", b"c") for i in range(50)]
        evs = await next_events(it, 51)
        assert evs[0].type == "DELETE" and evs[0].kv.mod_revision == d.mod_revision
        assert evs[0].kv.value == b"a2" and evs[0].prev is not None and evs[0].prev.value == b"a2"
        assert [e.kv.mod_revision for e in evs[1:]] == [w.mod_revision for w in writes]
        # a second watcher from b's revision sees exactly what followed b
        it2 = s.watch(p, b.mod_revision)
        evs2 = await next_events(it2, 51)
        assert [e.kv.mod_revision for e in evs2] == [d.mod_revision] + [w.mod_revision for w in writes]
        await it.aclose()  # type: ignore[attr-defined]
        await it2.aclose()  # type: ignore[attr-defined]
    finally:
        await s.close()


async def _watch_raises_compacted(s: Store, prefix: str, rev: int) -> None:
    with pytest.raises(Compacted):
        it = s.watch(prefix, rev)
        await asyncio.wait_for(it.__anext__(), 10)


@async_test
async def test_compaction_makes_old_revisions_unavailable(store_backend: StoreBackend) -> None:
    s = await store_backend.open()
    p = store_backend.prefix
    try:
        gone = await s.create(p + "ns/gone", b"x")
        await s.delete(p + "ns/gone")
        kv = await s.create(p + "ns/a", b"1")
        for i in range(10):
            kv = await s.update(p + "ns/a", str(i).encode(), kv.mod_revision)
        mid = kv.mod_revision
        kv = await s.update(p + "ns/a", b"after", kv.mod_revision)
        await s.compact(mid)
        assert await s.compacted_revision() >= mid
        with pytest.raises(Compacted):
            await s.list(p, revision=mid - 1)
        await _watch_raises_compacted(s, p, gone.mod_revision - 1)
        at, rev, _ = await s.list(p, revision=mid)  # the compact revision itself is still readable
        assert rev == mid and [(x.key, x.value) for x in at] == [(p + "ns/a", b"9")]
        it = s.watch(p, mid)
        ev = await asyncio.wait_for(it.__anext__(), 10)
        assert ev.kv.mod_revision == kv.mod_revision and ev.kv.value == b"after"
        await it.aclose()  # type: ignore[attr-defined]
        now, _, _ = await s.list(p)
        assert [(x.key, x.value) for x in now] == [(p + "ns/a", b"after")]
    finally:
        await s.close()


@async_test
async def test_restart_keeps_every_acknowledged_write(store_backend: StoreBackend) -> None:
    s = await store_backend.open()
    p = store_backend.prefix
    acked = {}
    try:
        results = await asyncio.gather(*(s.create(f"{p}ns/k{i:03d}", f"v{i}".encode()) for i in range(200)))
        acked = {kv.key: kv for kv in results}
        last = await s.current_revision()
    finally:
        await s.close()
    store_backend.restart_backing()
    s = await store_backend.open()
    try:
        assert await s.current_revision() >= last
        kvs, _, _ = await s.list(p)
        assert {kv.key: kv for kv in kvs} == acked
        kv = await s.create(p + "ns/after-restart", b"{}")
        assert kv.mod_revision > last  # the revision never goes backwards
    finally:
        await s.close()


@async_test
async def test_two_clients_each_see_every_event_in_order(store_backend: StoreBackend) -> None:
    if store_backend.kind == "sqlite":
        # one SQLite file has exactly one owner: a second store on it is refused, not corrupted
        s = await store_backend.open()
        try:
            with pytest.raises(StoreError, match="in use"):
                await store_backend.open()
        finally:
            await s.close()
        return
    a = await store_backend.open()
    b = await store_backend.open()
    p = store_backend.prefix
    try:
        start = await a.current_revision()
        wa, wb = a.watch(p, start), b.watch(p, start)

        async def writer(s: Store, tag: str) -> list[int]:
            return [(await s.create(f"{p}ns/{tag}{i}", b"{}")).mod_revision for i in range(40)]

        ra, rb = await asyncio.gather(writer(a, "a"), writer(b, "b"))
        expected = sorted(ra + rb)
        ea, eb = await next_events(wa, 80), await next_events(wb, 80)
        assert [e.kv.mod_revision for e in ea] == expected
        assert [e.kv.mod_revision for e in eb] == expected
        await wa.aclose()  # type: ignore[attr-defined]
        await wb.aclose()  # type: ignore[attr-defined]
    finally:
        await a.close()
        await b.close()


@async_test
async def test_etcd_watch_and_writes_survive_etcd_restart(etcd_server: EtcdServer) -> None:
    s = EtcdStore(etcd_server.url, auto_compact=False)
    await s.start()
    p = f"/registry/t{uuid.uuid4().hex[:10]}/"
    try:
        kv = await s.create(p + "ns/a", b"1")
        it = s.watch(p, kv.mod_revision)
        etcd_server.restart()  # SIGKILL + start on the same ports and data dir
        kv2 = await s.update(p + "ns/a", b"2", kv.mod_revision)
        ev = await asyncio.wait_for(it.__anext__(), 20)
        assert ev.kv.mod_revision == kv2.mod_revision and ev.kv.value == b"2"
        await it.aclose()  # type: ignore[attr-defined]
    finally:
        await s.close()


@async_test
async def test_periodic_compaction_keeps_the_newest_revisions(store_backend: StoreBackend) -> None:
    s = await store_backend.open(
        auto_compact=True, compact_period=0.05, retain_revisions=5, retain_seconds=0.2
    )
    p = store_backend.prefix
    try:
        kv = await s.create(p + "ns/a", b"0")
        for i in range(30):
            kv = await s.update(p + "ns/a", str(i).encode(), kv.mod_revision)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 10
        while await s.compacted_revision() < kv.mod_revision - 5 and loop.time() < deadline:
            await asyncio.sleep(0.05)
        compacted = await s.compacted_revision()
        assert compacted == kv.mod_revision - 5  # idle store: everything but the newest 5 revisions
        with pytest.raises(Compacted):
            await s.list(p, revision=compacted - 1)
        old, _, _ = await s.list(p, revision=compacted)
        assert old[0].value == b"24"
    finally:
        await s.close()
