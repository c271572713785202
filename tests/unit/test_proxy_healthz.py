"""proxy.healthz semantics (fake clock) and the real HTTP answers on 127.0.0.1 random ports;
proxy.conntrack's stale-flow selection (pure; the netlink path is tested in integration)."""

from __future__ import annotations

import asyncio
import json
import socket

import aiohttp
import pytest

from proxy.conntrack import Flow, stale_flows, udp_frontends
from proxy.healthz import ProxyHealth, ServiceHealthServers, go_time
from proxy.metrics import ProxyMetrics
from proxy.model import Endpoint, ProxyConfig, ProxyState, ServicePort, ServicePortName

pytestmark = pytest.mark.unit


class Clock:
    t = 1_000_000.0

    def __call__(self) -> float:
        return self.t


def test_health_timeout_semantics():
    c = Clock()
    h = ProxyHealth(timeout=60, clock=c)
    assert h.is_healthy()[0]  # nothing pending
    h.queued_update()
    c.t += 59
    assert h.is_healthy()[0]
    h.queued_update()  # the oldest pending change counts
    c.t += 2
    assert not h.is_healthy()[0]
    h.updated()
    assert h.is_healthy()[0] and h.last_updated == c.t


def test_go_time_format():
    assert go_time(0) == "1970-01-01 00:00:00 +0000 UTC"
    assert go_time(1.5) == "1970-01-01 00:00:01.5 +0000 UTC"
    assert go_time(None).startswith("0001-01-01")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_healthz_and_livez_over_http():
    async def main():
        c = Clock()
        m = ProxyMetrics()
        eligible = [True]
        h = ProxyHealth(timeout=60, metrics=m, clock=c, node_eligible=lambda: eligible[0])
        from aiohttp import web

        runner = web.AppRunner(h.app())
        await runner.setup()
        port = free_port()
        await web.TCPSite(runner, "127.0.0.1", port).start()
        out = []
        try:
            async with aiohttp.ClientSession() as s:
                async def get(path):
                    async with s.get(f"http://127.0.0.1:{port}{path}") as r:
                        return r.status, json.loads(await r.text()), r.headers["Content-Type"]

                h.updated()
                out.append(await get("/healthz"))
                eligible[0] = False  # node being deleted: /healthz drains, /livez stays up
                out.append(await get("/healthz"))
                out.append(await get("/livez"))
                c.t += 5
                out.append(await get("/healthz"))  # 503: lastUpdated is the real last sync
                h.queued_update()
                c.t += 120
                out.append(await get("/livez"))
        finally:
            await runner.cleanup()
        return out, m

    out, m = asyncio.run(main())
    (c1, b1, ct), (c2, b2, _), (c3, b3, _), (c5, b5, _), (c4, _, _) = out
    assert (c1, c2, c3, c5, c4) == (200, 503, 200, 503, 503)
    assert ct.startswith("application/json")
    assert set(b1) == {"lastUpdated", "currentTime", "nodeEligible"} and b1["nodeEligible"] is True
    assert b1["lastUpdated"] == b1["currentTime"]  # healthy: upstream reports now
    assert set(b3) == {"lastUpdated", "currentTime"}  # /livez has no nodeEligible
    assert b2["nodeEligible"] is False
    assert b5["lastUpdated"] != b5["currentTime"]
    assert m.registry.get_sample_value("kubeproxy_proxy_healthz_total", {"code": "503"}) == 2
    assert m.registry.get_sample_value("kubeproxy_proxy_livez_total", {"code": "200"}) == 1


def test_health_check_node_port_servers():
    async def main():
        port = free_port()
        hs = ServiceHealthServers(("127.0.0.1",))
        out = []
        try:
            async with aiohttp.ClientSession() as s:
                async def get():
                    async with s.get(f"http://127.0.0.1:{port}/") as r:
                        return r.status, json.loads(await r.text()), r.headers["X-Load-Balancing-Endpoint-Weight"]

                await hs.sync({("ns", "lb"): (port, 2)})
                out.append(await get())
                await hs.sync({("ns", "lb"): (port, 0)})
                out.append(await get())
                await hs.sync({})
                try:
                    await get()
                    out.append("still listening")
                except aiohttp.ClientConnectionError:
                    out.append("closed")
        finally:
            await hs.close()
        return out

    (c1, b1, w1), (c2, b2, w2), closed = asyncio.run(main())
    assert (c1, w1) == (200, "2") and (c2, w2) == (503, "0")
    assert b1 == {"service": {"namespace": "ns", "name": "lb"}, "localEndpoints": 2, "serviceProxyHealthy": True}
    assert b2["localEndpoints"] == 0 and closed == "closed"


# --------------------------------------------------------------------------- conntrack logic


def _state() -> ProxyState:
    dns = ServicePortName("kube-system", "dns", "dns", "UDP")
    empty = ServicePortName("default", "zero", "u", "UDP")
    tcp = ServicePortName("default", "web", "http", "TCP")
    services = {
        dns: ServicePort(dns, "10.96.0.10", 53, "UDP", node_port=30053, external_ips=("192.168.56.50",)),
        empty: ServicePort(empty, "10.96.0.20", 9000, "UDP"),
        tcp: ServicePort(tcp, "10.96.0.30", 80, "TCP"),
    }
    endpoints = {
        dns: (Endpoint("10.244.1.5", 5353), Endpoint("10.244.2.5", 5353, ready=False, serving=False)),
        tcp: (Endpoint("10.244.1.9", 8080),),
    }
    return ProxyState(ProxyConfig("n1"), services, endpoints)


def test_stale_udp_flows():
    front = udp_frontends(_state())
    flows = [
        Flow("10.96.0.10", 53, "10.244.1.5", 5353),  # to a serving endpoint: kept
        Flow("10.96.0.10", 53, "10.244.2.5", 5353),  # to a non-serving endpoint: stale
        Flow("10.96.0.10", 53, "10.96.0.10", 53),  # never DNATed (no endpoints back then): stale
        Flow("192.168.56.50", 53, "10.244.9.9", 5353),  # externalIP to a gone endpoint: stale
        Flow("192.168.56.11", 30053, "10.244.9.9", 5353),  # NodePort to a gone endpoint: stale
        Flow("192.168.56.11", 30053, "10.244.1.5", 5353),  # NodePort, serving: kept
        Flow("10.96.0.20", 9000, "10.244.3.3", 9000),  # service scaled to zero: stale (#139628)
        Flow("10.96.0.30", 80, "10.244.7.7", 8080),  # a TCP service: not the UDP reconciler's
        Flow("8.8.8.8", 53, "8.8.8.8", 53),  # not a service at all
    ]
    stale = stale_flows(front, flows)
    assert stale == [flows[i] for i in (1, 2, 3, 4, 6)]
