"""EndpointSlice controller at scale: S Services x P Pods each, on the real in-process stack
(SQLite store, watch cache, registry; no HTTP).

    .venv/bin/python -m bench.endpointslice_bench [--services 10000] [--pods 10] [--db-dir DIR]

Phases, each timed:
  populate  Pods (Ready, with IPs) and Services written straight to the store (setup, not measured
            as controller work)
  initial   controller start -> every Service has its slices and the queue is idle (informer
            lists of all Pods/Services + one slice create per Service through the registry)
  compute   desired state + plan for every Service from the warm caches, no writes (the pure part)
  resync    every Service requeued with nothing changed: must write nothing
  burst     S more Services (a second one over each Pod set) created through the registry while
            the controller runs, until all are reconciled
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import orjson

from controlplane import controllers
from controlplane.controllers.endpointslice import desired_groups, plan_slices
from controlplane.controllers.endpointslice_controller import SLICE_SERVICE_INDEX, EndpointSliceController
from controlplane.registry import Registry, now_rfc3339
from controlplane.resources import by_name
from controlplane.store.cache import WatchCache
from controlplane.store.sqlite import SQLiteStore

NODES = 10


def _pod(ns: str, app: str, i: int, ip: str) -> dict[str, Any]:
    ts = now_rfc3339()
    return {
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": f"{app}-{i}", "namespace": ns, "uid": str(uuid.uuid4()), "creationTimestamp": ts,
                     "labels": {"app": app}},
        "spec": {"nodeName": f"node{i % NODES}", "containers": [{"name": "c", "image": "kpx/echo",
                                                                   "ports": [{"name": "http", "containerPort": 8080}]}]},
        "status": {"phase": "Running", "podIP": ip, "podIPs": [{"ip": ip}],
                   "conditions": [{"type": "Ready", "status": "True", "lastTransitionTime": ts}]},
    }


def _svc(ns: str, name: str, n: int) -> dict[str, Any]:
    return {"apiVersion": "v1", "kind": "Service",
            "metadata": {"name": name, "namespace": ns, "uid": str(uuid.uuid4()), "creationTimestamp": now_rfc3339()},
            "spec": {"selector": {"app": name}, "type": "ClusterIP", "clusterIP": f"10.{96 + n // 65536}.{n // 256 % 256}.{n % 256}",
                     "ports": [{"name": "http", "port": 80, "targetPort": "http", "protocol": "TCP"}]}}


def _ip(n: int) -> str:
    return f"10.{244 + n // 65536}.{n // 256 % 256}.{n % 256}"


async def _put_all(store: SQLiteStore, objs: list[tuple[str, dict[str, Any]]], chunk: int = 1000) -> int:
    rev = 0
    for i in range(0, len(objs), chunk):
        kvs = await asyncio.gather(*(store.create(k, orjson.dumps(o)) for k, o in objs[i:i + chunk]))
        rev = max(rev, max(kv.mod_revision for kv in kvs))
    return rev


async def _until(pred: Any, poll: float = 0.05) -> None:
    while not pred():
        await asyncio.sleep(poll)


async def run(services: int, pods: int, db_dir: Path, synchronous: str = "FULL") -> dict[str, float]:
    out: dict[str, float] = {}
    store = SQLiteStore(str(db_dir / "bench.db"), synchronous=synchronous)
    await store.start()
    cache = WatchCache(store)
    await cache.start()
    reg = Registry(store, cache)
    await reg.start()
    pres, sres, nres = by_name("pods"), by_name("services"), by_name("nodes")
    try:
        await reg.create("namespaces", {"metadata": {"name": "bench"}})
        for n in range(NODES):
            await reg.create("nodes", {"metadata": {"name": f"node{n}", "labels": {
                "topology.kubernetes.io/zone": f"zone-{n % 3}"}}})
        t0 = time.perf_counter()
        objs: list[tuple[str, dict[str, Any]]] = []
        ipn = 0
        for s in range(services):
            app = f"svc{s}"
            for i in range(pods):
                ipn += 1
                objs.append((pres.key("bench", f"{app}-{i}"), _pod("bench", app, i, _ip(ipn))))
        objs += [(sres.key("bench", f"svc{s}"), _svc("bench", f"svc{s}", s)) for s in range(services)]
        rev = await _put_all(store, objs)
        await cache.wait_for_revision(rev, timeout=120)
        out["populate_s"] = time.perf_counter() - t0
        del objs

        t0, c0 = time.perf_counter(), time.process_time()
        cs = await controllers.start(reg, {"controllers": ("endpointslice",)})
        ctl = cs["endpointslice"]
        assert isinstance(ctl, EndpointSliceController)
        await cs.wait_synced()
        out["informer_sync_s"] = time.perf_counter() - t0
        await _until(lambda: len(ctl.slices) >= services and cs.idle())
        out["initial_s"] = time.perf_counter() - t0
        out["initial_cpu_s"] = time.process_time() - c0
        out["initial_writes"] = ctl.writes

        # pure part: desired state + plan from warm caches, no writes
        t0, c0 = time.perf_counter(), time.process_time()
        changes = 0
        for svc in list(ctl.services.items()):
            m = svc["metadata"]
            p = ctl.pods_for(svc)
            plan = plan_slices(svc, desired_groups(svc, p, ctl.zone_of),
                               ctl.slices.by_index(SLICE_SERVICE_INDEX, (m["namespace"], m["name"])), None)
            changes += not plan.empty
        out["compute_s"] = time.perf_counter() - t0
        out["compute_cpu_s"] = time.process_time() - c0
        out["compute_changes"] = changes

        w0, s0 = ctl.writes, ctl.syncs
        t0 = time.perf_counter()
        for k in list(ctl.services.keys()):
            ctl.queue.add(k)
        await _until(lambda: ctl.syncs - s0 >= services and cs.idle(), poll=0.01)
        out["resync_s"] = time.perf_counter() - t0
        out["resync_writes"] = ctl.writes - w0

        t0, c0 = time.perf_counter(), time.process_time()
        for i in range(0, services, 500):
            await asyncio.gather(*(reg.create("services", {"metadata": {"name": f"burst{s}"}, "spec": {
                "selector": {"app": f"svc{s}"}, "ports": [{"name": "http", "port": 80, "targetPort": "http"}]}},
                namespace="bench") for s in range(i, min(services, i + 500))))
        out["burst_creates_s"] = time.perf_counter() - t0
        await _until(lambda: len(ctl.slices) >= 2 * services and cs.idle())
        out["burst_s"] = time.perf_counter() - t0
        out["burst_cpu_s"] = time.process_time() - c0
        await cs.stop()
        _ = nres
    finally:
        await cache.close()
        await store.close()
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    ap.add_argument("--services", type=int, default=10000)
    ap.add_argument("--pods", type=int, default=10, help="pods per service")
    ap.add_argument("--db-dir", type=Path, default=None, help="where the SQLite file goes (default: a temp dir)")
    ap.add_argument("--synchronous", default="FULL", choices=("OFF", "NORMAL", "FULL"),
                    help="SQLite synchronous level (the apiserver uses FULL: one fsync per commit)")
    a = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO if os.environ.get("KPX_BENCH_DEBUG") else logging.WARNING)
    with tempfile.TemporaryDirectory(prefix="kpx-eps-bench-") as tmp:
        r = asyncio.run(run(a.services, a.pods, a.db_dir or Path(tmp), a.synchronous))
    s, p = a.services, a.pods
    print(f"endpointslice bench: {s} services x {p} pods ({s * p} pods), {NODES} nodes, "
          f"sqlite synchronous={a.synchronous}")
    print(f"  populate store (setup)        {r['populate_s']:7.1f} s")
    print(f"  initial reconcile             {r['initial_s']:7.1f} s  ({r['informer_sync_s']:.1f} s informer lists, "
          f"{int(r['initial_writes'])} slice writes, {s / r['initial_s']:.0f} services/s, cpu {r['initial_cpu_s']:.1f} s)")
    print(f"  compute only (no writes)      {r['compute_s']:7.2f} s  ({r['compute_s'] / s * 1e6:.0f} us/service, "
          f"{int(r['compute_changes'])} would change, cpu {r['compute_cpu_s']:.2f} s)")
    print(f"  resync, nothing changed       {r['resync_s']:7.2f} s  ({int(r['resync_writes'])} writes)")
    print(f"  burst: {s} services created  {r['burst_s']:7.1f} s  (creates alone {r['burst_creates_s']:.1f} s, "
          f"cpu {r['burst_cpu_s']:.1f} s)")
    print(f"  (wall times include other processes on this machine: load average {os.getloadavg()[0]:.1f})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
