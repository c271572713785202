"""The work queue: bursts coalesce, a key is never processed twice at once, retries back off."""

from __future__ import annotations

import asyncio

import pytest

from controlplane.controllers.workqueue import ShutDown, WorkQueue

pytestmark = pytest.mark.unit


def test_burst_coalesces_and_key_in_flight_is_requeued_once() -> None:
    async def main() -> None:
        q: WorkQueue[str] = WorkQueue()
        for _ in range(100):
            q.add("a")
        q.add("b")
        assert len(q) == 2
        k = await q.get()
        assert k == "a"
        q.add("a")
        q.add("a")  # while "a" is processing: not handed out again yet
        assert await q.get() == "b"
        assert len(q) == 0
        q.done("a")
        assert len(q) == 1 and await q.get() == "a"
        q.done("a")
        q.done("b")
        assert q.idle

    asyncio.run(main())


def test_retry_backs_off_exponentially_and_forget_resets() -> None:
    async def main() -> None:
        q: WorkQueue[str] = WorkQueue()
        assert q.retry("k") == 1
        assert q.retry("k") == 2
        assert len(q) == 0  # delayed, not immediate
        assert await asyncio.wait_for(q.get(), 1.0) == "k"
        q.done("k")
        q.forget("k")
        assert q.retry("k") == 1

    asyncio.run(main())


def test_shutdown_wakes_workers() -> None:
    async def main() -> None:
        q: WorkQueue[str] = WorkQueue()
        t = asyncio.create_task(q.get())
        await asyncio.sleep(0)
        q.shutdown()
        with pytest.raises(ShutDown):
            await t

    asyncio.run(main())
