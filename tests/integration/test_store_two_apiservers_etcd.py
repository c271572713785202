"""Two `kpx apiserver` processes on one real etcd: writes through either one reach watchers of
both, every event in the same revision order (the watch comes from etcd, not local writes)."""

from __future__ import annotations

import asyncio
import signal
from pathlib import Path

import aiohttp
import orjson
import pytest

from bench.apiserver_bench import ApiserverProcess, service
from tests.integration.store_fixtures import EtcdServer, async_test

pytestmark = pytest.mark.integration


async def collect(s: aiohttp.ClientSession, rv: str, n: int, prefix: str) -> list[tuple[str, str, int]]:
    out: list[tuple[str, str, int]] = []
    async with s.get(
        "/api/v1/namespaces/default/services", params={"watch": "1", "resourceVersion": rv}
    ) as r:
        assert r.status == 200
        buf = b""
        async for chunk in r.content.iter_any():
            buf += chunk
            *lines, buf = buf.split(b"\n")
            for line in lines:
                ev = orjson.loads(line)
                meta = ev["object"]["metadata"]
                if meta.get("name", "").startswith(prefix):
                    out.append((ev["type"], meta["name"], int(meta["resourceVersion"])))
            if len(out) >= n:
                return out
    return out


@async_test
async def test_two_apiservers_on_one_etcd_see_every_event_in_order(
    etcd_server: EtcdServer, tmp_path: Path
) -> None:
    # the second apiserver shares the first one's credentials (same data dir contents, own process)
    a = ApiserverProcess(tmp_path / "a", storage="etcd", etcd_servers=etcd_server.url)
    loop = asyncio.get_running_loop()
    await loop.run_in_executor(None, a.start)
    b = ApiserverProcess(tmp_path / "a", storage="etcd", etcd_servers=etcd_server.url)
    b.log_path = tmp_path / "b-apiserver.log"
    try:
        await loop.run_in_executor(None, b.start)
        async with a.session() as sa, b.session() as sb:
            async with sa.get("/api/v1/namespaces/default/services") as r:
                rv = (await r.json())["metadata"]["resourceVersion"]
            prefix = "two-"
            n = 40
            wa = asyncio.create_task(collect(sa, rv, n + 1, prefix))
            wb = asyncio.create_task(collect(sb, rv, n + 1, prefix))

            async def create(s: aiohttp.ClientSession, name: str) -> int:
                async with s.post(
                    "/api/v1/namespaces/default/services",
                    data=orjson.dumps(service(name)),
                    headers={"Content-Type": "application/json"},
                ) as r:
                    assert r.status == 201, await r.text()
                    return int((await r.json())["metadata"]["resourceVersion"])

            revs = await asyncio.gather(*(create(sa if i % 2 else sb, f"{prefix}{i}") for i in range(n)))
            async with sb.delete(f"/api/v1/namespaces/default/services/{prefix}0") as r:
                assert r.status == 200, await r.text()
            ea, eb = await asyncio.wait_for(asyncio.gather(wa, wb), 60)
            assert ea == eb  # the same events, the same order, through either server
            assert [e[2] for e in ea[:n]] == sorted(revs)
            assert ea[-1][:2] == ("DELETED", f"{prefix}0")
            # and a write through one is readable through the other
            async with sa.get(f"/api/v1/namespaces/default/services/{prefix}7") as r:
                assert r.status == 200
    finally:
        b.kill(signal.SIGTERM)
        a.kill(signal.SIGTERM)
