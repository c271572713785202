"""SQLite file backend: a kine-like append-only log with one global revision.

Every create/update/delete appends one row to table `kine`; its `id` is the global revision
(etcd's mod_revision). The current state of a key is its newest row; a delete is a tombstone row
carrying the last value. History (older rows) serves list-at-revision and watch replay until the
periodic compaction removes rows superseded at or before the compact revision.

Writes: ONE dedicated writer thread owns the write connection. Callers on the event loop enqueue
requests; the writer drains everything queued (group commit), applies it in one transaction,
commits, then hands results and events back to the loop with one call_soon_threadsafe. A write is
acknowledged only after COMMIT returned.

Durability: journal_mode=WAL with synchronous=FULL: every COMMIT fsyncs the WAL, so an
acknowledged write survives not only SIGKILL of the apiserver (NORMAL would already do that: the
WAL pages are in the OS page cache) but also a machine crash or power cut, which is what etcd
promises and what a kube-apiserver expects of its store. Group commit pays one fsync per batch,
so FULL costs little throughput.

Revisions never go backwards: `id` is AUTOINCREMENT (sqlite_sequence never reuses an id, even
when compaction deletes the newest rows of deleted keys).

Reads (get, list, history replay) run on a small thread pool with per-thread read connections;
no sqlite call ever runs on the event loop thread.
"""

from __future__ import annotations

import asyncio
import builtins
import contextlib
import fcntl
import os
import sqlite3
import threading
from collections import deque
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from controlplane.store.base import (
    KV,
    Compacted,
    Conflict,
    Event,
    FutureRevision,
    KeyExists,
    KeyNotFound,
    StoreError,
)
from controlplane.store.compactor import Compactor
from controlplane.store.keys import prefix_end

SCHEMA = """
CREATE TABLE IF NOT EXISTS kine (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    name TEXT NOT NULL,
    created INTEGER NOT NULL,
    deleted INTEGER NOT NULL,
    create_revision INTEGER NOT NULL,
    prev_revision INTEGER NOT NULL,
    value BLOB NOT NULL
);
CREATE INDEX IF NOT EXISTS kine_name_id_index ON kine (name, id);
CREATE INDEX IF NOT EXISTS kine_prev_revision_index ON kine (prev_revision);
CREATE UNIQUE INDEX IF NOT EXISTS kine_name_prev_revision_uindex ON kine (name, prev_revision);
CREATE TABLE IF NOT EXISTS kine_meta (key TEXT PRIMARY KEY, value INTEGER NOT NULL);
"""

# rows deleted per compaction transaction; the writer serves queued writes between chunks
COMPACT_CHUNK = 2000
HISTORY_BATCH = 1000
# a store watcher that falls this far behind switches to replaying from the table
WATCH_BUFFER = 10_000

_LATEST = "SELECT id, create_revision, deleted, value FROM kine WHERE name = ? ORDER BY id DESC LIMIT 1"


@dataclass(slots=True)
class _Request:
    op: str  # create | update | delete | compact | stop
    key: str = ""
    value: bytes = b""
    expected: int = 0
    future: asyncio.Future[Any] | None = None


@dataclass(slots=True, eq=False)
class _Subscriber:
    prefix: str
    events: deque[Event] = field(default_factory=deque)
    wake: asyncio.Event = field(default_factory=asyncio.Event)
    overflow: bool = False


class _Inbox:
    """Requests for the writer thread. Unlike queue.Queue, a put wakes the writer only when it is
    actually waiting: under load the writer is busy committing and puts cost a deque append."""

    def __init__(self) -> None:
        self._items: deque[_Request] = deque()
        self._cv = threading.Condition(threading.Lock())
        self._waiting = False

    def put(self, item: _Request) -> None:
        self._items.append(item)
        if self._waiting:
            with self._cv:
                self._cv.notify()

    def empty(self) -> bool:
        return not self._items

    def take(self, max_items: int, wait: bool) -> builtins.list[_Request]:
        items = self._items
        if not items and wait:
            with self._cv:
                self._waiting = True
                try:
                    while not items:
                        self._cv.wait()
                finally:
                    self._waiting = False
        out: builtins.list[_Request] = []
        while items and len(out) < max_items:
            out.append(items.popleft())
        return out


def _connect(path: str, synchronous: str) -> sqlite3.Connection:
    conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False, timeout=30.0)
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute(f"PRAGMA synchronous={synchronous}")
    conn.execute("PRAGMA busy_timeout=30000")
    return conn


class SQLiteStore:
    """base.Store over one SQLite file."""

    def __init__(
        self,
        path: str,
        *,
        synchronous: str = "FULL",
        max_batch: int = 512,
        auto_compact: bool = True,
        compact_period: float = 60.0,
        retain_revisions: int = 1000,
        retain_seconds: float = 300.0,
    ) -> None:
        if synchronous.upper() not in ("OFF", "NORMAL", "FULL", "EXTRA"):
            raise ValueError(f"bad synchronous level {synchronous!r}")
        self.path = path
        self._synchronous = synchronous.upper()
        self._max_batch = max_batch
        self._requests = _Inbox()
        self._writer: threading.Thread | None = None
        self._readers = ThreadPoolExecutor(max_workers=2, thread_name_prefix="kpx-sqlite-read")
        self._local = threading.local()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._rev = 0  # newest committed revision (event-loop view)
        self._compacted = 0
        self._subs: set[_Subscriber] = set()
        self._lock_fd: int | None = None
        self._closed = False
        self.compactor: Compactor | None = None
        if auto_compact:
            self.compactor = Compactor(
                self, period=compact_period, retain_revisions=retain_revisions, retain_seconds=retain_seconds
            )
        # writer-thread state
        self._w_conn: sqlite3.Connection | None = None
        self._w_rev = 0
        self._w_compact: builtins.list[
            tuple[int, int, asyncio.Future[Any] | None]
        ] = []  # (target, next_lo, fut)

    # ---------------------------------------------------------------- lifecycle

    async def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        await self._loop.run_in_executor(self._readers, self._open)
        self._writer = threading.Thread(target=self._write_loop, name="kpx-sqlite-writer", daemon=True)
        self._writer.start()
        if self.compactor is not None:
            self.compactor.start()

    def _open(self) -> None:
        d = os.path.dirname(os.path.abspath(self.path))
        os.makedirs(d, exist_ok=True)
        fd = os.open(self.path + ".lock", os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise StoreError(f"{self.path} is in use by another process (lock {self.path}.lock)") from None
        self._lock_fd = fd
        conn = _connect(self.path, self._synchronous)
        conn.executescript(SCHEMA)
        row = conn.execute("SELECT seq FROM sqlite_sequence WHERE name = 'kine'").fetchone()
        self._w_rev = self._rev = int(row[0]) if row else 0
        row = conn.execute("SELECT value FROM kine_meta WHERE key = 'compact_rev'").fetchone()
        self._compacted = int(row[0]) if row else 0
        self._w_conn = conn

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self.compactor is not None:
            await self.compactor.stop()
        if self._writer is not None:
            self._requests.put(_Request("stop"))
            await asyncio.get_running_loop().run_in_executor(None, self._writer.join)
        for sub in list(self._subs):
            sub.wake.set()
        self._readers.shutdown(wait=True)
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None

    # ---------------------------------------------------------------- reads

    def _reader(self) -> sqlite3.Connection:
        conn: sqlite3.Connection | None = getattr(self._local, "conn", None)
        if conn is None:
            conn = _connect(self.path, self._synchronous)
            conn.execute("PRAGMA query_only=1")
            self._local.conn = conn
        return conn

    async def _read(self, fn: Callable[..., Any], *args: Any) -> Any:
        if self._closed:
            raise StoreError("store is closed")
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._readers, fn, *args)

    async def current_revision(self) -> int:
        return self._rev

    async def compacted_revision(self) -> int:
        return self._compacted

    async def get(self, key: str) -> KV | None:
        return await self._read(self._get_sync, key)  # type: ignore[no-any-return]

    def _get_sync(self, key: str) -> KV | None:
        row = self._reader().execute(_LATEST, (key,)).fetchone()
        if row is None or row[2]:
            return None
        return KV(key, bytes(row[3]), row[0], row[1])

    async def list(
        self, prefix: str, *, revision: int = 0, start_after: str = "", limit: int = 0
    ) -> tuple[builtins.list[KV], int, bool]:
        return await self._read(self._list_sync, prefix, revision, start_after, limit)  # type: ignore[no-any-return]

    def _snapshot_meta(self, conn: sqlite3.Connection) -> tuple[int, int]:
        row = conn.execute("SELECT seq FROM sqlite_sequence WHERE name = 'kine'").fetchone()
        cur = int(row[0]) if row else 0
        row = conn.execute("SELECT value FROM kine_meta WHERE key = 'compact_rev'").fetchone()
        return cur, (int(row[0]) if row else 0)

    def _list_sync(
        self, prefix: str, revision: int, start_after: str, limit: int
    ) -> tuple[builtins.list[KV], int, bool]:
        conn = self._reader()
        conn.execute("BEGIN")
        try:
            current, compacted = self._snapshot_meta(conn)
            if revision == 0:
                revision = current
            elif revision > current:
                raise FutureRevision(f"revision {revision} is newer than the current revision {current}")
            elif revision < compacted:
                raise Compacted(revision, compacted)
            lo = max(prefix, start_after + "\x00") if start_after else prefix
            end = prefix_end(prefix)
            # walk the (name, id) index in key order and stop at the limit: each row is kept only
            # if it is its key's newest row at `revision` (a point lookup on the same index)
            sql = (
                "SELECT k.name, k.value, k.id, k.create_revision FROM kine k"
                " WHERE k.name >= ? {hi} AND k.id <= ? AND k.deleted = 0"
                " AND k.id = (SELECT MAX(m.id) FROM kine m WHERE m.name = k.name AND m.id <= ?)"
                " ORDER BY k.name{lim}"
            ).format(hi="AND k.name < ?" if end else "", lim=" LIMIT ?" if limit > 0 else "")
            params: builtins.list[Any] = [lo] + ([end] if end else []) + [revision, revision]
            if limit > 0:
                params.append(limit + 1)
            rows = conn.execute(sql, params).fetchall()
        finally:
            conn.execute("COMMIT")
        more = limit > 0 and len(rows) > limit
        if more:
            rows = rows[:limit]
        return [KV(r[0], bytes(r[1]), r[2], r[3]) for r in rows], revision, more

    def _history_sync(self, prefix: str, after: int, batch: int) -> tuple[builtins.list[Event], int]:
        """Events under prefix with revision > after (up to batch), and the compact revision then."""
        conn = self._reader()
        conn.execute("BEGIN")
        try:
            _, compacted = self._snapshot_meta(conn)
            if after < compacted:
                raise Compacted(after, compacted)
            end = prefix_end(prefix)
            sql = (
                "SELECT k.id, k.name, k.value, k.create_revision, k.deleted,"
                " p.id, p.value, p.create_revision, p.deleted"
                " FROM kine k LEFT JOIN kine p ON p.id = k.prev_revision"
                " WHERE k.id > ? AND k.name >= ? {hi} ORDER BY k.id LIMIT ?"
            ).format(hi="AND k.name < ?" if end else "")
            params: builtins.list[Any] = [after, prefix] + ([end] if end else []) + [batch]
            rows = conn.execute(sql, params).fetchall()
        finally:
            conn.execute("COMMIT")
        events = []
        for rid, name, value, crev, deleted, pid, pvalue, pcrev, pdeleted in rows:
            prev = KV(name, bytes(pvalue), pid, pcrev) if pid is not None and not pdeleted else None
            kv = KV(name, bytes(value), rid, crev)
            events.append(Event("DELETE" if deleted else "PUT", kv, prev))
        return events, compacted

    # ---------------------------------------------------------------- writes (loop side)

    async def _submit(self, req: _Request) -> Any:
        if self._closed or self._loop is None:
            raise StoreError("store is closed")
        req.future = self._loop.create_future()
        self._requests.put(req)
        return await req.future

    async def create(self, key: str, value: bytes) -> KV:
        return await self._submit(_Request("create", key, value))  # type: ignore[no-any-return]

    async def update(self, key: str, value: bytes, expected_revision: int) -> KV:
        return await self._submit(_Request("update", key, value, expected_revision))  # type: ignore[no-any-return]

    async def delete(self, key: str, expected_revision: int = 0) -> KV:
        return await self._submit(_Request("delete", key, b"", expected_revision))  # type: ignore[no-any-return]

    async def compact(self, revision: int) -> None:
        if revision <= self._compacted:
            return
        if revision > self._rev:
            raise FutureRevision(f"cannot compact at {revision}: current revision is {self._rev}")
        await self._submit(_Request("compact", expected=revision))

    # ---------------------------------------------------------------- writer thread

    def _write_loop(self) -> None:
        assert self._w_conn is not None and self._loop is not None
        stop = False
        while not stop:
            batch = self._requests.take(self._max_batch, wait=not self._w_compact)
            if not batch:
                self._compact_chunk()
                continue
            writes = []
            for req in batch:
                if req.op == "stop":
                    stop = True
                elif req.op == "compact":
                    self._w_compact.append((req.expected, -1, req.future))
                else:
                    writes.append(req)
            if writes:
                self._commit_batch(writes)
            if self._w_compact and self._requests.empty():
                self._compact_chunk()
        # a compaction cut short leaves rows behind; the next one resumes from compact_done
        for _, _, fut in self._w_compact:
            if fut is not None:
                self._loop.call_soon_threadsafe(_settle, fut, None, StoreError("store closed"))
        self._w_conn.close()

    def _commit_batch(self, writes: builtins.list[_Request]) -> None:
        """One transaction for the whole batch: one SELECT of the keys' newest rows, the checks in
        Python, one executemany of the new rows, one COMMIT (one fsync). Few sqlite calls also
        means few GIL re-acquisitions by this thread while the event loop is busy."""
        conn = self._w_conn
        assert conn is not None and self._loop is not None
        results: builtins.list[tuple[asyncio.Future[Any] | None, Any, BaseException | None]] = []
        events: builtins.list[Event] = []
        start_rev = self._w_rev
        try:
            conn.execute("BEGIN IMMEDIATE")
            latest = self._latest_rows(conn, {req.key for req in writes})
            rows: builtins.list[tuple[int, str, int, int, int, int, bytes]] = []
            for req in writes:
                try:
                    ev, row = self._apply(latest.get(req.key), req)
                except StoreError as e:
                    results.append((req.future, None, e))
                    continue
                latest[req.key] = (row[0], row[4], row[3], row[6])
                rows.append(row)
                events.append(ev)
                results.append((req.future, ev.kv, None))
            if rows:
                conn.executemany(
                    "INSERT INTO kine (id, name, created, deleted, create_revision, prev_revision, value)"
                    " VALUES (?, ?, ?, ?, ?, ?, ?)",
                    rows,
                )
            conn.execute("COMMIT")
        except sqlite3.Error as e:
            with contextlib.suppress(sqlite3.Error):
                conn.execute("ROLLBACK")
            self._w_rev = start_rev
            err = StoreError(f"sqlite write failed: {e}")
            results = [(req.future, None, err) for req in writes]
            events = []
        self._loop.call_soon_threadsafe(self._deliver, self._w_rev, results, events)

    @staticmethod
    def _latest_rows(conn: sqlite3.Connection, keys: set[str]) -> dict[str, tuple[int, int, int, bytes]]:
        """key -> (id, create_revision, deleted, value) of its newest row, for keys that have one."""
        out: dict[str, tuple[int, int, int, bytes]] = {}
        names = builtins.list(keys)
        for i in range(0, len(names), 500):
            part = names[i : i + 500]
            marks = ",".join("?" * len(part))
            for name, rid, crev, deleted, value in conn.execute(
                "SELECT name, id, create_revision, deleted, value FROM kine WHERE id IN"
                f" (SELECT MAX(id) FROM kine WHERE name IN ({marks}) GROUP BY name)",
                part,
            ):
                out[name] = (rid, crev, deleted, bytes(value))
        return out

    def _apply(
        self, row: tuple[int, int, int, bytes] | None, req: _Request
    ) -> tuple[Event, tuple[int, str, int, int, int, int, bytes]]:
        """Check one request against the key's newest row; the event and the row to insert."""
        cur = KV(req.key, row[3], row[0], row[1]) if row is not None and not row[2] else None
        rev = self._w_rev + 1
        if req.op == "create":
            if cur is not None:
                raise KeyExists(req.key)
            prev_id = row[0] if row is not None else 0
            self._w_rev = rev
            return Event("PUT", KV(req.key, req.value, rev, rev), None), (
                rev,
                req.key,
                1,
                0,
                rev,
                prev_id,
                req.value,
            )
        if cur is None:
            raise KeyNotFound(req.key)
        if req.op == "update":
            if cur.mod_revision != req.expected:
                raise Conflict(req.key, cur)
            self._w_rev = rev
            ev = Event("PUT", KV(req.key, req.value, rev, cur.create_revision), cur)
            return ev, (rev, req.key, 0, 0, cur.create_revision, cur.mod_revision, req.value)
        if req.expected and cur.mod_revision != req.expected:
            raise Conflict(req.key, cur)
        self._w_rev = rev
        ev = Event("DELETE", KV(req.key, cur.value, rev, cur.create_revision), cur)
        return ev, (rev, req.key, 0, 1, cur.create_revision, cur.mod_revision, cur.value)

    def _compact_chunk(self) -> None:
        """One transaction of compaction work for the oldest pending compaction request."""
        conn = self._w_conn
        assert conn is not None and self._loop is not None
        target, lo, fut = self._w_compact[0]
        try:
            conn.execute("BEGIN IMMEDIATE")
            if lo < 0:  # first chunk: publish the new compact revision before deleting anything
                row = conn.execute("SELECT value FROM kine_meta WHERE key = 'compact_rev'").fetchone()
                published = int(row[0]) if row else 0
                row = conn.execute("SELECT value FROM kine_meta WHERE key = 'compact_done'").fetchone()
                lo = int(row[0]) if row else 0  # rows at or below this are already swept
                if target > published:
                    _set_meta(conn, "compact_rev", target)
                else:
                    target = published
                self._loop.call_soon_threadsafe(self._set_compacted, target)
            hi = min(target, lo + COMPACT_CHUNK)
            conn.execute(
                "DELETE FROM kine WHERE id > ? AND id <= ? AND (deleted = 1 OR id IN ("
                " SELECT prev_revision FROM kine WHERE prev_revision > ? AND prev_revision <= ? AND id <= ?))",
                (lo, hi, lo, hi, target),
            )
            _set_meta(conn, "compact_done", hi)
            conn.execute("COMMIT")
        except sqlite3.Error as e:
            with contextlib.suppress(sqlite3.Error):
                conn.execute("ROLLBACK")
            self._w_compact.pop(0)
            if fut is not None:
                self._loop.call_soon_threadsafe(_settle, fut, None, StoreError(f"compaction failed: {e}"))
            return
        if hi >= target:
            self._w_compact.pop(0)
            if fut is not None:
                self._loop.call_soon_threadsafe(_settle, fut, None, None)
        else:
            self._w_compact[0] = (target, hi, fut)

    # ---------------------------------------------------------------- loop side: results and watch

    def _set_compacted(self, rev: int) -> None:
        self._compacted = max(self._compacted, rev)

    def _deliver(
        self,
        rev: int,
        results: builtins.list[tuple[asyncio.Future[Any] | None, Any, BaseException | None]],
        events: builtins.list[Event],
    ) -> None:
        self._rev = max(self._rev, rev)
        if events:
            for sub in self._subs:
                if sub.overflow:
                    continue
                p = sub.prefix
                added = False
                for ev in events:
                    if ev.kv.key.startswith(p):
                        sub.events.append(ev)
                        added = True
                if len(sub.events) > WATCH_BUFFER:
                    sub.events.clear()
                    sub.overflow = True
                    added = True
                if added:
                    sub.wake.set()
        for fut, value, exc in results:
            if fut is not None:
                _settle(fut, value, exc)

    def watch(self, prefix: str, from_revision: int) -> AsyncIterator[Event]:
        if from_revision < self._compacted:
            raise Compacted(from_revision, self._compacted)
        return self._watch(prefix, from_revision)

    async def _watch(self, prefix: str, from_revision: int) -> AsyncIterator[Event]:
        sub = _Subscriber(prefix)
        self._subs.add(sub)
        last = from_revision
        replaying = True
        try:
            while not self._closed:
                if replaying:
                    # Anything committed from now on reaches sub.events; the table read below
                    # starts later, so nothing falls between the two (duplicates are skipped).
                    sub.events.clear()
                    sub.overflow = False
                    events, _ = await self._read(self._history_sync, prefix, last, HISTORY_BATCH)
                    for ev in events:
                        last = ev.kv.mod_revision
                        yield ev
                    replaying = len(events) == HISTORY_BATCH
                    continue
                while sub.events:
                    ev = sub.events.popleft()
                    if ev.kv.mod_revision > last:
                        last = ev.kv.mod_revision
                        yield ev
                if sub.overflow:
                    replaying = True
                    continue
                sub.wake.clear()
                await sub.wake.wait()
        finally:
            self._subs.discard(sub)


def _set_meta(conn: sqlite3.Connection, key: str, value: int) -> None:
    conn.execute(
        "INSERT INTO kine_meta (key, value) VALUES (?, ?) ON CONFLICT(key) DO UPDATE SET value = excluded.value",
        (key, value),
    )


def _settle(fut: asyncio.Future[Any], value: Any, exc: BaseException | None) -> None:
    if fut.done():
        return
    if exc is not None:
        fut.set_exception(exc)
    else:
        fut.set_result(value)
