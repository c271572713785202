"""Proxy core against a real `kpx apiserver` (temp dir, random loopback port), no kernel: how
long a fresh proxy takes from start to its first full sync over N Services + N EndpointSlices
(discovery, paged lists, tracker ingest), and the event-to-render latency of single endpoint
changes after that (watch -> tracker -> BoundedFrequencyRunner -> render), with a recording mode.

    .venv/bin/python -m bench.proxy_informer --services 2000 --changes 20
"""

from __future__ import annotations

import argparse
import asyncio
import shutil
import statistics
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, ClassVar

from kpx.kubeclient import KubeClient, KubeConfig
from proxy.config import ProxyOptions
from proxy.model import ProxyConfig, ProxyState
from proxy.modes.base import Mode, Plan
from proxy.server import ProxyServer


class Recorder(Mode[int]):
    name: ClassVar[str] = "iptables"

    def __init__(self, config: ProxyConfig) -> None:
        super().__init__(config)
        self.renders: list[tuple[float, ProxyState]] = []
        self.event = threading.Event()

    def render(self, state: ProxyState, prior: int | None) -> Plan[int]:
        self.renders.append((time.monotonic(), state))
        self.event.set()
        return Plan(full=state.full, payload=None, prior=len(self.renders))

    def apply(self, plan: Plan[int]) -> int:
        return plan.prior


async def populate(kc: KubeClient, ns: str, n: int) -> None:
    await kc.create("/api/v1/namespaces", {"metadata": {"name": ns}})
    sem = asyncio.Semaphore(16)

    async def one(i: int) -> None:
        async with sem:
            await kc.create(f"/api/v1/namespaces/{ns}/services", {
                "metadata": {"name": f"s{i}"}, "spec": {"ports": [{"name": "p", "port": 80}]}})
            await kc.create(f"/apis/discovery.k8s.io/v1/namespaces/{ns}/endpointslices", slice_(i, 1))

    await asyncio.gather(*(one(i) for i in range(n)))


def slice_(i: int, gen: int) -> dict[str, Any]:
    return {"metadata": {"name": f"s{i}-x", "labels": {"kubernetes.io/service-name": f"s{i}"}},
            "addressType": "IPv4", "ports": [{"name": "p", "port": 8080, "protocol": "TCP"}],
            "endpoints": [{"addresses": [f"10.244.{i // 250 % 256}.{i % 250 + 1}"], "conditions": {"ready": True}}
                          for _ in range(1)] + [{"addresses": [f"10.245.{gen % 256}.{i % 250 + 1}"],
                                                 "conditions": {"ready": True}}]}


def main() -> None:
    from tests.integration.apiserver_fixtures import ApiServerProc

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--services", type=int, default=2000)
    ap.add_argument("--changes", type=int, default=20)
    a = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="kpx-bench-proxy-"))
    srv = ApiServerProc(tmp / "data").start()
    try:
        cfg = KubeConfig.load(srv.kubeconfig)

        async def fill() -> None:
            async with KubeClient(cfg) as kc:
                t0 = time.monotonic()
                await populate(kc, "bench", a.services)
                print(f"populate: {a.services} Services + EndpointSlices in {time.monotonic() - t0:.1f}s")

        asyncio.run(fill())

        async def run() -> None:
            mode = Recorder(ProxyConfig("n1"))
            opts = ProxyOptions(hostname_override="n1", metrics_bind_address="", healthz_bind_address="",
                                min_sync_period=1.0)
            t0 = time.monotonic()
            server = ProxyServer(opts, mode=mode, kubeconfig=cfg, conntrack=False)
            await server.start()
            while not mode.renders:
                await asyncio.sleep(0.01)
            first = mode.renders[0][0] - t0
            print(f"start -> first full sync with {len(mode.renders[0][1].services)} service ports: {first:.2f}s")
            lat = []
            await asyncio.sleep(2.5)  # let the token bucket refill to its burst of 2
            async with KubeClient(cfg) as kc:
                for k in range(a.changes):
                    i = k * 7 % a.services
                    n0 = len(mode.renders)
                    body = slice_(i, k + 2)
                    t1 = time.monotonic()
                    await kc.update(f"/apis/discovery.k8s.io/v1/namespaces/bench/endpointslices/s{i}-x",
                                    {**body, "metadata": {**body["metadata"], "namespace": "bench"}})
                    while len(mode.renders) == n0:
                        await asyncio.sleep(0.002)
                    lat.append(mode.renders[-1][0] - t1)
            await server.stop()
            lat.sort()
            print(f"endpoint change -> render ({a.changes} changes, minSyncPeriod 1s, burst 2): "
                  f"min {lat[0] * 1e3:.0f} ms, p50 {statistics.median(lat) * 1e3:.0f} ms, max {lat[-1] * 1e3:.0f} ms "
                  f"(the first {min(2, a.changes)} ride the burst; later ones wait for the rate limit)")

        asyncio.run(run())
    finally:
        srv.stop()
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
