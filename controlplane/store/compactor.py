"""Periodic compaction, driven by the apiserver as kube-apiserver drives etcd's.

Every `period` seconds the compactor samples the store's current revision. It compacts to the
newest sampled revision that is at least `retain_seconds` old, capped so that the newest
`retain_revisions` revisions are always kept: history is kept >= 1000 revisions AND >= 5 minutes.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import deque
from collections.abc import Callable
from typing import Protocol

from controlplane.store.base import StoreError

log = logging.getLogger("kpx.store.compactor")


class _Compactable(Protocol):
    async def current_revision(self) -> int: ...

    async def compacted_revision(self) -> int: ...

    async def compact(self, revision: int) -> None: ...


class CompactionPolicy:
    """Pure bookkeeping: which revision may be compacted now (unit-tested without a store)."""

    def __init__(self, *, retain_revisions: int = 1000, retain_seconds: float = 300.0) -> None:
        self.retain_revisions = retain_revisions
        self.retain_seconds = retain_seconds
        self._samples: deque[tuple[float, int]] = deque()

    def observe(self, now: float, revision: int) -> None:
        if not self._samples or self._samples[-1][1] != revision:
            self._samples.append((now, revision))

    def target(self, now: float, current: int, compacted: int) -> int:
        """Revision to compact to, or 0 when nothing may be compacted yet."""
        best = 0
        while self._samples and self._samples[0][0] <= now - self.retain_seconds:
            best = self._samples.popleft()[1]
        if best:
            # keep the chosen sample: a later call may still use it when the count cap bound it
            self._samples.appendleft((now - self.retain_seconds, best))
        best = min(best, current - self.retain_revisions)
        return best if best > compacted else 0


class Compactor:
    def __init__(
        self,
        store: _Compactable,
        *,
        period: float = 60.0,
        retain_revisions: int = 1000,
        retain_seconds: float = 300.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.store = store
        self.period = period
        self.policy = CompactionPolicy(retain_revisions=retain_revisions, retain_seconds=retain_seconds)
        self.clock = clock
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run(), name="kpx-store-compactor")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    async def run_once(self) -> int:
        """Sample and compact if allowed; returns the revision compacted to (0 = none)."""
        now = self.clock()
        current = await self.store.current_revision()
        self.policy.observe(now, current)
        target = self.policy.target(now, current, await self.store.compacted_revision())
        if target:
            await self.store.compact(target)
            log.info("component=store compacted revision=%d current=%d", target, current)
        return target

    async def _run(self) -> None:
        while True:
            try:
                await self.run_once()
            except StoreError as e:
                log.warning("component=store compaction failed: %s", e)
            await asyncio.sleep(self.period)
