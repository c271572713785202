"""SIGKILL `kpx apiserver` (SQLite storage) in the middle of an 8-client write load, 20 times:
after each restart every acknowledged write is there and the revision never went backwards."""

from __future__ import annotations

import asyncio
import random
import signal
from pathlib import Path

import aiohttp
import orjson
import pytest

from bench.apiserver_bench import ApiserverProcess, service
from tests.integration.store_fixtures import async_test

pytestmark = pytest.mark.integration

ITERATIONS = 20
CLIENTS = 8


async def list_services(s: aiohttp.ClientSession) -> tuple[dict[str, int], int]:
    async with s.get("/api/v1/namespaces/default/services") as r:
        assert r.status == 200, await r.text()
        body = orjson.loads(await r.read())
    names = {o["metadata"]["name"]: int(o["metadata"]["resourceVersion"]) for o in body["items"]}
    return names, int(body["metadata"]["resourceVersion"])


async def load_until_killed(
    api: ApiserverProcess, s: aiohttp.ClientSession, tag: str, acked: dict[str, int]
) -> int:
    """8 clients create Services until the server dies under them; returns how many were acked."""
    n = 0
    stop = False

    async def client(c: int) -> None:
        nonlocal n
        i = 0
        while not stop:
            name = f"{tag}-{c}-{i}"
            i += 1
            try:
                async with s.post(
                    "/api/v1/namespaces/default/services",
                    data=orjson.dumps(service(name)),
                    headers={"Content-Type": "application/json"},
                ) as r:
                    body = await r.read()
                    if r.status != 201:
                        raise AssertionError(f"create {name}: HTTP {r.status} {body[:300]!r}")
            except (TimeoutError, aiohttp.ClientError):
                return  # the server died under this request: not acknowledged
            acked[name] = int(orjson.loads(body)["metadata"]["resourceVersion"])
            n += 1

    tasks = [asyncio.create_task(client(c)) for c in range(CLIENTS)]
    # kill after a random number of acknowledged writes (not a fixed time: on a busy machine the
    # first writes can take a while), plus a random few ms so the kill lands at any point of a write
    target = random.randint(1, 80)
    deadline = asyncio.get_running_loop().time() + 30
    while n < target and asyncio.get_running_loop().time() < deadline and not all(t.done() for t in tasks):
        await asyncio.sleep(0.005)
    await asyncio.sleep(random.uniform(0, 0.03))
    api.kill(signal.SIGKILL)  # mid-load: requests are in flight on every client
    stop = True
    await asyncio.wait_for(asyncio.gather(*tasks), 30)
    return n


@async_test
async def test_sigkill_mid_load_loses_no_acknowledged_write(tmp_path: Path) -> None:
    acked: dict[str, int] = {}
    last_rev = 0
    for it in range(ITERATIONS + 1):
        api = ApiserverProcess(tmp_path / "data", storage="sqlite", controllers="")
        await asyncio.get_running_loop().run_in_executor(None, api.start)
        try:
            async with api.session() as s:
                present, rev = await list_services(s)
                assert rev >= last_rev, f"iteration {it}: revision went backwards {last_rev} -> {rev}"
                assert rev >= max(acked.values(), default=0)
                missing = [n for n in acked if n not in present]
                assert not missing, f"iteration {it}: acknowledged creates lost: {missing[:5]}"
                assert all(present[n] == rv for n, rv in acked.items())
                last_rev = rev
                if it < ITERATIONS:
                    got = await load_until_killed(api, s, f"i{it}", acked)
                    assert got > 0, "the load made no progress before the kill"
        finally:
            api.kill(signal.SIGKILL)
