"""etcd v3 backend over etcd's JSON gRPC gateway (HTTP + aiohttp, no gRPC dependency).

etcd 3.4 (Debian's etcd-server) serves the gateway under /v3/ (and the deprecated /v3beta/):
kv/range, kv/txn, kv/deleterange, kv/compaction and the streaming /v3/watch, with keys and
values base64-encoded and int64 fields as JSON strings.

Revision = etcd's mod_revision; CAS = a txn comparing MOD (or CREATE == 0 for create). Watches
come from etcd itself, never from this process's writes, so several apiserver processes on one
etcd each see every event in order. A broken watch stream (etcd restart) is resumed from the last
revision delivered; a compacted one raises Compacted.
"""

from __future__ import annotations

import asyncio
import base64
import builtins
import logging
from collections.abc import AsyncIterator, Sequence
from typing import Any

import aiohttp
import orjson

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
from controlplane.store.keys import prefix_end_bytes

log = logging.getLogger("kpx.store.etcd")

_COMPACTED = "required revision has been compacted"
_FUTURE = "required revision is a future revision"
_PROBE_KEY = base64.b64encode(b"/kpx/revision-probe").decode()


def _b64(s: str | bytes) -> str:
    return base64.b64encode(s.encode() if isinstance(s, str) else s).decode()


def _kv(d: dict[str, Any]) -> KV:
    return KV(
        base64.b64decode(d["key"]).decode(),
        base64.b64decode(d.get("value", "")),
        int(d.get("mod_revision", 0)),
        int(d.get("create_revision", 0)),
    )


def _rev(resp: dict[str, Any]) -> int:
    return int(resp.get("header", {}).get("revision", 0))


class EtcdStore:
    """base.Store over an etcd v3 cluster's JSON gateway."""

    def __init__(
        self,
        endpoints: str | Sequence[str] = "http://127.0.0.1:2379",
        *,
        request_timeout: float = 10.0,
        retry_seconds: float = 5.0,
        auto_compact: bool = True,
        compact_period: float = 60.0,
        retain_revisions: int = 1000,
        retain_seconds: float = 300.0,
    ) -> None:
        eps = endpoints.split(",") if isinstance(endpoints, str) else list(endpoints)
        self.endpoints = [e.strip().rstrip("/") for e in eps if e.strip()]
        if not self.endpoints:
            raise ValueError("no etcd endpoints")
        self._ep = 0
        self._timeout = aiohttp.ClientTimeout(total=request_timeout)
        self._retry_seconds = retry_seconds
        self._session: aiohttp.ClientSession | None = None
        self._compacted = 0
        self._closed = False
        self.compactor: Compactor | None = None
        if auto_compact:
            self.compactor = Compactor(
                self, period=compact_period, retain_revisions=retain_revisions, retain_seconds=retain_seconds
            )

    async def start(self) -> None:
        self._session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=64), json_serialize=lambda o: orjson.dumps(o).decode()
        )
        await self.current_revision()  # fail early with a clear message when etcd is not there
        if self.compactor is not None:
            self.compactor.start()

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self.compactor is not None:
            await self.compactor.stop()
        if self._session is not None:
            await self._session.close()

    # ---------------------------------------------------------------- transport

    async def _call(self, path: str, body: dict[str, Any]) -> dict[str, Any]:
        if self._session is None or self._closed:
            raise StoreError("etcd store is not started")
        data = orjson.dumps(body)
        last_err: Exception | None = None
        # Retry connection failures for a few seconds: a restarted etcd leaves stale pooled
        # connections behind, and a restarting one refuses connections for a moment.
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self._retry_seconds
        delay = 0.02
        while True:
            url = self.endpoints[self._ep] + path
            try:
                async with self._session.post(
                    url, data=data, headers={"Content-Type": "application/json"}, timeout=self._timeout
                ) as resp:
                    payload = await resp.read()
                    try:
                        out: dict[str, Any] = orjson.loads(payload) if payload else {}
                    except orjson.JSONDecodeError:
                        out = {"error": payload[:200].decode(errors="replace")}
                    if resp.status != 200 or "error" in out:
                        self._raise(out, resp.status)
                    return out
            except (TimeoutError, aiohttp.ClientConnectionError) as e:
                last_err = e
                self._ep = (self._ep + 1) % len(self.endpoints)
            if loop.time() + delay > deadline:
                raise StoreError(f"etcd unreachable at {', '.join(self.endpoints)}: {last_err}")
            await asyncio.sleep(delay)
            delay = min(delay * 2, 0.5)

    def _raise(self, out: dict[str, Any], status: int) -> None:
        msg = str(out.get("message") or out.get("error") or f"HTTP {status}")
        if _COMPACTED in msg:
            raise Compacted(0, self._compacted)
        if _FUTURE in msg:
            raise FutureRevision(msg)
        raise StoreError(f"etcd: {msg}")

    # ---------------------------------------------------------------- reads

    async def current_revision(self) -> int:
        return _rev(await self._call("/v3/kv/range", {"key": _PROBE_KEY, "count_only": True}))

    async def compacted_revision(self) -> int:
        return self._compacted

    async def get(self, key: str) -> KV | None:
        out = await self._call("/v3/kv/range", {"key": _b64(key)})
        kvs = out.get("kvs")
        return _kv(kvs[0]) if kvs else None

    async def list(
        self, prefix: str, *, revision: int = 0, start_after: str = "", limit: int = 0
    ) -> tuple[builtins.list[KV], int, bool]:
        lo = prefix.encode()
        if start_after and start_after >= prefix:
            lo = start_after.encode() + b"\0"
        body: dict[str, Any] = {
            "key": _b64(lo or b"\0"),
            "range_end": _b64(prefix_end_bytes(prefix.encode())),
        }
        if revision:
            body["revision"] = revision
        if limit > 0:
            body["limit"] = limit
        try:
            out = await self._call("/v3/kv/range", body)
        except Compacted:
            self._compacted = max(self._compacted, revision + 1)  # a lower bound: etcd does not say
            raise Compacted(revision, self._compacted) from None
        kvs = [_kv(d) for d in out.get("kvs", [])]
        return kvs, revision or _rev(out), bool(out.get("more"))

    # ---------------------------------------------------------------- writes

    async def create(self, key: str, value: bytes) -> KV:
        k = _b64(key)
        out = await self._call(
            "/v3/kv/txn",
            {
                "compare": [{"key": k, "target": "CREATE", "result": "EQUAL", "create_revision": 0}],
                "success": [{"request_put": {"key": k, "value": _b64(value)}}],
                "failure": [{"request_range": {"key": k}}],
            },
        )
        if not out.get("succeeded"):
            raise KeyExists(key)
        rev = _rev(out)
        return KV(key, value, rev, rev)

    async def update(self, key: str, value: bytes, expected_revision: int) -> KV:
        k = _b64(key)
        out = await self._call(
            "/v3/kv/txn",
            {
                "compare": [
                    {"key": k, "target": "MOD", "result": "EQUAL", "mod_revision": expected_revision}
                ],
                "success": [{"request_put": {"key": k, "value": _b64(value), "prev_kv": True}}],
                "failure": [{"request_range": {"key": k}}],
            },
        )
        if not out.get("succeeded"):
            raise self._cas_failure(key, out)
        prev = out["responses"][0]["response_put"].get("prev_kv")
        if prev is None:  # deleted between compare and put cannot happen in one txn; be defensive
            raise KeyNotFound(key)
        return KV(key, value, _rev(out), int(prev.get("create_revision", 0)))

    async def delete(self, key: str, expected_revision: int = 0) -> KV:
        k = _b64(key)
        if not expected_revision:
            out = await self._call("/v3/kv/deleterange", {"key": k, "prev_kv": True})
            prevs = out.get("prev_kvs") or []
            if not prevs:
                raise KeyNotFound(key)
            prev = _kv(prevs[0])
            return KV(key, prev.value, _rev(out), prev.create_revision)
        out = await self._call(
            "/v3/kv/txn",
            {
                "compare": [
                    {"key": k, "target": "MOD", "result": "EQUAL", "mod_revision": expected_revision}
                ],
                "success": [{"request_delete_range": {"key": k, "prev_kv": True}}],
                "failure": [{"request_range": {"key": k}}],
            },
        )
        if not out.get("succeeded"):
            raise self._cas_failure(key, out)
        prev = _kv(out["responses"][0]["response_delete_range"]["prev_kvs"][0])
        return KV(key, prev.value, _rev(out), prev.create_revision)

    @staticmethod
    def _cas_failure(key: str, out: dict[str, Any]) -> StoreError:
        kvs = out.get("responses", [{}])[0].get("response_range", {}).get("kvs")
        if not kvs:
            return KeyNotFound(key)
        return Conflict(key, _kv(kvs[0]))

    async def compact(self, revision: int) -> None:
        if revision <= self._compacted:
            return
        try:
            await self._call("/v3/kv/compaction", {"revision": revision})
        except Compacted:
            pass  # another apiserver on this etcd compacted at or past it already
        self._compacted = max(self._compacted, revision)

    # ---------------------------------------------------------------- watch

    def watch(self, prefix: str, from_revision: int) -> AsyncIterator[Event]:
        if from_revision < self._compacted:
            raise Compacted(from_revision, self._compacted)
        return self._watch(prefix, from_revision)

    async def _watch(self, prefix: str, from_revision: int) -> AsyncIterator[Event]:
        if self._session is None:
            raise StoreError("etcd store is not started")
        p = prefix.encode()
        last = from_revision
        backoff = 0.05
        while not self._closed:
            req = {
                "create_request": {
                    "key": _b64(p or b"\0"),
                    "range_end": _b64(prefix_end_bytes(p)),
                    "start_revision": last + 1,
                    "prev_kv": True,
                }
            }
            url = self.endpoints[self._ep] + "/v3/watch"
            try:
                async with self._session.post(
                    url,
                    data=orjson.dumps(req),
                    headers={"Content-Type": "application/json"},
                    timeout=aiohttp.ClientTimeout(total=None, sock_connect=5.0),
                ) as resp:
                    if resp.status != 200:
                        raise StoreError(f"etcd watch: HTTP {resp.status}")
                    buf = b""
                    async for chunk in resp.content.iter_any():
                        buf += chunk
                        while True:
                            nl = buf.find(b"\n")
                            if nl < 0:
                                break
                            line, buf = buf[:nl], buf[nl + 1 :]
                            if not line.strip():
                                continue
                            for ev in self._watch_events(orjson.loads(line), last):
                                last = ev.kv.mod_revision
                                yield ev
                            backoff = 0.05
            except (TimeoutError, aiohttp.ClientError, StoreError) as e:
                if isinstance(e, Compacted):
                    raise
                if self._closed:
                    return
                log.info("component=store etcd watch interrupted (%s); resuming after revision %d", e, last)
                self._ep = (self._ep + 1) % len(self.endpoints)
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, 1.0)

    def _watch_events(self, msg: dict[str, Any], last: int) -> builtins.list[Event]:
        res = msg.get("result")
        if res is None:
            err = msg.get("error", {})
            raise StoreError(f"etcd watch error: {err.get('message', err) if isinstance(err, dict) else err}")
        if res.get("canceled"):
            crev = int(res.get("compact_revision", 0))
            if crev:
                self._compacted = max(self._compacted, crev)
                raise Compacted(last, crev)
            raise StoreError(f"etcd watch canceled: {res.get('cancel_reason', '')}")
        out = []
        for e in res.get("events", ()):
            kv = _kv(e["kv"])
            prev = _kv(e["prev_kv"]) if "prev_kv" in e else None
            if e.get("type") == "DELETE":
                last_value = prev.value if prev is not None else b""
                create = prev.create_revision if prev is not None else 0
                out.append(Event("DELETE", KV(kv.key, last_value, kv.mod_revision, create), prev))
            else:
                out.append(Event("PUT", kv, prev))
        return out
