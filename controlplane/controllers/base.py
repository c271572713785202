"""The shape every controller shares: informers feed handlers, handlers enqueue keys, workers
take keys off a coalescing queue and call `sync(key)`, which reads the caches, computes the
desired state with pure functions and writes the difference. `sync` is idempotent, so a
periodic resync (every key again) and retries are always safe."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Hashable, Iterable
from typing import Generic, TypeVar

from controlplane.controllers.api import Registry, error_code
from controlplane.controllers.informer import InformerFactory
from controlplane.controllers.workqueue import ShutDown, WorkQueue

K = TypeVar("K", bound=Hashable)
MAX_RETRIES = 15  # then the key waits for the next event or resync (client-go controllers do the same)


class Controller(Generic[K]):
    name = "controller"
    workers = 1
    resync_period = 300.0  # seconds between full resyncs; 0 = never
    needs: tuple[str, ...] = ()  # resources whose informers must be synced before workers start

    def __init__(self, registry: Registry, informers: InformerFactory) -> None:
        self.registry = registry
        self.informers = informers
        self.queue: WorkQueue[K] = WorkQueue()
        self.log = logging.getLogger(f"kpx.controllers.{self.name}")
        self.syncs = 0  # completed sync calls (for tests and the bench)
        self.errors = 0

    # --- to implement ---
    async def sync(self, key: K) -> None:
        raise NotImplementedError

    def all_keys(self) -> Iterable[K]:
        """Every key a full resync should visit."""
        return ()

    async def prepare(self) -> None:
        """Runs once after the informers synced, before the workers start."""

    # --- machinery ---
    async def run(self) -> None:
        await self.informers.wait_synced(self.needs)
        await self.prepare()
        for k in self.all_keys():
            self.queue.add(k)
        tasks = [asyncio.create_task(self._worker(), name=f"{self.name}-worker-{i}") for i in range(self.workers)]
        if self.resync_period > 0:
            tasks.append(asyncio.create_task(self._resync(), name=f"{self.name}-resync"))
        try:
            await asyncio.gather(*tasks)
        finally:
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

    async def _resync(self) -> None:
        while True:
            await asyncio.sleep(self.resync_period)
            for k in list(self.all_keys()):
                self.queue.add(k)

    async def _worker(self) -> None:
        while True:
            try:
                key = await self.queue.get()
            except ShutDown:
                return
            try:
                await self.sync(key)
            except asyncio.CancelledError:
                raise
            except Exception as e:
                self.errors += 1
                n = self.queue.retry(key) if self.queue_retry_allowed(key) else MAX_RETRIES + 1
                code = error_code(e)
                if code is None and n == 1:
                    self.log.exception("controller=%s key=%s sync failed", self.name, key)
                else:
                    self.log.info("controller=%s key=%s sync failed (%s: %s), retry %d",
                                  self.name, key, type(e).__name__, e, n)
            else:
                self.queue.forget(key)
            finally:
                self.syncs += 1
                self.queue.done(key)

    def queue_retry_allowed(self, key: K) -> bool:
        failures = self.queue._failures.get(key, 0)
        if failures >= MAX_RETRIES:
            self.queue.forget(key)
            return False
        return True

    def stop(self) -> None:
        self.queue.shutdown()
