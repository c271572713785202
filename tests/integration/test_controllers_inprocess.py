"""The controllers against the real in-process apiserver stack (SQLite store, watch cache,
registry with defaulting/validation), no HTTP: EndpointSlices follow Pods, namespaces finalize,
GC, scheduling, pod force-deletion and node IPAM — including across a controller restart."""

from __future__ import annotations

import asyncio
import functools
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any, TypeVar

import pytest

from controlplane import controllers
from controlplane.controllers.endpointslice import SERVICE_NAME_LABEL, TRIGGER_TIME_ANNOTATION
from controlplane.registry import Registry
from controlplane.store.cache import WatchCache
from controlplane.store.sqlite import SQLiteStore

pytestmark = pytest.mark.integration
T = TypeVar("T")


def async_test(fn: Callable[..., Coroutine[Any, Any, None]]) -> Callable[..., None]:
    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> None:
        asyncio.run(asyncio.wait_for(fn(*args, **kwargs), 60))
    return wrapper


@asynccontextmanager
async def apiserver(db: Path) -> AsyncIterator[Registry]:
    store = SQLiteStore(str(db))
    await store.start()
    cache = WatchCache(store)
    await cache.start()
    reg = Registry(store, cache)
    await reg.start()
    try:
        if await reg.get("namespaces", None, "default") is None:
            await reg.create("namespaces", {"metadata": {"name": "default"}})
        yield reg
    finally:
        await cache.close()
        await store.close()


@asynccontextmanager
async def running(reg: Registry, **config: Any) -> AsyncIterator[controllers.ControllerSet]:
    cs = await controllers.start(reg, config or None)
    try:
        await cs.wait_synced()
        yield cs
    finally:
        await cs.stop()


async def eventually(probe: Callable[[], Awaitable[T]], ok: Callable[[T], bool], timeout: float = 10.0) -> T:
    deadline = asyncio.get_running_loop().time() + timeout
    while True:
        v = await probe()
        if ok(v):
            return v
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"condition not reached in {timeout}s; last value: {v!r}")
        await asyncio.sleep(0.05)


def node(name: str, ready: bool = True, zone: str | None = None) -> dict[str, Any]:
    labels = {"kubernetes.io/hostname": name}
    if zone:
        labels["topology.kubernetes.io/zone"] = zone
    return {"metadata": {"name": name, "labels": labels},
            "status": {"conditions": [{"type": "Ready", "status": "True" if ready else "False",
                                       "lastTransitionTime": "2026-01-01T00:00:00Z"}]}}


def pod(name: str, app: str = "web", node_name: str | None = None, ns: str = "default",
        port_name: str = "http") -> dict[str, Any]:
    spec: dict[str, Any] = {"containers": [{"name": "c", "image": "kpx/echo",
                                            "ports": [{"name": port_name, "containerPort": 8080}]}]}
    if node_name:
        spec["nodeName"] = node_name
    return {"metadata": {"name": name, "namespace": ns, "labels": {"app": app}}, "spec": spec}


async def set_ready(reg: Registry, ns: str, name: str, ip: str, ready: bool = True,
                    at: str = "2026-12-01T20:00:00Z") -> None:
    p = await reg.get("pods", ns, name)
    assert p is not None
    p["status"] = {**(p.get("status") or {}), "phase": "Running", "podIP": ip, "podIPs": [{"ip": ip}],
                   "conditions": [{"type": "Ready", "status": "True" if ready else "False",
                                   "lastTransitionTime": at}]}
    await reg.update_status("pods", p)


async def slices_of(reg: Registry, svc: str, ns: str = "default") -> list[dict[str, Any]]:
    items, _ = await reg.list("endpointslices", namespace=ns, label_selector=f"{SERVICE_NAME_LABEL}={svc}")
    return items


def endpoints(slices: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    return {e["targetRef"]["name"]: e for s in slices for e in s.get("endpoints") or ()}


@async_test
async def test_endpointslices_follow_pods(tmp_path: Path) -> None:
    async with apiserver(tmp_path / "db") as reg, running(reg) as cs:
        await reg.create("nodes", node("n1", zone="zone-a"))
        svc = await reg.create("services", {"metadata": {"name": "web", "labels": {"team": "x"}}, "spec": {
            "selector": {"app": "web"}, "ports": [{"name": "http", "port": 80, "targetPort": "http"}]}})
        # no pods yet: one placeholder slice
        sl = await eventually(lambda: slices_of(reg, "web"), lambda s: len(s) == 1)
        assert sl[0]["endpoints"] in (None, []) and sl[0]["metadata"]["labels"]["team"] == "x"
        for i in range(3):
            await reg.create("pods", pod(f"p{i}"))
        # the scheduler binds them, the node agent (here: the test) reports them Ready
        await eventually(lambda: reg.list("pods"), lambda r: all(p["spec"].get("nodeName") == "n1" for p in r[0]))
        for i in range(3):
            await set_ready(reg, "default", f"p{i}", f"10.244.0.{i + 2}", at=f"2026-12-01T20:00:0{i}Z")
        sl = await eventually(lambda: slices_of(reg, "web"),
                              lambda s: len(endpoints(s)) == 3 and all(e["conditions"]["ready"]
                                                                       for e in endpoints(s).values()))
        assert len(sl) == 1  # the placeholder was reused, not replaced
        s = sl[0]
        assert s["metadata"]["ownerReferences"][0]["uid"] == svc["metadata"]["uid"]
        assert s["metadata"]["name"].startswith("web-")
        assert s["ports"] == [{"name": "http", "port": 8080, "protocol": "TCP"}]
        assert TRIGGER_TIME_ANNOTATION in s["metadata"]["annotations"]
        e = endpoints(sl)["p1"]
        assert e["nodeName"] == "n1" and e["zone"] == "zone-a" and e["addresses"] == ["10.244.0.3"]
        # unready pod: ready/serving false
        await set_ready(reg, "default", "p1", "10.244.0.3", ready=False, at="2026-12-01T20:01:00Z")
        sl = await eventually(lambda: slices_of(reg, "web"),
                              lambda s: endpoints(s)["p1"]["conditions"]["ready"] is False)
        assert sl[0]["metadata"]["annotations"][TRIGGER_TIME_ANNOTATION] == "2026-12-01T20:01:00Z"
        # graceful deletion of a bound pod: terminating, serving stays
        await reg.delete("pods", "default", "p0")
        sl = await eventually(lambda: slices_of(reg, "web"), lambda s: endpoints(s)["p0"]["conditions"]["terminating"])
        assert endpoints(sl)["p0"]["conditions"] == {"ready": False, "serving": True, "terminating": True}
        # the node agent confirms: gone from the slice
        await reg.delete("pods", "default", "p0", grace_period_seconds=0)
        await eventually(lambda: slices_of(reg, "web"), lambda s: set(endpoints(s)) == {"p1", "p2"})
        # nothing churns once settled
        await eventually(lambda: asyncio.sleep(0, cs.idle()), bool)
        rv = (await slices_of(reg, "web"))[0]["metadata"]["resourceVersion"]
        cs["endpointslice"].queue.add(("default", "web"))
        await eventually(lambda: asyncio.sleep(0.05, cs.idle()), bool)
        assert (await slices_of(reg, "web"))[0]["metadata"]["resourceVersion"] == rv
        # Service deleted: its slices go
        await reg.delete("services", "default", "web")
        await eventually(lambda: slices_of(reg, "web"), lambda s: s == [])


@async_test
async def test_more_than_100_endpoints_split_and_selectorless_left_alone(tmp_path: Path) -> None:
    async with apiserver(tmp_path / "db") as reg:
        await reg.create("services", {"metadata": {"name": "big"}, "spec": {
            "selector": {"app": "big"}, "ports": [{"port": 80, "targetPort": 8080}]}})
        await reg.create("services", {"metadata": {"name": "manual"}, "spec": {"ports": [{"port": 80}]}})
        await reg.create("endpointslices", {"metadata": {"name": "manual-1", "labels": {
            SERVICE_NAME_LABEL: "manual", "endpointslice.kubernetes.io/managed-by": "someone-else"}},
            "addressType": "IPv4", "endpoints": [{"addresses": ["10.1.2.3"]}], "ports": [{"port": 80}]})
        for i in range(130):
            await reg.create("pods", pod(f"b{i:03d}", app="big", node_name="n1"))
            await set_ready(reg, "default", f"b{i:03d}", f"10.244.{i // 100}.{i % 100 + 2}")
        async with running(reg) as cs:
            sl = await eventually(lambda: slices_of(reg, "big"), lambda s: len(endpoints(s)) == 130)
            assert sorted(len(s["endpoints"]) for s in sl) == [30, 100]
            await eventually(lambda: asyncio.sleep(0, cs.idle()), bool)
            manual = await slices_of(reg, "manual")
            assert [s["metadata"]["name"] for s in manual] == ["manual-1"]


@async_test
async def test_namespace_deletion_empties_and_finalizes(tmp_path: Path) -> None:
    async with apiserver(tmp_path / "db") as reg, running(reg):
        await reg.create("namespaces", {"metadata": {"name": "team"}})
        await reg.create("services", {"metadata": {"name": "s", "namespace": "team"}, "spec": {
            "selector": {"app": "web"}, "ports": [{"port": 80}]}}, namespace="team")
        await reg.create("pods", pod("unbound", ns="team"), namespace="team")
        await eventually(lambda: slices_of(reg, "s", "team"), lambda s: len(s) == 1)
        await reg.delete("namespaces", None, "team")
        gone = await eventually(lambda: reg.get("namespaces", None, "team"), lambda n: n is None)
        assert gone is None
        for r in ("pods", "services", "endpointslices"):
            assert (await reg.list(r, namespace="team"))[0] == []


@async_test
async def test_garbage_collector_deletes_orphans(tmp_path: Path) -> None:
    async with apiserver(tmp_path / "db") as reg, running(reg, controllers=("garbagecollector",)):
        owner = await reg.create("services", {"metadata": {"name": "owner"}, "spec": {"ports": [{"port": 80}]}})
        ref = {"apiVersion": "v1", "kind": "Service", "name": "owner", "uid": owner["metadata"]["uid"]}
        dep = pod("dependent")
        dep["metadata"]["ownerReferences"] = [ref]
        await reg.create("pods", dep)
        keep = pod("two-owners")
        keep["metadata"]["ownerReferences"] = [ref, {"apiVersion": "v1", "kind": "Node", "name": "n9", "uid": "u9"}]
        other = await reg.create("nodes", node("n9"))
        keep["metadata"]["ownerReferences"][1]["uid"] = other["metadata"]["uid"]
        await reg.create("pods", keep)
        stale = pod("stale-owner")
        stale["metadata"]["ownerReferences"] = [{**ref, "uid": "not-the-owner"}]
        await reg.create("pods", stale)
        await eventually(lambda: reg.get("pods", "default", "stale-owner"), lambda p: p is None)
        assert await reg.get("pods", "default", "dependent") is not None
        await reg.delete("services", "default", "owner")
        await eventually(lambda: reg.get("pods", "default", "dependent"), lambda p: p is None)
        await asyncio.sleep(0.3)
        assert await reg.get("pods", "default", "two-owners") is not None  # its Node owner lives


@async_test
async def test_scheduler_spreads_and_reports_unschedulable(tmp_path: Path) -> None:
    async with apiserver(tmp_path / "db") as reg, running(reg, controllers=("scheduler",)):
        await reg.create("pods", pod("waiting"))
        p = await eventually(lambda: reg.get("pods", "default", "waiting"),
                             lambda p: any(c["type"] == "PodScheduled" for c in p["status"].get("conditions") or ()))
        (c,) = [c for c in p["status"]["conditions"] if c["type"] == "PodScheduled"]
        assert (c["status"], c["reason"]) == ("False", "Unschedulable") and c["message"].startswith("0/0 nodes")
        assert p["status"]["phase"] == "Pending" and not p["spec"].get("nodeName")
        await reg.create("nodes", node("n2"))
        await reg.create("nodes", node("n1"))
        await reg.create("nodes", node("sick", ready=False))
        await reg.create("pods", pod("preset", node_name="sick"))
        for i in range(5):
            await reg.create("pods", pod(f"p{i}"))
        pods = await eventually(lambda: reg.list("pods"), lambda r: all(p["spec"].get("nodeName") for p in r[0]))
        where = {p["metadata"]["name"]: p["spec"]["nodeName"] for p in pods[0]}
        assert where.pop("preset") == "sick"  # a preset nodeName is kept
        counts = {n: list(where.values()).count(n) for n in ("n1", "n2", "sick")}
        assert counts == {"n1": 3, "n2": 3, "sick": 0}
        events, _ = await reg.list("events", namespace="default")
        seen = {(e["involvedObject"]["name"], e["reason"]): e for e in events}
        assert seen[("waiting", "FailedScheduling")]["type"] == "Warning"
        ok = seen[("p0", "Scheduled")]
        assert ok["message"] == f"Successfully assigned default/p0 to {where['p0']}"
        assert ok["source"] == {"component": "default-scheduler"}


@async_test
async def test_pods_of_lost_nodes_are_force_deleted(tmp_path: Path) -> None:
    async with apiserver(tmp_path / "db") as reg, running(reg, controllers=("podgc",)):
        await reg.create("nodes", node("n1"))
        await reg.create("nodes", node("down", ready=False))
        await reg.create("pods", pod("on-n1", node_name="n1"))
        await reg.create("pods", pod("on-down", node_name="down"))
        await reg.create("pods", pod("graceful", node_name="n1"))
        await reg.delete("pods", "default", "on-down", grace_period_seconds=1)
        await reg.delete("pods", "default", "graceful", grace_period_seconds=1)
        # NotReady node (for longer than the grace): force-deleted after its deadline
        await eventually(lambda: reg.get("pods", "default", "on-down"), lambda p: p is None, timeout=5)
        # Ready node: the node agent's job, the pod stays terminating
        p = await reg.get("pods", "default", "graceful")
        assert p is not None and p["metadata"].get("deletionTimestamp")
        # Node object deleted: its pods go
        await reg.delete("nodes", None, "n1")
        await eventually(lambda: reg.get("pods", "default", "on-n1"), lambda p: p is None)
        await eventually(lambda: reg.get("pods", "default", "graceful"), lambda p: p is None)


@async_test
async def test_node_ipam_stable_across_restart_and_released_on_delete(tmp_path: Path) -> None:
    async def cidr(name: str) -> str | None:
        n = await reg.get("nodes", None, name)
        return None if n is None else (n.get("spec") or {}).get("podCIDR")

    async with apiserver(tmp_path / "db") as reg:
        cfg = {"controllers": ("nodeipam",), "cluster_cidrs": ("10.244.0.0/23",)}
        async with running(reg, **cfg):
            await reg.create("nodes", node("n1"))
            await eventually(lambda: cidr("n1"), lambda c: c is not None)
            await reg.create("nodes", node("n2"))
            await eventually(lambda: cidr("n2"), lambda c: c is not None)
            first = {"n1": await cidr("n1"), "n2": await cidr("n2")}
            assert sorted(first.values()) == ["10.244.0.0/24", "10.244.1.0/24"]
            n = await reg.get("nodes", None, "n1")
            assert n is not None and n["spec"]["podCIDRs"] == [first["n1"]]
        async with running(reg, **cfg):  # restart: rebuilt from the Nodes, nothing handed out twice
            await reg.create("nodes", node("n3"))
            events = await eventually(lambda: reg.list("events", namespace="default"),
                                      lambda r: any(e["reason"] == "CIDRNotAvailable" for e in r[0]))
            (ev,) = [e for e in events[0] if e["reason"] == "CIDRNotAvailable"]
            assert ev["involvedObject"]["kind"] == "Node" and ev["involvedObject"]["name"] == "n3"
            assert await cidr("n3") is None  # range full
            assert {"n1": await cidr("n1"), "n2": await cidr("n2")} == first
            await reg.delete("nodes", None, "n1")
            assert await eventually(lambda: cidr("n3"), lambda c: c is not None) == first["n1"]


@async_test
async def test_node_without_fresh_status_turns_unknown(tmp_path: Path) -> None:
    async with apiserver(tmp_path / "db") as reg, running(reg, controllers=("nodelifecycle", "scheduler"),
                                                          node_monitor_grace_period=1.0):
        stale = node("stale")
        stale["status"]["conditions"][0]["lastHeartbeatTime"] = "2026-01-01T00:00:00Z"
        await reg.create("nodes", stale)
        await reg.create("nodes", node("static"))  # never posts heartbeats: left alone
        n = await eventually(lambda: reg.get("nodes", None, "stale"),
                             lambda n: n["status"]["conditions"][0]["status"] == "Unknown")
        assert n["status"]["conditions"][0]["reason"] == "NodeStatusUnknown"
        # the scheduler no longer picks it
        await reg.create("pods", pod("p"))
        p = await eventually(lambda: reg.get("pods", "default", "p"), lambda p: p["spec"].get("nodeName"))
        assert p["spec"]["nodeName"] == "static"
        s = await reg.get("nodes", None, "static")
        assert s is not None and s["status"]["conditions"][0]["status"] == "True"


@async_test
async def test_restart_adopts_existing_slices_without_writing(tmp_path: Path) -> None:
    async with apiserver(tmp_path / "db") as reg:
        await reg.create("services", {"metadata": {"name": "web"}, "spec": {
            "selector": {"app": "web"}, "ports": [{"name": "http", "port": 80, "targetPort": "http"}]}})
        for i in range(120):
            await reg.create("pods", pod(f"p{i:03d}", node_name="n1"))
            await set_ready(reg, "default", f"p{i:03d}", f"10.244.{i // 100}.{i % 100 + 2}")
        async with running(reg, controllers=("endpointslice",)) as cs:
            await eventually(lambda: slices_of(reg, "web"), lambda s: len(endpoints(s)) == 120)
            await eventually(lambda: asyncio.sleep(0, cs.idle()), bool)
            before = {s["metadata"]["name"]: s["metadata"]["resourceVersion"] for s in await slices_of(reg, "web")}
        async with running(reg, controllers=("endpointslice",)) as cs:
            ctl = cs["endpointslice"]
            await eventually(lambda: asyncio.sleep(0, ctl.syncs >= 1 and cs.idle()), bool)
            after = {s["metadata"]["name"]: s["metadata"]["resourceVersion"] for s in await slices_of(reg, "web")}
            assert after == before and ctl.writes == 0  # adopted, nothing rewritten
            # a change after the restart still updates in place
            await reg.delete("pods", "default", "p000", grace_period_seconds=0)
            sl = await eventually(lambda: slices_of(reg, "web"), lambda s: len(endpoints(s)) == 119)
            assert {s["metadata"]["name"] for s in sl} == set(before) and ctl.writes == 1


@async_test
async def test_prefer_close_gives_zone_hints(tmp_path: Path) -> None:
    async with apiserver(tmp_path / "db") as reg:
        await reg.create("nodes", node("n1", zone="zone-a"))
        await reg.create("services", {"metadata": {"name": "near"}, "spec": {
            "selector": {"app": "web"}, "trafficDistribution": "PreferClose", "ports": [{"port": 80}]}})
        await reg.create("pods", pod("p", node_name="n1"))
        await set_ready(reg, "default", "p", "10.244.0.9")
        async with running(reg, controllers=("endpointslice",)):
            sl = await eventually(lambda: slices_of(reg, "near"), lambda s: len(endpoints(s)) == 1)
            assert endpoints(sl)["p"]["hints"] == {"forZones": [{"name": "zone-a"}]}


@async_test
async def test_foreground_and_orphan_propagation(tmp_path: Path) -> None:
    async with apiserver(tmp_path / "db") as reg, running(reg, controllers=("garbagecollector", "endpointslice")):
        for policy in ("Foreground", "Orphan"):
            owner = await reg.create("services", {"metadata": {"name": f"o-{policy.lower()}"},
                                                  "spec": {"selector": {"none": "x"}, "ports": [{"port": 80}]}})
            await eventually(lambda o=owner: slices_of(reg, o["metadata"]["name"]), lambda s: len(s) == 1)
            ref = {"apiVersion": "v1", "kind": "Service", "name": owner["metadata"]["name"],
                   "uid": owner["metadata"]["uid"], "blockOwnerDeletion": True}
            for i in range(2):
                d = pod(f"{policy.lower()}-{i}")
                d["metadata"]["ownerReferences"] = [ref]
                await reg.create("pods", d)
            obj, gone_now = await reg.delete("services", "default", owner["metadata"]["name"],
                                             propagation_policy=policy)
            assert not gone_now and obj["metadata"]["deletionTimestamp"]  # held by the GC finalizer
            await eventually(lambda o=owner: reg.get("services", "default", o["metadata"]["name"]), lambda s: s is None)
            left = {p["metadata"]["name"]: p for p in (await reg.list("pods"))[0]}
            if policy == "Foreground":
                assert not any(n.startswith("foreground-") for n in left)
                await eventually(lambda: slices_of(reg, "o-foreground"), lambda s: s == [])
            else:
                assert {"orphan-0", "orphan-1"} <= set(left)
                assert all(not left[n]["metadata"].get("ownerReferences") for n in ("orphan-0", "orphan-1"))
                await asyncio.sleep(0.3)
                (kept,) = await slices_of(reg, "o-orphan")  # orphaned, not deleted
                assert not kept["metadata"].get("ownerReferences")


@async_test
async def test_topology_mode_auto_balances_zone_hints(tmp_path: Path) -> None:
    async with apiserver(tmp_path / "db") as reg, running(reg, controllers=("endpointslice",)):
        for name, zone in (("n1", "zone-a"), ("n2", "zone-b")):
            n = node(name, zone=zone)
            n["status"]["allocatable"] = {"cpu": "2"}
            await reg.create("nodes", n)
        await reg.create("services", {"metadata": {"name": "topo", "annotations": {
            "service.kubernetes.io/topology-mode": "Auto"}}, "spec": {"selector": {"app": "web"}, "ports": [{"port": 80}]}})
        for i, n in enumerate(("n1", "n1", "n1", "n2")):
            await reg.create("pods", pod(f"t{i}", node_name=n))
            await set_ready(reg, "default", f"t{i}", f"10.244.{i}.9")

        def zones(s: list[dict[str, Any]]) -> list[str]:
            return sorted(z["name"] for e in endpoints(s).values() for z in (e.get("hints") or {}).get("forZones") or ())

        await eventually(lambda: slices_of(reg, "topo"), lambda s: zones(s) == ["zone-a", "zone-a", "zone-b", "zone-b"])
        # zone-b's node gets much more CPU: three of four endpoints now serve zone b
        n2 = await reg.get("nodes", None, "n2")
        assert n2 is not None
        n2["status"]["allocatable"] = {"cpu": "6"}
        await reg.update_status("nodes", n2)
        await eventually(lambda: slices_of(reg, "topo"), lambda s: zones(s) == ["zone-a", "zone-b", "zone-b", "zone-b"])
        events, _ = await reg.list("events", namespace="default")
        reasons = [(e["reason"], e["message"]) for e in events if e["involvedObject"]["name"] == "topo"]
        assert ("TopologyAwareHintsEnabled", "Topology Aware Hints has been enabled, addressType: IPv4") in reasons
        # before enough pods were ready: disabled, saying why (once per reason, whatever the counts)
        disabled = [m.split(" (")[0] for r, m in reasons if r == "TopologyAwareHintsDisabled"]
        assert disabled and disabled[0] == "Insufficient number of endpoints" and len(set(disabled)) == len(disabled)
