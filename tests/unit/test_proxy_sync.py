"""proxy.sync: BoundedFrequencyRunner timing (fake clock) and the Syncer's full/partial/failure
semantics with a recording mode (pure logic; the real-kernel path is in the mode tests)."""

from __future__ import annotations

import asyncio
from typing import Any, ClassVar

import pytest

from proxy.metrics import ProxyMetrics
from proxy.model import ProxyConfig, ProxyState, ServicePortName
from proxy.modes.base import ApplyError, Mode, Plan
from proxy.sync import BoundedFrequencyRunner, RunSchedule, Syncer
from proxy.tracker import ChangeTracker
from tests.unit.test_proxy_tracker import ep, slice_, svc

pytestmark = pytest.mark.unit


def test_burst_of_two_then_one_per_min_interval():
    s = RunSchedule(min_interval=1.0, max_interval=3600, burst=2, now=0.0)
    runs = []
    t = 0.0
    for _ in range(4):  # four requests at t=0
        s.request()
        if s.try_run(t):
            runs.append(t)
            s.ran(t)
    assert runs == [0.0, 0.0]
    assert s.pending and s.next_at == pytest.approx(1.0)  # next token in min_interval
    assert not s.try_run(0.5)
    assert s.try_run(1.0)
    s.ran(1.0)
    s.request()
    assert not s.try_run(1.2) and s.next_at == pytest.approx(2.0)


def test_tokens_refill_up_to_burst_only():
    s = RunSchedule(min_interval=1.0, max_interval=3600, burst=2, now=0.0)
    assert s.try_run(0) and s.try_run(0) and not s.try_run(0)
    # a long quiet period refills only `burst` tokens
    assert s.try_run(100) and s.try_run(100) and not s.try_run(100)


def test_max_interval_makes_a_run_due_without_requests():
    s = RunSchedule(min_interval=1.0, max_interval=30.0, now=0.0)
    assert not s.due(29.9) and s.due(30.0)
    assert s.try_run(30.0)
    s.ran(30.5)
    assert not s.due(60.0) and s.due(60.5)


def test_retry_after_brings_the_next_run_forward():
    s = RunSchedule(min_interval=1.0, max_interval=3600.0, now=0.0)
    s.retry_after(10.0, 30.0)
    assert s.next_at == 40.0 and s.due(40.0)
    s.retry_after(11.0, 5000.0)  # never pushes it later
    assert s.next_at == 40.0


def test_retry_asked_during_a_run_survives_the_run_end():
    s = RunSchedule(min_interval=1.0, max_interval=3600.0, now=0.0)
    assert s.try_run(0.0)
    s.retry_after(0.5, 30.0)  # the sync failed: RetryAfter(syncPeriod)
    s.ran(1.0)
    assert s.next_at == 30.5
    assert s.try_run(30.5)
    s.ran(31.0)
    assert s.next_at == 3631.0  # the retry happened; back to the max interval


def test_zero_min_interval_never_limits():
    s = RunSchedule(min_interval=0.0, max_interval=3600.0, now=0.0)
    assert all(s.try_run(0.0) for _ in range(10))


def test_runner_coalesces_requests_made_during_a_run():
    async def main():
        release = asyncio.Event()
        calls = 0

        async def fn():
            nonlocal calls
            calls += 1
            if calls == 1:
                await release.wait()

        r = BoundedFrequencyRunner(fn, min_interval=0.0, max_interval=3600.0)
        task = asyncio.create_task(r.loop())
        r.run()
        for _ in range(50):
            await asyncio.sleep(0)
        for _ in range(10):  # while the first run is in progress
            r.run()
        release.set()
        for _ in range(50):
            await asyncio.sleep(0)
        task.cancel()
        return calls

    assert asyncio.run(main()) == 2


# --------------------------------------------------------------------------- Syncer


class RecordingMode(Mode[int]):
    """Records every state it is asked to render; fails on demand."""

    name: ClassVar[str] = "iptables"

    def __init__(self, config: ProxyConfig) -> None:
        super().__init__(config)
        self.states: list[tuple[ProxyState, int | None]] = []
        self.fail_next = False
        self.drift = False

    def render(self, state: ProxyState, prior: int | None) -> Plan[int]:
        self.states.append((state, prior))
        return Plan(full=state.full, payload=None, prior=len(self.states),
                    stats={"rules_nat": 10, "rules_nat_written": 3 if not state.full else 10, "rules_filter": 2,
                           "no_local_endpoints_internal": 1})

    def apply(self, plan: Plan[int]) -> int:
        if self.fail_next:
            self.fail_next = False
            raise ApplyError("iptables-restore: line 3 failed")
        return plan.prior

    def check_drift(self) -> bool:
        return self.drift


class Clock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


def make(**kw: Any) -> tuple[ChangeTracker, RecordingMode, Syncer, ProxyMetrics, Clock]:
    clock = Clock()
    cfg = ProxyConfig(node_name="n1")
    tracker = ChangeTracker(cfg)
    mode = RecordingMode(cfg)
    metrics = ProxyMetrics()
    syncer = Syncer(tracker, mode, metrics, clock=clock, wall=lambda: clock.t, in_thread=False, **kw)
    return tracker, mode, syncer, metrics, clock


def metric(m: ProxyMetrics, name: str, labels: dict[str, str] | None = None) -> float | None:
    return m.registry.get_sample_value(name, labels or {})


WEB = ServicePortName("default", "web", "http")


def test_first_full_then_partial_with_changed_set():
    tracker, mode, syncer, m, clock = make()
    tracker.on_service("ADDED", None, svc())
    tracker.on_service("ADDED", None, svc("db"))
    asyncio.run(syncer.sync())
    st, prior = mode.states[-1]
    assert st.full and prior is None and len(st.services) == 2
    tracker.on_endpoint_slice("ADDED", None, slice_("web-1", eps=[ep("10.244.1.2")],
                                                    trigger="1970-01-01T00:16:30Z"))
    assert metric(m, "kubeproxy_sync_proxy_rules_endpoint_changes_pending") == 1  # before the sync
    tracker.on_endpoint_slice("MODIFIED", None, slice_("web-1", eps=[ep("10.244.1.2"), ep("10.244.1.3")]))
    assert metric(m, "kubeproxy_sync_proxy_rules_endpoint_changes_pending") == 1  # still one Service
    clock.t = 1002.0
    asyncio.run(syncer.sync())
    st, prior = mode.states[-1]
    assert not st.full and st.changed == frozenset({WEB}) and prior == 1
    assert syncer.syncs == {"full": 1, "partial": 1, "failed": 0}
    assert metric(m, "kubeproxy_sync_full_proxy_rules_duration_seconds_count") == 1
    assert metric(m, "kubeproxy_sync_partial_proxy_rules_duration_seconds_count") == 1
    assert metric(m, "kubeproxy_sync_proxy_rules_duration_seconds_count") == 2
    assert metric(m, "kubeproxy_sync_proxy_rules_last_timestamp_seconds") == 1002.0
    # trigger time 990 s, programmed at 1002 s: 12 s of network programming latency
    assert metric(m, "kubeproxy_network_programming_duration_seconds_sum") == pytest.approx(12.0)
    assert metric(m, "kubeproxy_sync_proxy_rules_endpoint_changes_total") == 2  # every change event
    assert metric(m, "kubeproxy_sync_proxy_rules_service_changes_total") == 2
    assert metric(m, "kubeproxy_sync_proxy_rules_endpoint_changes_pending") == 0
    assert metric(m, "kubeproxy_sync_proxy_rules_iptables_total", {"table": "nat"}) == 10
    assert metric(m, "kubeproxy_sync_proxy_rules_iptables_last", {"table": "nat"}) == 3
    assert metric(m, "kubeproxy_sync_proxy_rules_no_local_endpoints_total", {"traffic_policy": "internal"}) == 1


def test_apply_error_forces_full_resync_with_no_prior_and_counts_failures():
    tracker, mode, syncer, m, clock = make(sync_period=30.0)
    tracker.on_service("ADDED", None, svc())
    asyncio.run(syncer.sync())
    tracker.on_endpoint_slice("ADDED", None, slice_("web-1", eps=[ep("10.244.1.2")]))
    mode.fail_next = True
    asyncio.run(syncer.sync())
    assert syncer.syncs["failed"] == 1
    assert metric(m, "kubeproxy_sync_proxy_rules_iptables_restore_failures_total") == 1
    assert metric(m, "kubeproxy_sync_proxy_rules_iptables_partial_restore_failures_total") == 1
    assert syncer.runner.schedule.next_at == pytest.approx(clock.t + 30.0)  # RetryAfter(syncPeriod)
    asyncio.run(syncer.sync())
    st, prior = mode.states[-1]
    assert st.full and prior is None and WEB in st.endpoints  # nothing pending was lost


def test_full_sync_period_forces_full():
    tracker, mode, syncer, _, clock = make(full_sync_period=3600.0)
    tracker.on_service("ADDED", None, svc())
    asyncio.run(syncer.sync())
    clock.t += 10
    asyncio.run(syncer.sync())
    assert not mode.states[-1][0].full
    clock.t += 3600
    asyncio.run(syncer.sync())
    assert mode.states[-1][0].full


def test_no_sync_before_informers_synced():
    tracker, mode, syncer, _, _ = make(ready=lambda: False)
    tracker.on_service("ADDED", None, svc())
    asyncio.run(syncer.sync())
    assert mode.states == []


def test_drift_check_forces_full_resync():
    async def main(syncer: Syncer) -> None:
        task = asyncio.create_task(syncer.drift_loop())
        for _ in range(200):
            await asyncio.sleep(0.005)
            if tracker.snapshot()[0].full:
                break
        task.cancel()

    tracker, mode, syncer, _, _ = make(sync_period=0.01)
    tracker.on_service("ADDED", None, svc())
    asyncio.run(syncer.sync())
    assert not tracker.snapshot()[0].full
    mode.drift = True
    asyncio.run(main(syncer))
    assert tracker.snapshot()[0].full and syncer.prior is None


def test_after_sync_hooks_get_state_and_conntrack_hint():
    seen: list[tuple[int, bool]] = []
    tracker, mode, syncer, _, _ = make(after_sync=[lambda st, ct: seen.append((len(st.services), ct))])
    tracker.on_service("ADDED", None, svc(ports=[{"name": "dns", "port": 53, "protocol": "UDP"}]))
    asyncio.run(syncer.sync())
    tracker.on_service("ADDED", None, svc("tcp"))
    asyncio.run(syncer.sync())
    assert seen == [(1, True), (2, False)]
