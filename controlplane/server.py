"""The apiserver process: store + watch cache + registry + REST (aiohttp, HTTPS) + controllers.

Start-up order: credentials -> store -> watch cache -> registry (allocator rebuild) -> bootstrap
objects -> controllers -> listeners. Shutdown reverses it; open watches are ended cleanly first.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson
from aiohttp import web

from controlplane import discovery, errors, openapi
from controlplane.errors import ApiError
from controlplane.handlers import Handlers, json_response, parse_resource_path
from controlplane.registry import Registry, RegistryConfig, WriteOptions

log = logging.getLogger("controlplane.server")

DEFAULT_HOST_LINK = "192.168.56.1"


@dataclass
class ServerConfig:
    data_dir: Path
    storage: str = "sqlite"
    etcd_servers: str = "http://127.0.0.1:2379"
    bind_addresses: tuple[str, ...] = ("127.0.0.1",)
    secure_port: int = 6443
    advertise_address: str = ""
    host_link_address: str = DEFAULT_HOST_LINK
    service_cluster_ip_range: str = "10.96.0.0/12"
    service_node_port_range: str = "30000-32767"
    cluster_cidr: str = "10.244.0.0/16"
    controllers: tuple[str, ...] | None = None  # None = all of H3's controllers
    # history knobs (tests shrink them to force 410s)
    watch_cache_history: int = 1000
    watch_cache_history_seconds: float = 300.0
    compaction_interval: float = 60.0
    compaction_retain_revisions: int = 1000
    compaction_retain_seconds: float = 300.0
    bookmark_interval: float = 60.0
    extra: dict[str, Any] = field(default_factory=dict)

    def ip_sans(self) -> list[str]:
        ips = {"127.0.0.1", self.host_link_address, _first_service_ip(self.service_cluster_ip_range)}
        for a in self.bind_addresses:
            if a not in ("0.0.0.0", "::", ""):
                ips.add(a)
        if self.advertise_address:
            ips.add(self.advertise_address)
        return sorted(i for i in ips if i)

    def advertised(self) -> str:
        if self.advertise_address:
            return self.advertise_address
        for a in self.bind_addresses:
            if a not in ("0.0.0.0", "::", "") and not a.startswith("127."):
                return a
        return self.host_link_address


def _first_service_ip(cidr: str) -> str:
    import ipaddress

    net = ipaddress.ip_network(cidr, strict=False)
    return str(net.network_address + 1)


# ---------------------------------------------------------------- authentication hook


@dataclass(frozen=True)
class UserInfo:
    name: str
    uid: str = ""
    groups: tuple[str, ...] = ()


Authenticator = Callable[[web.Request], Awaitable[UserInfo | None]]


def token_file_authenticator(tokens_csv: Path) -> Authenticator:
    """Static token file users; anything else (other tokens, no token) is anonymous for now.
    When RBAC lands this is where a bad token becomes 401 Unauthorized."""
    users: dict[str, UserInfo] = {}
    if tokens_csv.exists():
        import csv

        with tokens_csv.open() as f:
            for row in csv.reader(f):
                if len(row) >= 3:
                    groups = tuple(g for g in (row[3].split(",") if len(row) > 3 else []) if g)
                    users[row[0]] = UserInfo(row[1], row[2], groups + ("system:authenticated",))

    anonymous = UserInfo("system:anonymous", "", ("system:unauthenticated",))

    async def authenticate(request: web.Request) -> UserInfo | None:
        auth = request.headers.get("Authorization", "")
        if auth.startswith("Bearer "):
            return users.get(auth[7:].strip(), anonymous)
        return anonymous

    return authenticate


# ---------------------------------------------------------------- the app


class APIServer:
    def __init__(self, config: ServerConfig) -> None:
        self.config = config
        self.store: Any = None
        self.cache: Any = None
        self.registry: Registry | None = None
        self.handlers: Handlers | None = None
        self.controllers: Any = None
        self.runner: web.AppRunner | None = None
        self.authenticate: Authenticator | None = None
        self.started = time.monotonic()
        self.ready = False
        self._stopping = False
        self._reconciler: asyncio.Task[None] | None = None

    async def start(self) -> None:
        from controlplane import tls
        from controlplane.store.cache import WatchCache
        from controlplane.store.factory import open_store

        c = self.config
        c.data_dir.mkdir(parents=True, exist_ok=True)
        creds = tls.ensure_credentials(c.data_dir, port=c.secure_port, ip_sans=c.ip_sans())
        self.authenticate = token_file_authenticator(creds.tokens)
        opts: dict[str, Any] = {
            "compact_period": c.compaction_interval,
            "retain_revisions": c.compaction_retain_revisions,
            "retain_seconds": c.compaction_retain_seconds,
        }
        self.store = open_store(
            c.storage, sqlite_path=str(c.data_dir / "apiserver.db"), etcd_endpoints=c.etcd_servers, **opts
        )
        await self.store.start()
        self.cache = WatchCache(
            self.store, prefix="/registry/", history_revisions=c.watch_cache_history,
            history_seconds=c.watch_cache_history_seconds,
        )
        await self.cache.start()
        self.registry = Registry(
            self.store, self.cache,
            RegistryConfig(c.service_cluster_ip_range, c.service_node_port_range, c.bookmark_interval,
                           shared_store=c.storage == "etcd"),
        )
        await self.registry.start()
        await self._bootstrap()
        await self._start_controllers()
        self.handlers = Handlers(self.registry)
        app = web.Application(middlewares=[self._middleware], client_max_size=4 * 1024 * 1024,
                              handler_args={"max_field_size": 16384, "max_line_size": 16384})
        app.router.add_route("*", "/{tail:.*}", self._route)
        self.runner = web.AppRunner(app, access_log=None, handle_signals=False, shutdown_timeout=2.0)
        await self.runner.setup()
        ssl_ctx = tls.server_ssl_context(creds)
        for addr in c.bind_addresses:
            site = web.TCPSite(self.runner, addr, c.secure_port, ssl_context=ssl_ctx, backlog=1024,
                               reuse_address=True)
            await site.start()
        self.ready = True
        log.info("serving on %s port %d (storage=%s)", ",".join(c.bind_addresses), c.secure_port, c.storage)

    async def _bootstrap(self) -> None:
        """kube-apiserver's first-start objects: system namespaces, the `kubernetes` Service and its
        EndpointSlice (then kept pointing at this server by a reconciler)."""
        from controlplane import bootstrap

        assert self.registry is not None
        c = self.config
        service_ip = _first_service_ip(c.service_cluster_ip_range)
        for kind, obj in bootstrap.bootstrap_objects(service_ip, c.advertised(), c.secure_port):
            res = {"Namespace": "namespaces", "Service": "services", "EndpointSlice": "endpointslices"}[kind]
            ns = (obj.get("metadata") or {}).get("namespace")
            try:
                await self.registry.create(res, obj, ns, WriteOptions(field_manager="kube-apiserver"))
            except ApiError as e:
                if e.reason != "AlreadyExists":
                    log.warning("bootstrap %s %s: %s", kind, obj["metadata"].get("name"), e.message)
        self._reconciler = asyncio.get_running_loop().create_task(self._reconcile_endpoints(), name="kpx-bootstrap")

    async def _reconcile_endpoints(self) -> None:
        """Keep default/kubernetes' EndpointSlice at this server's advertise address (every 10 s, as upstream)."""
        from controlplane import bootstrap

        assert self.registry is not None
        c = self.config
        while True:
            try:
                want = bootstrap.kubernetes_endpointslice(c.advertised(), c.secure_port)
                cur = await self.registry.get("endpointslices", "default", "kubernetes")
                if cur is None:
                    await self.registry.create("endpointslices", want, "default",
                                               WriteOptions(field_manager="kube-apiserver"))
                elif bootstrap.endpointslice_differs(cur, want):
                    new = {**cur, **{k: want[k] for k in ("addressType", "endpoints", "ports")}}
                    new["metadata"] = {**cur["metadata"], "labels": {**(cur["metadata"].get("labels") or {}),
                                                                     **want["metadata"]["labels"]}}
                    await self.registry.update("endpointslices", new,
                                               opts=WriteOptions(field_manager="kube-apiserver"))
            except ApiError as e:
                log.info("kubernetes endpointslice reconcile: %s", e.message)
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("kubernetes endpointslice reconcile failed")
            await asyncio.sleep(10)

    async def _start_controllers(self) -> None:
        assert self.registry is not None
        try:
            from controlplane import controllers
        except ModuleNotFoundError as e:
            if e.name != "controlplane.controllers":
                raise
            return
        if self.config.controllers == ():
            return
        cfg: dict[str, Any] = {"cluster_cidrs": self.config.cluster_cidr}
        if self.config.controllers is not None:
            cfg["controllers"] = self.config.controllers
        self.controllers = await controllers.start(self.registry, cfg)

    async def stop(self) -> None:
        if self._stopping:
            return
        self._stopping = True
        self.ready = False
        if self.handlers is not None:
            # end every open watch stream cleanly (terminating chunk), as a watch timeout does
            for w in list(self.handlers.open_watches):
                w.close()
            for _ in range(50):
                if not self.handlers.watches:
                    break
                await asyncio.sleep(0.02)
            for t in list(self.handlers.watches):
                t.cancel()
        if self.runner is not None:
            await self.runner.cleanup()
        if self._reconciler is not None:
            self._reconciler.cancel()
            with contextlib.suppress(BaseException):
                await self._reconciler
        if self.controllers is not None:
            with contextlib.suppress(Exception):
                await self.controllers.stop()
        if self.registry is not None:
            await self.registry.stop()
        if self.cache is not None:
            await self.cache.close()
        if self.store is not None:
            await self.store.close()

    # ---- request plumbing

    @web.middleware
    async def _middleware(self, request: web.Request, handler: Any) -> web.StreamResponse:
        try:
            if self.authenticate is not None:
                request["user"] = await self.authenticate(request)
            return await handler(request)
        except ApiError as e:
            return _status_response(e)
        except web.HTTPException as e:
            return _status_response(ApiError(e.status, e.reason or "Unknown", e.text or e.reason or ""))
        except asyncio.CancelledError:
            raise
        except Exception as e:  # a bug: log it, answer 500, keep serving
            log.exception("internal error serving %s %s", request.method, request.path_qs)
            return _status_response(errors.internal(f"{type(e).__name__}: {e}"))

    async def _route(self, request: web.Request) -> web.StreamResponse:
        path = request.path
        if path.startswith("/api/") or path.startswith("/apis/"):
            t = parse_resource_path(path)
            if t is not None:
                assert self.handlers is not None
                return await self.handlers.dispatch(request, t)
        doc = _discovery_path(path)
        body = doc(self, request) if doc is not None else None
        if body is None:
            raise errors.ApiError(404, "NotFound", "the server could not find the requested resource")
        if request.method not in ("GET", "HEAD"):
            raise errors.method_not_allowed()
        return body


def _status_response(e: ApiError) -> web.Response:
    headers = {"Retry-After": str(e.retry_after)} if e.retry_after else None
    return web.Response(body=orjson.dumps(e.status()), status=e.code, content_type="application/json",
                        headers=headers)


def _health(s: APIServer, r: web.Request) -> web.Response:
    if r.path.startswith("/readyz") and not s.ready:
        return web.Response(status=500, text="[-]ready failed: apiserver not ready\nreadyz check failed\n")
    if r.query.get("verbose") is not None:
        name = r.path.strip("/").split("/")[0]
        return web.Response(text=f"[+]ping ok\n[+]etcd ok\n{name} check passed\n")
    return web.Response(text="ok")


def _openapi_v3(s: APIServer, r: web.Request) -> web.Response | None:
    rest = r.path[len("/openapi/v3"):].strip("/")
    if not rest:
        return web.Response(body=openapi.root_doc(), content_type="application/json")
    doc = openapi.lookup(rest)
    if doc is None:
        return None
    return web.Response(body=doc, content_type="application/json",
                        headers={"Cache-Control": "public, immutable", "Expires": "Thu, 01 Jan 2099 00:00:00 GMT"}
                        if r.query.get("hash") else None)


def _api(s: APIServer, r: web.Request) -> web.Response:
    host = r.host or f"127.0.0.1:{s.config.secure_port}"
    return json_response(discovery.api_versions(host))


def _apis_or_group(s: APIServer, r: web.Request) -> web.Response | None:
    parts = [p for p in r.path.split("/") if p]
    if parts[0] == "api":
        if len(parts) == 1:
            return _api(s, r)
        if len(parts) == 2:
            doc = discovery.resource_list("", parts[1])
            return json_response(doc) if doc else None
        return None
    if len(parts) == 1:
        return json_response(discovery.api_group_list())
    if len(parts) == 2:
        g = discovery.api_group(parts[1])
        return json_response(g) if g else None
    if len(parts) == 3:
        doc = discovery.resource_list(parts[1], parts[2])
        return json_response(doc) if doc else None
    return None


def _discovery_path(path: str) -> Callable[[APIServer, web.Request], web.Response | None] | None:
    p = path.rstrip("/") or "/"
    if p == "/version":
        return lambda s, r: json_response(discovery.version())
    if p in ("/healthz", "/livez", "/readyz") or p.startswith(("/healthz/", "/livez/", "/readyz/")):
        return _health
    if p == "/openapi/v3" or p.startswith("/openapi/v3/"):
        return _openapi_v3
    if p == "/api" or p.startswith("/api/") or p == "/apis" or p.startswith("/apis/"):
        return _apis_or_group
    return None


# ---------------------------------------------------------------- foreground run


async def serve(config: ServerConfig, *, on_ready: Callable[[APIServer], None] | None = None) -> None:
    server = APIServer(config)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    try:
        await server.start()
        if on_ready:
            on_ready(server)
        await stop.wait()
        log.info("shutting down")
    finally:
        await server.stop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(sig)
