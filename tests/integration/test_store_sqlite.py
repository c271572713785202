"""SQLite-specific behaviour: compaction really removes superseded rows (in chunks, resumable),
and group commit batches concurrent writers into few transactions."""

from __future__ import annotations

import asyncio
import sqlite3
from pathlib import Path

import pytest

from controlplane.store import sqlite as sqlite_store
from controlplane.store.base import StoreError
from controlplane.store.sqlite import SQLiteStore
from tests.integration.store_fixtures import async_test

pytestmark = pytest.mark.integration


def rows(path: Path) -> list[tuple[int, str, int]]:
    with sqlite3.connect(path) as c:
        return c.execute("SELECT id, name, deleted FROM kine ORDER BY id").fetchall()


@async_test
async def test_compaction_removes_superseded_rows_in_chunks(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(sqlite_store, "COMPACT_CHUNK", 7)  # many small transactions
    path = tmp_path / "c.db"
    s = SQLiteStore(str(path), auto_compact=False)
    await s.start()
    try:
        kv = await s.create("/registry/a", b"0")
        for i in range(40):
            kv = await s.update("/registry/a", str(i).encode(), kv.mod_revision)
        await s.create("/registry/gone", b"x")
        await s.delete("/registry/gone")
        keep = await s.create("/registry/b", b"b")
        target = await s.current_revision()
        last_a = kv.mod_revision
        kv = await s.update("/registry/a", b"after", kv.mod_revision)
        compaction = asyncio.create_task(s.compact(target))
        during = [await s.create(f"/registry/w{i}", b"w") for i in range(20)]  # writes interleave
        await compaction
        left = rows(path)
        ids = [r[0] for r in left]
        # a's newest row at the compact revision, b, and everything after the compact revision
        assert ids == sorted([last_a, keep.mod_revision, kv.mod_revision] + [w.mod_revision for w in during])
        assert not any(r[2] for r in left if r[0] <= target)  # no tombstones at or below it
        got, _, _ = await s.list("/registry/", revision=target)
        assert [(x.key, x.value) for x in got] == [("/registry/a", b"39"), ("/registry/b", b"b")]
    finally:
        await s.close()


@async_test
async def test_interrupted_compaction_is_resumed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sqlite_store, "COMPACT_CHUNK", 5)
    path = tmp_path / "r.db"
    s = SQLiteStore(str(path), auto_compact=False)
    await s.start()
    kv = await s.create("/registry/a", b"0")
    for i in range(60):
        kv = await s.update("/registry/a", str(i).encode(), kv.mod_revision)
    target = kv.mod_revision - 1
    compaction = asyncio.create_task(s.compact(target))
    await asyncio.sleep(0)  # let it start, then stop the store under it
    await s.close()
    with pytest.raises(StoreError, match="closed"):
        await compaction  # cut short after a chunk or two
    assert len(rows(path)) > 10  # superseded rows still there
    s = SQLiteStore(str(path), auto_compact=False)
    await s.start()
    try:
        assert await s.compacted_revision() == target  # published before the first row went
        kv = await s.update("/registry/a", b"x", kv.mod_revision)
        await s.compact(kv.mod_revision - 1)
        assert [r[0] for r in rows(path)] == [kv.mod_revision - 1, kv.mod_revision]
    finally:
        await s.close()


@async_test
async def test_group_commit_batches_concurrent_writers(tmp_path: Path) -> None:
    s = SQLiteStore(str(tmp_path / "g.db"), auto_compact=False)
    await s.start()
    commits = 0
    real = s._commit_batch

    def counting(writes: list[sqlite_store._Request]) -> None:
        nonlocal commits
        commits += 1
        real(writes)

    s._commit_batch = counting  # type: ignore[method-assign]
    try:
        await asyncio.gather(*(s.create(f"/registry/k{i}", b"v") for i in range(400)))
        assert await s.current_revision() == 400
        assert commits < 200  # many writes share one transaction (one fsync)
    finally:
        await s.close()
