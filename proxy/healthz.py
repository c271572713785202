"""kube-proxy's health servers (pkg/proxy/healthcheck).

- `ProxyHealth`: /healthz and /livez on :10256. Healthy unless a change has been queued for
  longer than `timeout` (2 x syncPeriod upstream) without a successful sync. Unlike upstream, the
  first sync counts as queued from start-up, so a proxy that never programs anything (apiserver
  unreachable since start) turns unhealthy after the timeout instead of staying healthy. /healthz is also 503
  when the Node is being deleted or tainted ToBeDeletedByClusterAutoscaler (KEP-3836);
  /livez keeps the old semantics. Body: {"lastUpdated", "currentTime", "nodeEligible"}.
- `ServiceHealthServers`: one HTTP listener per healthCheckNodePort (ETP=Local LoadBalancer
  Services), answering with the count of ready local endpoints, 503 when it is 0.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from datetime import UTC, datetime

import orjson
from aiohttp import web

from proxy.metrics import ProxyMetrics

log = logging.getLogger("kpx.proxy.healthz")


def go_time(ts: float | None) -> str:
    """Go's time.Time.String() in UTC, as upstream prints it ("0001-01-01 ..." when unset)."""
    if ts is None:
        return "0001-01-01 00:00:00 +0000 UTC"
    d = datetime.fromtimestamp(ts, UTC)
    frac = f"{d.microsecond:06d}".rstrip("0")
    return d.strftime("%Y-%m-%d %H:%M:%S") + (f".{frac}" if frac else "") + " +0000 UTC"


class ProxyHealth:
    def __init__(
        self,
        timeout: float,
        metrics: ProxyMetrics | None = None,
        clock: Callable[[], float] = time.time,
        node_eligible: Callable[[], bool] = lambda: True,
    ) -> None:
        self.timeout = timeout
        self.metrics = metrics
        self.clock = clock
        self.node_eligible = node_eligible
        self.last_updated: float | None = None
        self.oldest_pending: float | None = None

    def queued_update(self) -> None:
        """A change is waiting for a sync (upstream's QueuedUpdate)."""
        if self.oldest_pending is None:
            self.oldest_pending = self.clock()

    def updated(self) -> None:
        """A sync succeeded (upstream's Updated)."""
        self.last_updated = self.clock()
        self.oldest_pending = None

    def is_healthy(self) -> tuple[bool, float]:
        now = self.clock()
        if self.oldest_pending is None:
            return True, now
        return now - self.oldest_pending < self.timeout, now

    def body(self, now: float, healthy: bool, eligible: bool | None) -> bytes:
        """Upstream's body, byte for byte in layout; when healthy, lastUpdated is reported as now
        (upstream keeps that for compatibility with old releases). /livez has no nodeEligible."""
        last = now if healthy else self.last_updated
        text = f'{{"lastUpdated": "{go_time(last)}","currentTime": "{go_time(now)}"'
        if eligible is not None:
            text += f', "nodeEligible": {"true" if eligible else "false"}'
        return (text + "}").encode()

    async def healthz(self, request: web.Request) -> web.Response:
        healthy, now = self.is_healthy()
        eligible = self.node_eligible()
        code = 200 if healthy and eligible else 503
        if self.metrics is not None:
            self.metrics.healthz_total.labels(str(code)).inc()
        return self._answer(code, self.body(now, code == 200, eligible))

    async def livez(self, request: web.Request) -> web.Response:
        healthy, now = self.is_healthy()
        code = 200 if healthy else 503
        if self.metrics is not None:
            self.metrics.livez_total.labels(str(code)).inc()
        return self._answer(code, self.body(now, healthy, None))

    def _answer(self, code: int, body: bytes) -> web.Response:
        return web.Response(
            status=code,
            body=body,
            content_type="application/json",
            headers={"X-Content-Type-Options": "nosniff"},
        )

    def app(self) -> web.Application:
        a = web.Application()
        a.router.add_get("/healthz", self.healthz)
        a.router.add_get("/livez", self.livez)
        return a


class ServiceHealthServers:
    """healthCheckNodePort listeners, reconciled after each sync with `sync(counts)`."""

    def __init__(self, bind_ips: tuple[str, ...] = ("0.0.0.0",), proxy_healthy: Callable[[], bool] = lambda: True):
        self.bind_ips = bind_ips
        self.proxy_healthy = proxy_healthy
        self.counts: dict[tuple[str, str], int] = {}
        self._servers: dict[int, tuple[tuple[str, str], web.AppRunner]] = {}

    def _handler(self, key: tuple[str, str]) -> Callable[[web.Request], object]:
        async def handle(request: web.Request) -> web.Response:
            n = self.counts.get(key, 0)
            healthy = self.proxy_healthy()
            # upstream's dedented template: tab-indented, no trailing newline
            ns, name = orjson.dumps(key[0]).decode(), orjson.dumps(key[1]).decode()
            body = (
                f'{{\n\t"service": {{\n\t\t"namespace": {ns},\n\t\t"name": {name}\n\t}},\n'
                f'\t"localEndpoints": {n},\n\t"serviceProxyHealthy": {"true" if healthy else "false"}\n}}'
            ).encode()
            return web.Response(
                status=200 if n and healthy else 503,
                body=body,
                content_type="application/json",
                headers={"X-Content-Type-Options": "nosniff", "X-Load-Balancing-Endpoint-Weight": str(n)},
            )

        return handle

    @property
    def ports(self) -> dict[int, tuple[str, str]]:
        return {port: key for port, (key, _) in self._servers.items()}

    async def sync(self, wanted: dict[tuple[str, str], tuple[int, int]]) -> None:
        """`wanted`: Service -> (healthCheckNodePort, ready local endpoints)."""
        self.counts = {key: n for key, (_, n) in wanted.items()}
        by_port = {port: key for key, (port, _) in wanted.items()}
        for port, (key, runner) in list(self._servers.items()):
            if by_port.get(port) != key:
                await runner.cleanup()
                del self._servers[port]
        for port, key in by_port.items():
            if port in self._servers:
                continue
            app = web.Application()
            app.router.add_get("/{tail:.*}", self._handler(key))  # type: ignore[arg-type]
            runner = web.AppRunner(app, access_log=None, shutdown_timeout=0.5)
            await runner.setup()
            try:
                for ip in self.bind_ips:
                    await web.TCPSite(runner, ip, port, reuse_address=True).start()
            except OSError as e:  # upstream logs and carries on; the port may be taken
                log.error("cannot listen on healthCheckNodePort %d for %s/%s: %s", port, *key, e)
                await runner.cleanup()
                continue
            self._servers[port] = (key, runner)

    async def close(self) -> None:
        await self.sync({})
