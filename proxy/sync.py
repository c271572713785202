"""The sync loop: upstream's BoundedFrequencyRunner driving one `syncProxyRules` per mode.

`RunSchedule` is the pure timing logic (token bucket with `burst` tokens refilled one per
`min_interval`, a run at least every `max_interval`, `retry_after`), testable with a fake clock.
`BoundedFrequencyRunner` runs an async function on that schedule; `Syncer` is the function:
snapshot the tracker, `mode.render`, `mode.apply`, then metrics, health and conntrack hygiene.

kube-proxy semantics kept here:
- minSyncPeriod (default 1 s) between syncs, burst 2; requests coalesce while a sync runs.
- The first sync is full, and so is every sync after a failed apply (ApplyError), which is
  retried after syncPeriod unless a new change comes first; other syncs are partial.
- Every syncPeriod the mode's canary is checked (`mode.check_drift()`): drift -> full resync.
- A full resync at least every `full_sync_period` (upstream's FullSyncPeriod, 1 h).
- While the apiserver is away the informers keep their stores, nothing changes, and the data
  plane is left exactly as it is.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from proxy.metrics import ProxyMetrics
from proxy.model import ProxyState
from proxy.modes.base import ApplyError, Mode
from proxy.tracker import ChangeTracker

log = logging.getLogger("kpx.proxy.sync")

DEFAULT_MIN_SYNC_PERIOD = 1.0
DEFAULT_SYNC_PERIOD = 30.0
FULL_SYNC_PERIOD = 3600.0
BURST_SYNCS = 2


@dataclass(slots=True)
class RunSchedule:
    """When the next run may and must happen. Times are the caller's clock (monotonic s)."""

    min_interval: float
    max_interval: float
    burst: int = BURST_SYNCS
    now: float = 0.0
    tokens: float = field(init=False)
    last_fill: float = field(init=False)
    last_run: float = field(init=False, default=-math.inf)
    next_at: float = field(init=False)  # the next scheduled attempt (max interval or retry)
    pending: bool = field(init=False, default=False)
    retry_at: float | None = field(init=False, default=None)  # survives the end of the current run

    def __post_init__(self) -> None:
        self.tokens = float(self.burst)
        self.last_fill = self.now
        self.next_at = self.now + self.max_interval

    def _refill(self, now: float) -> None:
        if self.min_interval <= 0:
            self.tokens = float(self.burst)
        else:
            self.tokens = min(float(self.burst), self.tokens + (now - self.last_fill) / self.min_interval)
        self.last_fill = now

    def request(self) -> None:
        """Run as soon as the rate limit allows (upstream's Run(); coalesces)."""
        self.pending = True

    def retry_after(self, now: float, interval: float) -> None:
        """Run no later than `interval` from now (upstream's RetryAfter); asked from inside a
        run, it still holds after that run ends."""
        at = now + interval
        self.retry_at = at if self.retry_at is None else min(self.retry_at, at)
        self.next_at = min(self.next_at, at)

    def due(self, now: float) -> bool:
        return self.pending or now >= self.next_at

    def try_run(self, now: float) -> bool:
        """Take a token if one is free; False (and a retry at the earliest possible time) if not."""
        self._refill(now)
        if self.tokens >= 1.0 - 1e-9:
            self.tokens -= 1.0
            self.pending = False
            if self.retry_at is not None and self.retry_at <= now:
                self.retry_at = None  # this run is the retry
            return True
        # can't run now: try again when the next token arrives
        wait = (1.0 - self.tokens) * self.min_interval
        self.next_at = min(self.next_at, now + wait)
        return False

    def ran(self, now: float) -> None:
        """A run finished at `now`: the max-interval timer restarts."""
        self.last_run = now
        self.next_at = now + self.max_interval
        if self.retry_at is not None:
            self.next_at = min(self.next_at, self.retry_at)
            self.retry_at = None



class BoundedFrequencyRunner:
    """Runs `fn` on a RunSchedule. `run()` asks for a run; `loop()` is the task body."""

    def __init__(
        self,
        fn: Callable[[], Awaitable[None]],
        min_interval: float,
        max_interval: float,
        burst: int = BURST_SYNCS,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.fn = fn
        self.clock = clock
        self.schedule = RunSchedule(min_interval, max_interval, burst, now=clock())
        self._wake = asyncio.Event()
        self.runs = 0

    def run(self) -> None:
        self.schedule.request()
        self._wake.set()

    def retry_after(self, interval: float) -> None:
        self.schedule.retry_after(self.clock(), interval)
        self._wake.set()

    async def loop(self) -> None:
        s = self.schedule
        while True:
            now = self.clock()
            if s.due(now) and s.try_run(now):
                self.runs += 1
                try:
                    await self.fn()
                except Exception:  # a bug in one sync must not stop all future syncs
                    log.exception("sync raised; retrying later")
                s.ran(self.clock())
                continue
            # Not due, or rate limited (try_run moved next_at to the next token). Sleep until
            # then or until run()/retry_after() wakes us; clearing before the await loses nothing.
            self._wake.clear()
            wait = max(0.001, s.next_at - self.clock())
            try:
                await asyncio.wait_for(self._wake.wait(), timeout=wait)
            except TimeoutError:
                pass


class Syncer:
    """One proxy's syncProxyRules: tracker -> mode -> kernel, with the bookkeeping around it."""

    def __init__(
        self,
        tracker: ChangeTracker,
        mode: Mode[Any],
        metrics: ProxyMetrics,
        *,
        min_sync_period: float = DEFAULT_MIN_SYNC_PERIOD,
        sync_period: float = DEFAULT_SYNC_PERIOD,
        full_sync_period: float = FULL_SYNC_PERIOD,
        clock: Callable[[], float] = time.monotonic,
        wall: Callable[[], float] = time.time,
        ready: Callable[[], bool] = lambda: True,
        after_sync: list[Callable[[ProxyState, bool], Awaitable[None] | None]] | None = None,
        in_thread: bool = True,
    ) -> None:
        self.tracker = tracker
        self.mode = mode
        self.metrics = metrics
        self.sync_period = sync_period
        self.full_sync_period = full_sync_period
        self.clock = clock
        self.wall = wall
        self.ready = ready  # informers synced: no sync before that (upstream waits too)
        self.after_sync = after_sync or []
        self.in_thread = in_thread
        self.prior: Any = None
        self.last_full = -math.inf
        self.last_sync_ok: float | None = None  # wall time
        self.syncs = {"full": 0, "partial": 0, "failed": 0}
        self.last_error: str | None = None
        self.last_state: ProxyState | None = None
        self.runner = BoundedFrequencyRunner(self.sync, min_sync_period, full_sync_period, clock=clock)
        self.on_queued: list[Callable[[], None]] = []
        self._reported = (0, 0)  # change totals already added to the counters
        self._drifts = 0  # canary failures seen
        self.on_synced: list[Callable[[], None]] = []
        tracker.on_change = self.queue
        tracker.on_full_sync_needed = self.queue

    def queue(self) -> None:
        """Something changed: ask for a sync (rate limited)."""
        m = self.metrics
        m.last_queued_timestamp.set(self.wall())
        t = self.tracker
        m.service_changes_pending.set(t.service_changes_pending)
        m.endpoint_changes_pending.set(t.endpoint_changes_pending)
        # the *_changes_total counters count every change event, as upstream's trackers do
        if t.service_changes_total > self._reported[0]:
            m.service_changes_total.inc(t.service_changes_total - self._reported[0])
        if t.endpoint_changes_total > self._reported[1]:
            m.endpoint_changes_total.inc(t.endpoint_changes_total - self._reported[1])
        self._reported = (t.service_changes_total, t.endpoint_changes_total)
        for cb in self.on_queued:
            cb()
        if self.ready():  # before the informers synced, a run would only burn a token
            self.runner.run()

    def _render_apply(self, state: ProxyState, prior: Any) -> tuple[Any, dict[str, int]]:
        plan = self.mode.render(state, prior)
        new_prior = self.mode.apply(plan)
        return new_prior, plan.stats

    async def sync(self) -> None:
        if not self.ready():
            return  # the runner is asked again when the informers have synced
        t = self.tracker
        now = self.clock()
        state, token = t.snapshot(full=now - self.last_full >= self.full_sync_period)
        self.metrics.service_changes_pending.set(token.service_changes)
        self.metrics.endpoint_changes_pending.set(token.endpoint_changes)
        prior = self.prior
        drifts = self._drifts
        start = self.clock()
        try:
            if self.in_thread:
                new_prior, stats = await asyncio.to_thread(self._render_apply, state, prior)
            else:
                new_prior, stats = self._render_apply(state, prior)
        except ApplyError as e:
            self.syncs["failed"] += 1
            self.last_error = str(e)
            self.metrics.apply_failed(self.mode.name, partial=not state.full)
            log.error("sync failed (%s sync): %s; next sync is full, retry in %.0fs",
                      "full" if state.full else "partial", e, self.sync_period)
            self.prior = None
            t.failed()
            self.runner.retry_after(self.sync_period)
            return
        elapsed = self.clock() - start
        # a drift noticed while this sync ran makes what it returned untrustworthy as well
        self.prior = new_prior if drifts == self._drifts else None
        t.commit(token)
        if state.full:
            self.last_full = self.clock()
        kind = "full" if state.full else "partial"
        self.syncs[kind] += 1
        self.last_error = None
        self.last_state = state
        m = self.metrics
        m.sync_duration.observe(elapsed)
        (m.sync_full_duration if state.full else m.sync_partial_duration).observe(elapsed)
        wall = self.wall()
        self.last_sync_ok = wall
        m.last_timestamp.set(wall)
        for trig in token.trigger_times.values():
            m.network_programming.observe(max(0.0, wall - trig))
        m.service_changes_pending.set(t.service_changes_pending)
        m.endpoint_changes_pending.set(t.endpoint_changes_pending)
        m.observe_plan(stats, self.mode.name)
        log.info("sync ok kind=%s services=%d changed=%s took=%.3fs",
                 kind, len(state.services), "all" if state.changed is None else len(state.changed), elapsed)
        for cb in self.on_synced:
            cb()
        for hook in self.after_sync:
            r = hook(state, token.conntrack_cleanup)
            if r is not None:
                await r

    async def drift_loop(self) -> None:
        """Every syncPeriod: canary check; drift -> full resync (upstream's ipt.Monitor)."""
        while True:
            await asyncio.sleep(self.sync_period)
            try:
                drift = await asyncio.to_thread(self.mode.check_drift)
            except Exception as e:  # a broken check must not kill the proxy
                log.warning("drift check failed: %s", e)
                continue
            if drift:
                log.warning("kernel state changed behind our back (canary gone); forcing a full resync")
                self.prior = None
                self._drifts += 1
                self.tracker.force_full_sync()
