"""Wiring of one proxy: kubeconfig -> informers -> tracker -> Syncer(mode) + metrics/healthz.

    server = ProxyServer(opts)           # or ProxyServer(opts, mode=SomeMode(cfg)) in tests
    await server.start()                 # returns at once; syncs start when informers synced
    ...
    await server.stop()                  # kernel state stays as it is (like kube-proxy)

`kpx proxy --cleanup` is `cleanup_all(opts)`.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import importlib
import inspect
import logging
import socket
from collections.abc import Callable
from typing import Any

import orjson
from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST

from kpx.errors import UserError
from kpx.kubeclient import (
    ApiError,
    Backoff,
    Informer,
    KubeClient,
    KubeConfig,
    KubeError,
    ServerUnavailable,
    api_path,
)
from proxy.config import ProxyOptions, parse_bind
from proxy.conntrack import ConntrackReconciler
from proxy.healthz import ProxyHealth, ServiceHealthServers
from proxy.metrics import ProxyMetrics
from proxy.model import ProxyConfig, ProxyState
from proxy.modes import MODES
from proxy.modes.base import Mode, ModeUnavailable
from proxy.sync import Syncer
from proxy.tracker import INFORMER_LABEL_SELECTOR, ChangeTracker, health_check_counts

log = logging.getLogger("kpx.proxy")


# --------------------------------------------------------------------------- modes


def load_mode_class(name: str) -> type[Mode[Any]]:
    """The Mode class of `--proxy-mode name`; UserError if this build or kernel lacks it."""
    modpath = MODES.get(name)
    if modpath is None:
        raise UserError(f"--proxy-mode {name!r}: unknown mode; choose one of {', '.join(MODES)}")
    try:
        mod = importlib.import_module(modpath)
    except ModuleNotFoundError as e:
        if e.name != modpath:
            raise
        raise UserError(f"--proxy-mode {name}: this build has no {name} mode yet ({modpath} is missing); "
                        f"use another mode") from None
    cls = getattr(mod, "MODE", None)
    if cls is None:
        found = [v for v in vars(mod).values()
                 if inspect.isclass(v) and issubclass(v, Mode) and v is not Mode and getattr(v, "name", "") == name]
        if not found:
            raise UserError(f"--proxy-mode {name}: {modpath} defines no Mode; use another mode")
        cls = found[0]
    return cls  # type: ignore[no-any-return]


def _unavailable(name: str, e: Exception) -> UserError:
    msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    if name == "ipvs" and "VM" not in msg:
        msg += " (this kernel lacks IPVS; run the IPVS mode in the VM: make test-vm)"
    return UserError(f"--proxy-mode {name}: {msg}")


def build_mode(name: str, config: ProxyConfig, opts: ProxyOptions, **extra: Any) -> Mode[Any]:
    """Instantiate a mode, passing the options its constructor accepts (backend=, scheduler=...)."""
    cls = load_mode_class(name)
    try:
        cls.check_kernel()
    except ModeUnavailable as e:
        raise _unavailable(name, e) from None
    candidates: dict[str, Any] = {
        "backend": opts.iptables_backend,
        "scheduler": opts.ipvs_scheduler,
        "tcp_be_liberal": True if opts.tcp_be_liberal else None,
        "udp_idle_timeout": opts.udp_idle_timeout,  # userspace mode
        "port_range": opts.proxy_port_range or None,  # userspace mode
        **extra,
    }
    params = inspect.signature(cls.__init__).parameters
    takes_any = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
    kwargs = {k: v for k, v in candidates.items() if (k in params or takes_any) and v is not None}
    try:
        return cls(config, **kwargs)
    except ModeUnavailable as e:
        raise _unavailable(name, e) from None


def _list_addresses() -> list[str]:
    from pyroute2 import IPRoute

    with IPRoute() as ipr:
        return [str(a.get_attr("IFA_ADDRESS")) for a in ipr.get_addr(family=socket.AF_INET)]


def local_ipv4_addresses() -> tuple[str, ...]:
    """This netns's IPv4 addresses other than loopback (the node IPs, for NodePorts).

    pyroute2's sync API runs its own event loop, so it runs in a worker thread: this works
    whether or not the caller is inside a (uv)loop."""
    try:
        with concurrent.futures.ThreadPoolExecutor(1) as ex:
            addrs = ex.submit(_list_addresses).result(timeout=10)
    except Exception as e:  # no netlink (unusual container): fall back to nothing
        log.warning("cannot list local addresses: %s", e)
        return ()
    return tuple(sorted({a for a in addrs if a and not a.startswith("127.")}))


def proxy_config(opts: ProxyOptions, node_name: str, node_ips: tuple[str, ...] | None = None) -> ProxyConfig:
    ips = local_ipv4_addresses() if node_ips is None else node_ips
    if opts.bind_address and opts.bind_address not in ips and opts.bind_address not in ("0.0.0.0", "::"):
        ips = (opts.bind_address, *ips)
    npa = tuple(c for c in opts.nodeport_addresses if c != "primary")
    if "primary" in opts.nodeport_addresses:  # upstream: the node's primary IP(s)
        if opts.bind_address:
            npa += (f"{opts.bind_address}/32",)
        else:
            log.warning("--nodeport-addresses primary needs --bind-address (the node IP) here; "
                        "using all local addresses")
            npa = ()
    return ProxyConfig(
        node_name=node_name,
        node_ips=ips,
        cluster_cidr=opts.cluster_cidr,
        masquerade_all=opts.masquerade_all,
        masquerade_bit=opts.masquerade_bit,
        nodeport_addresses=npa,
        tcp_be_liberal=opts.tcp_be_liberal,
        localhost_nodeports=opts.localhost_nodeports,
    )


def node_name_of(opts: ProxyOptions) -> str:
    return (opts.hostname_override or socket.gethostname()).strip().lower()


def cleanup_all(opts: ProxyOptions) -> list[str]:
    """`--cleanup`: every mode removes what it programmed in this netns. Returns problems."""
    cfg = proxy_config(opts, node_name_of(opts), node_ips=())
    problems = []
    for name in MODES:
        try:
            mode = build_mode(name, cfg, opts)
        except UserError as e:
            log.info("cleanup: skipping %s: %s", name, e)
            continue
        try:
            mode.cleanup()
            log.info("cleanup: %s mode state removed", name)
        except Exception as e:
            problems.append(f"{name}: {e}")
        finally:
            mode.close()
    return problems


# Modes that program the same kernel objects: cleaning one up would tear down the other's
# (iptables and ipvs both own nat KUBE-SERVICES, KUBE-POSTROUTING, KUBE-MARK-MASQ ...).
SHARED_STATE = (frozenset({"iptables", "ipvs"}),)


def cleanup_other_modes(current: str, cfg: ProxyConfig, opts: ProxyOptions) -> list[str]:
    """At start-up, remove what OTHER modes left in this netns (as upstream's CleanupLeftovers),
    so switching a node's proxy between modes leaves no rules of the old mode. Returns the names
    of the modes cleaned up."""
    cleaned = []
    for name in MODES:
        if name == current or any({name, current} <= pair for pair in SHARED_STATE):
            continue
        try:
            mode = build_mode(name, cfg, opts)
        except UserError:
            continue  # not usable on this kernel: it cannot have left anything either
        try:
            mode.cleanup()
            cleaned.append(name)
        except Exception as e:
            log.warning("cleanup of %s leftovers failed: %s", name, e)
        finally:
            mode.close()
    return cleaned


# --------------------------------------------------------------------------- server


def _log_unexpected_exit(task: asyncio.Task[Any]) -> None:
    if not task.cancelled() and task.exception() is not None:
        log.error("%s stopped: %r", task.get_name(), task.exception(), exc_info=task.exception())


class ProxyServer:
    def __init__(
        self,
        opts: ProxyOptions,
        *,
        mode: Mode[Any] | None = None,
        kubeconfig: KubeConfig | None = None,
        node_ips: tuple[str, ...] | None = None,
        backoff: Callable[[], Backoff] = Backoff,
        conntrack: bool = True,
        health_check_bind: tuple[str, ...] = ("0.0.0.0",),
        cleanup_leftovers: bool | None = None,
    ) -> None:
        self.opts = opts
        # only a real proxy (its own mode, its own netns) cleans up after other modes
        self.cleanup_leftovers = mode is None if cleanup_leftovers is None else cleanup_leftovers
        self.node_name = node_name_of(opts)
        self.kubeconfig = kubeconfig or self._load_kubeconfig()  # cheap mistakes first
        self.config = mode.config if mode is not None else proxy_config(opts, self.node_name, node_ips)
        self.mode = mode if mode is not None else build_mode(opts.mode, self.config, opts)
        self.client = KubeClient(self.kubeconfig, user_agent=f"kpx-proxy/{self.node_name}")
        self.metrics = ProxyMetrics()
        self.tracker = ChangeTracker(self.config)
        self.health = ProxyHealth(2 * opts.sync_period, self.metrics, node_eligible=lambda: self.tracker.node.eligible)
        self.hc_servers = ServiceHealthServers(health_check_bind, proxy_healthy=lambda: self.health.is_healthy()[0])
        self.reconciler = ConntrackReconciler(self.metrics) if conntrack else None
        self.syncer = Syncer(
            self.tracker,
            self.mode,
            self.metrics,
            min_sync_period=opts.min_sync_period,
            sync_period=opts.sync_period,
            ready=self._informers_synced,
            after_sync=[self._after_sync],
        )
        self.syncer.on_queued.append(self.health.queued_update)
        self.syncer.on_synced.append(self.health.updated)
        self._backoff = backoff
        self.informers: dict[str, Informer] = {}
        self.endpointslice_version = ""
        self._tasks: list[asyncio.Task[Any]] = []
        self._runners: list[web.AppRunner] = []
        self.metrics_address: tuple[str, int] | None = None
        self.healthz_address: tuple[str, int] | None = None
        self.stopped = asyncio.Event()

    def _load_kubeconfig(self) -> KubeConfig:
        try:
            if self.opts.kubeconfig:
                cfg = KubeConfig.load(self.opts.kubeconfig)
            elif self.opts.master:
                cfg = KubeConfig(server=self.opts.master.rstrip("/"))
            else:
                cfg = KubeConfig.load()
        except KubeError as e:
            raise UserError(f"{e} (pass --kubeconfig PATH or --master URL)") from None
        if self.opts.master:
            cfg.server = self.opts.master.rstrip("/")
        return cfg

    def _informers_synced(self) -> bool:
        return len(self.informers) == 3 and all(i.has_synced for i in self.informers.values())

    async def _after_sync(self, state: ProxyState, conntrack_cleanup: bool) -> None:
        # what was just programmed, not what arrived meanwhile
        await self.hc_servers.sync(health_check_counts(state.services, state.endpoints, self.node_name))
        if conntrack_cleanup and self.reconciler is not None:
            try:
                await asyncio.to_thread(self.reconciler.reconcile, state)
            except Exception as e:
                log.warning("conntrack cleanup failed: %s", e)

    # ------------------------------------------------------------------ http

    async def _serve(self, app: web.Application, bind: tuple[str, int], what: str) -> tuple[str, int]:
        runner = web.AppRunner(app, access_log=None, shutdown_timeout=0.5)
        await runner.setup()
        site = web.TCPSite(runner, bind[0], bind[1], reuse_address=True)
        try:
            await site.start()
        except OSError as e:
            await runner.cleanup()
            raise UserError(f"{what} {bind[0]}:{bind[1]}: {e.strerror or e}; choose another address") from None
        self._runners.append(runner)
        sock = site._server.sockets[0]  # type: ignore[union-attr]
        host, port = sock.getsockname()[:2]
        return str(host), int(port)

    def metrics_app(self) -> web.Application:
        async def metrics(request: web.Request) -> web.Response:
            return web.Response(body=self.metrics.exposition(), headers={"Content-Type": CONTENT_TYPE_LATEST})

        async def proxy_mode(request: web.Request) -> web.Response:
            return web.Response(text=self.mode.name)

        async def configz(request: web.Request) -> web.Response:
            o = self.opts
            body = {"kubeproxy.config.k8s.io": {
                "mode": o.mode, "hostnameOverride": self.node_name, "clusterCIDR": o.cluster_cidr or "",
                "nodePortAddresses": list(o.nodeport_addresses), "metricsBindAddress": o.metrics_bind_address,
                "healthzBindAddress": o.healthz_bind_address,
                "iptables": {"masqueradeAll": o.masquerade_all, "masqueradeBit": o.masquerade_bit,
                             "syncPeriod": f"{o.sync_period:g}s", "minSyncPeriod": f"{o.min_sync_period:g}s",
                             "localhostNodePorts": o.localhost_nodeports},
            }}
            return web.Response(body=orjson.dumps(body), content_type="application/json")

        app = web.Application()
        app.router.add_get("/metrics", metrics)
        app.router.add_get("/proxyMode", proxy_mode)
        app.router.add_get("/configz", configz)
        app.router.add_get("/healthz", self.health.healthz)
        app.router.add_get("/livez", self.health.livez)
        return app

    # ------------------------------------------------------------------ lifecycle

    async def _discover(self) -> str:
        b = self._backoff()
        while True:
            try:
                return await self.client.endpointslice_api_version()
            except ServerUnavailable as e:
                delay = b.next()
                log.warning("apiserver unreachable (%s); retrying in %.1fs", e, delay)
            except ApiError as e:
                delay = b.next()
                log.error("EndpointSlice discovery failed: %s; retrying in %.1fs", e, delay)
            await asyncio.sleep(delay)

    async def _run_informers(self) -> None:
        self.endpointslice_version = await self._discover()
        log.info("using EndpointSlices %s", self.endpointslice_version)
        t = self.tracker
        self.informers = {
            "services": Informer(self.client, api_path("v1", "services"), label_selector=INFORMER_LABEL_SELECTOR,
                                 on_event=t.on_service, backoff=self._backoff(), name="services"),
            "endpointslices": Informer(self.client, api_path(self.endpointslice_version, "endpointslices"),
                                       label_selector=INFORMER_LABEL_SELECTOR, on_event=t.on_endpoint_slice,
                                       backoff=self._backoff(), name="endpointslices"),
            "node": Informer(self.client, api_path("v1", "nodes"), field_selector=f"metadata.name={self.node_name}",
                             on_event=t.on_node, backoff=self._backoff(), name="node"),
        }
        for k, inf in self.informers.items():
            task = asyncio.create_task(inf.run(), name=f"informer-{k}")
            task.add_done_callback(_log_unexpected_exit)
            self._tasks.append(task)
        await asyncio.gather(*(i.synced.wait() for i in self.informers.values()))
        log.info("informers synced: %d services, %d endpoint slices",
                 len(self.informers["services"].store), len(self.informers["endpointslices"].store))
        self.syncer.queue()

    async def start(self) -> None:
        o = self.opts
        mb = parse_bind(o.metrics_bind_address, 10249, "--metrics-bind-address")
        hb = parse_bind(o.healthz_bind_address, 10256, "--healthz-bind-address")
        if hb is not None:
            self.healthz_address = await self._serve(self.health.app(), hb, "--healthz-bind-address")
        if mb is not None:
            self.metrics_address = await self._serve(self.metrics_app(), mb, "--metrics-bind-address")
        self.health.queued_update()  # the first sync is pending from the start
        if self.cleanup_leftovers:
            cleaned = await asyncio.to_thread(cleanup_other_modes, self.mode.name, self.config, o)
            log.info("removed leftovers of other modes: %s", ",".join(cleaned) or "-")
        for coro, name in ((self._run_informers(), "informers"), (self.syncer.runner.loop(), "sync-runner"),
                           (self.syncer.drift_loop(), "drift-check")):
            task = asyncio.create_task(coro, name=name)
            task.add_done_callback(_log_unexpected_exit)
            self._tasks.append(task)
        log.info("proxy started mode=%s node=%s node_ips=%s", self.mode.name, self.node_name,
                 ",".join(self.config.node_ips) or "-")

    async def stop(self) -> None:
        for t in self._tasks:
            t.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._tasks.clear()
        await self.hc_servers.close()
        for r in self._runners:
            await r.cleanup()
        self._runners.clear()
        await self.client.close()
        self.mode.close()
        self.stopped.set()
