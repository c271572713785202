"""A small async Kubernetes client: kubeconfig, REST verbs, watch streams and an Informer.

Shared by the proxy and the node agent. It speaks the plain Kubernetes REST API (JSON), so it
works against kpx's apiserver and a real kube-apiserver alike.

    cfg = KubeConfig.load("/var/lib/kpx/lab/kubeconfig")
    async with KubeClient(cfg) as kc:
        svc = await kc.get("/api/v1/namespaces/default/services/kubernetes")
        inf = Informer(kc, "/api/v1/services", on_event=handler)   # handler(type, old, new)
        task = asyncio.create_task(inf.run()); await inf.wait_synced()

Errors: a non-2xx answer (or a watch ERROR event) raises `ApiError` carrying the Status's
code/reason/message; a server that cannot be reached raises `ServerUnavailable`.
"""

from __future__ import annotations

import asyncio
import base64
import builtins
import contextlib
import inspect
import logging
import os
import random
import ssl
import tempfile
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import aiohttp
import orjson
import yaml

log = logging.getLogger("kpx.kubeclient")

JSON = dict[str, Any]

PATCH_TYPES = {
    "merge": "application/merge-patch+json",
    "strategic": "application/strategic-merge-patch+json",
    "json": "application/json-patch+json",
    "apply": "application/apply-patch+yaml",
}


class KubeError(Exception):
    """Base of everything this client raises on purpose."""


class ServerUnavailable(KubeError):
    """The apiserver could not be reached (connection refused/reset, TLS failure, timeout)."""


class ApiError(KubeError):
    """A Kubernetes Status answer: HTTP code, reason (NotFound, Conflict, Expired...), message."""

    def __init__(self, code: int, reason: str, message: str, status: JSON | None = None) -> None:
        super().__init__(f"{code} {reason}: {message}")
        self.code = code
        self.reason = reason
        self.message = message
        self.status = status or {}

    @property
    def expired(self) -> bool:
        """410 Expired/Gone: the resourceVersion is too old; relist."""
        return self.code == 410 or self.reason in ("Expired", "Gone")

    @classmethod
    def from_status(cls, status: Mapping[str, Any], http_code: int = 0) -> ApiError:
        return cls(
            int(status.get("code") or http_code or 500),
            str(status.get("reason") or "Unknown"),
            str(status.get("message") or ""),
            dict(status),
        )


# --------------------------------------------------------------------------- kubeconfig


@dataclass(slots=True)
class KubeConfig:
    """The parts of a kubeconfig context this client uses."""

    server: str
    ca_file: str | None = None
    ca_data: str | None = None  # PEM text
    token: str | None = None
    client_cert_file: str | None = None
    client_key_file: str | None = None
    client_cert_data: str | None = None  # PEM text
    client_key_data: str | None = None
    insecure_skip_tls_verify: bool = False
    namespace: str = "default"
    username: str | None = None  # basic auth (rare; kept for completeness)
    password: str | None = None

    @classmethod
    def load(cls, path: str | os.PathLike[str] | None = None, context: str | None = None) -> KubeConfig:
        """Read a kubeconfig file: `path`, else $KUBECONFIG (first entry), else ~/.kube/config.

        Raises KubeError with a one-line message if the file or its context is missing/invalid.
        """
        if path is None:
            env = os.environ.get("KUBECONFIG", "")
            path = env.split(os.pathsep)[0] if env else Path.home() / ".kube" / "config"
        p = Path(path)
        try:
            doc = yaml.safe_load(p.read_text())
        except OSError as e:
            raise KubeError(f"cannot read kubeconfig {p}: {e.strerror or e}") from e
        except yaml.YAMLError as e:
            raise KubeError(f"kubeconfig {p} is not valid YAML: {str(e).splitlines()[0]}") from e
        if not isinstance(doc, dict):
            raise KubeError(f"kubeconfig {p} is not a kubeconfig (expected a mapping)")
        return cls.from_dict(doc, context=context, base_dir=p.parent)

    @classmethod
    def from_dict(cls, doc: Mapping[str, Any], context: str | None = None, base_dir: Path | None = None) -> KubeConfig:
        def named(section: str, name: str | None) -> JSON:
            for item in doc.get(section) or []:
                if item.get("name") == name:
                    return dict(item.get(section[:-1]) or {})
            raise KubeError(f"kubeconfig has no {section[:-1]} named {name!r}")

        ctx_name = context or doc.get("current-context")
        if not ctx_name:
            ctxs = doc.get("contexts") or []
            if len(ctxs) != 1:
                raise KubeError("kubeconfig has no current-context; pass a context name")
            ctx_name = ctxs[0].get("name")
        ctx = named("contexts", ctx_name)
        cluster = named("clusters", ctx.get("cluster"))
        user = named("users", ctx.get("user")) if ctx.get("user") else {}
        base = base_dir or Path.cwd()

        def file_(v: Any) -> str | None:
            if not v:
                return None
            fp = Path(str(v)).expanduser()
            return str(fp if fp.is_absolute() else base / fp)

        def data(v: Any) -> str | None:
            return base64.b64decode(v).decode() if v else None

        server = cluster.get("server")
        if not server:
            raise KubeError(f"kubeconfig cluster {ctx.get('cluster')!r} has no server")
        token = user.get("token")
        if not token and user.get("tokenFile"):
            try:
                token = Path(file_(user["tokenFile"]) or "").read_text().strip()
            except OSError as e:
                raise KubeError(f"cannot read tokenFile {user['tokenFile']}: {e.strerror}") from e
        return cls(
            server=str(server).rstrip("/"),
            ca_file=file_(cluster.get("certificate-authority")),
            ca_data=data(cluster.get("certificate-authority-data")),
            token=token,
            client_cert_file=file_(user.get("client-certificate")),
            client_key_file=file_(user.get("client-key")),
            client_cert_data=data(user.get("client-certificate-data")),
            client_key_data=data(user.get("client-key-data")),
            insecure_skip_tls_verify=bool(cluster.get("insecure-skip-tls-verify")),
            namespace=str(ctx.get("namespace") or "default"),
            username=user.get("username"),
            password=user.get("password"),
        )

    def ssl_context(self) -> ssl.SSLContext | bool:
        """The TLS context for an https server; True (aiohttp default) for plain http."""
        if not self.server.startswith("https://"):
            return True
        ctx = ssl.create_default_context(cafile=self.ca_file, cadata=self.ca_data)
        if self.insecure_skip_tls_verify:
            ctx.check_hostname = False
            ctx.verify_mode = ssl.CERT_NONE
        if self.client_cert_file or self.client_cert_data:
            with contextlib.ExitStack() as stack:
                cert, key = self.client_cert_file, self.client_key_file
                if self.client_cert_data:  # load_cert_chain takes files only
                    f = stack.enter_context(tempfile.NamedTemporaryFile("w", suffix=".pem"))
                    f.write(self.client_cert_data)
                    f.flush()
                    cert = f.name
                if self.client_key_data:
                    f = stack.enter_context(tempfile.NamedTemporaryFile("w", suffix=".pem"))
                    f.write(self.client_key_data)
                    f.flush()
                    key = f.name
                assert cert is not None
                try:
                    ctx.load_cert_chain(cert, key)
                except (OSError, ssl.SSLError) as e:
                    raise KubeError(f"cannot load client certificate/key: {e}") from e
        return ctx


# --------------------------------------------------------------------------- paths


def api_path(
    api_version: str,
    resource: str,
    namespace: str | None = None,
    name: str | None = None,
    subresource: str | None = None,
) -> str:
    """`v1`,`services`,`ns`,`x` -> /api/v1/namespaces/ns/services/x; groups go under /apis."""
    p = "/api/v1" if api_version == "v1" else f"/apis/{api_version}"
    if namespace:
        p += f"/namespaces/{namespace}"
    p += f"/{resource}"
    if name:
        p += f"/{name}"
        if subresource:
            p += f"/{subresource}"
    return p


def object_key(obj: Mapping[str, Any]) -> str:
    """`namespace/name` (or `name` for cluster-scoped objects), like client-go's MetaNamespaceKeyFunc."""
    md = obj.get("metadata") or {}
    ns = md.get("namespace")
    return f"{ns}/{md.get('name')}" if ns else str(md.get("name"))


class WatchEvent(NamedTuple):
    type: str  # ADDED | MODIFIED | DELETED | BOOKMARK
    object: JSON


# --------------------------------------------------------------------------- client


class KubeClient:
    """Async REST client over aiohttp. Use as `async with KubeClient(cfg) as kc:`."""

    def __init__(
        self,
        config: KubeConfig,
        *,
        user_agent: str = "kpx",
        request_timeout: float = 30.0,
        connect_timeout: float = 5.0,
    ) -> None:
        self.config = config
        self.user_agent = user_agent
        self.request_timeout = request_timeout
        self.connect_timeout = connect_timeout
        self._session: aiohttp.ClientSession | None = None

    async def __aenter__(self) -> KubeClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    def _headers(self) -> dict[str, str]:
        h = {"Accept": "application/json", "User-Agent": self.user_agent}
        if self.config.token:
            h["Authorization"] = f"Bearer {self.config.token}"
        elif self.config.username is not None:
            cred = base64.b64encode(f"{self.config.username}:{self.config.password or ''}".encode()).decode()
            h["Authorization"] = f"Basic {cred}"
        return h

    @property
    def session(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            connector = aiohttp.TCPConnector(ssl=self.config.ssl_context(), limit=32)
            self._session = aiohttp.ClientSession(
                base_url=None,
                connector=connector,
                headers=self._headers(),
                json_serialize=lambda o: orjson.dumps(o).decode(),
            )
        return self._session

    def _url(self, path: str) -> str:
        return self.config.server + (path if path.startswith("/") else "/" + path)

    @staticmethod
    def _params(params: Mapping[str, Any] | None) -> dict[str, str]:
        out: dict[str, str] = {}
        for k, v in (params or {}).items():
            if v is None:
                continue
            out[k] = ("true" if v else "false") if isinstance(v, bool) else str(v)
        return out

    async def request(
        self,
        method: str,
        path: str,
        *,
        params: Mapping[str, Any] | None = None,
        body: Any = None,
        content_type: str = "application/json",
    ) -> JSON:
        """One request; returns the decoded JSON body. Raises ApiError / ServerUnavailable."""
        data: bytes | None = None
        headers: dict[str, str] = {}
        if body is not None:
            if isinstance(body, bytes | str):
                data = body.encode() if isinstance(body, str) else body
            else:
                data = orjson.dumps(body)
            headers["Content-Type"] = content_type
        timeout = aiohttp.ClientTimeout(total=self.request_timeout, sock_connect=self.connect_timeout)
        try:
            async with self.session.request(
                method, self._url(path), params=self._params(params), data=data, headers=headers, timeout=timeout
            ) as resp:
                raw = await resp.read()
                if resp.status >= 400:
                    raise _error_from_response(resp.status, resp.reason or "", raw)
                return orjson.loads(raw) if raw else {}
        except (aiohttp.ClientConnectionError, aiohttp.ClientPayloadError, TimeoutError, OSError) as e:
            raise ServerUnavailable(f"{self.config.server}: {_describe(e)}") from e

    async def get(self, path: str, **params: Any) -> JSON:
        return await self.request("GET", path, params=params)

    async def list(
        self,
        path: str,
        *,
        label_selector: str | None = None,
        field_selector: str | None = None,
        resource_version: str | None = None,
        limit: int | None = None,
        continue_: str | None = None,
    ) -> JSON:
        return await self.request(
            "GET",
            path,
            params={
                "labelSelector": label_selector,
                "fieldSelector": field_selector,
                "resourceVersion": resource_version,
                "limit": limit,
                "continue": continue_,
            },
        )

    async def list_all(
        self,
        path: str,
        *,
        label_selector: str | None = None,
        field_selector: str | None = None,
        page_size: int = 500,
    ) -> tuple[builtins.list[JSON], str]:
        """All items (following `continue`), and the list's resourceVersion."""
        items: builtins.list[JSON] = []
        cont: str | None = None
        rv = ""
        while True:
            page = await self.list(
                path, label_selector=label_selector, field_selector=field_selector, limit=page_size, continue_=cont
            )
            items.extend(page.get("items") or [])
            md = page.get("metadata") or {}
            rv = str(md.get("resourceVersion") or rv)
            cont = md.get("continue") or None
            if not cont:
                return items, rv

    async def create(self, path: str, body: JSON, **params: Any) -> JSON:
        return await self.request("POST", path, params=params, body=body)

    async def update(self, path: str, body: JSON, **params: Any) -> JSON:
        return await self.request("PUT", path, params=params, body=body)

    async def patch(self, path: str, body: Any, patch_type: str = "merge", **params: Any) -> JSON:
        try:
            ct = PATCH_TYPES[patch_type]
        except KeyError:
            raise ValueError(f"patch_type must be one of {sorted(PATCH_TYPES)}") from None
        return await self.request("PATCH", path, params=params, body=body, content_type=ct)

    async def delete(self, path: str, body: JSON | None = None, **params: Any) -> JSON:
        return await self.request("DELETE", path, params=params, body=body)

    async def watch(
        self,
        path: str,
        *,
        resource_version: str | None = None,
        label_selector: str | None = None,
        field_selector: str | None = None,
        allow_bookmarks: bool = True,
        timeout_seconds: int | None = None,
    ) -> AsyncIterator[WatchEvent]:
        """Yield decoded watch events until the server ends the stream.

        An ERROR event raises ApiError (code 410 -> `.expired`); a dropped connection raises
        ServerUnavailable. The caller re-watches from the last resourceVersion it saw.
        """
        params = self._params(
            {
                "watch": "1",
                "resourceVersion": resource_version,
                "labelSelector": label_selector,
                "fieldSelector": field_selector,
                "allowWatchBookmarks": allow_bookmarks or None,
                "timeoutSeconds": timeout_seconds,
            }
        )
        # No total timeout on a stream; a read deadline a little past the server's own timeout
        # catches a server that went silent without closing the connection.
        read = (timeout_seconds + 30) if timeout_seconds else None
        timeout = aiohttp.ClientTimeout(total=None, sock_connect=self.connect_timeout, sock_read=read)
        try:
            async with self.session.get(self._url(path), params=params, timeout=timeout) as resp:
                if resp.status >= 400:
                    raise _error_from_response(resp.status, resp.reason or "", await resp.read())
                buf = bytearray()
                async for chunk in resp.content.iter_any():
                    scan = len(buf)  # a newline can only be in the new bytes
                    buf += chunk
                    start = 0
                    while (nl := buf.find(b"\n", scan)) >= 0:
                        line = bytes(buf[start:nl])
                        start = scan = nl + 1
                        if line.strip():
                            yield _decode_event(line)
                    if start:
                        del buf[:start]
                if buf.strip():
                    yield _decode_event(bytes(buf))
        except (aiohttp.ClientConnectionError, aiohttp.ClientPayloadError, TimeoutError, OSError) as e:
            raise ServerUnavailable(f"{self.config.server}: {_describe(e)}") from e

    async def endpointslice_api_version(self) -> str:
        """`discovery.k8s.io/v1`, or `discovery.k8s.io/v1beta1` on servers that offer only that
        (Kubernetes 1.19-1.20). Raises ApiError(404) if the server has no EndpointSlice API."""
        group = await self.get("/apis/discovery.k8s.io")
        offered = [str(v.get("groupVersion")) for v in group.get("versions") or []]
        for gv in ("discovery.k8s.io/v1", "discovery.k8s.io/v1beta1"):
            if gv in offered:
                return gv
        raise ApiError(404, "NotFound", f"server offers no usable EndpointSlice version (has {offered})")


def _describe(e: BaseException) -> str:
    if isinstance(e, TimeoutError):
        return "timed out"
    return str(e) or type(e).__name__


def _error_from_response(code: int, reason: str, raw: bytes) -> ApiError:
    try:
        doc = orjson.loads(raw)
    except orjson.JSONDecodeError:
        doc = None
    if isinstance(doc, dict) and doc.get("kind") == "Status":
        return ApiError.from_status(doc, code)
    text = raw.decode(errors="replace").strip().splitlines()
    return ApiError(code, reason or "Unknown", text[0][:200] if text else reason)


def _decode_event(line: bytes) -> WatchEvent:
    ev = orjson.loads(line)
    typ = str(ev.get("type"))
    obj = ev.get("object") or {}
    if typ == "ERROR":
        raise ApiError.from_status(obj)
    return WatchEvent(typ, obj)


# --------------------------------------------------------------------------- informer

Handler = Callable[[str, JSON | None, JSON | None], None | Awaitable[None]]


@dataclass(slots=True)
class Backoff:
    """Exponential backoff with jitter, capped (client-go's reflector uses 800 ms .. 30 s)."""

    initial: float = 0.8
    cap: float = 30.0
    factor: float = 2.0
    jitter: float = 0.2
    _next: float = 0.0

    def next(self) -> float:
        cur = self._next or self.initial
        self._next = min(cur * self.factor, self.cap)
        return cur * (1 + random.uniform(-self.jitter, self.jitter))

    def reset(self) -> None:
        self._next = 0.0


class Informer:
    """List + watch one collection, keep a local store, report changes as (type, old, new).

    - type is ADDED / MODIFIED / DELETED. For DELETED, `new` is None and `old` the last state.
    - The initial list (and every relist) is diffed against the store, so a consumer sees only
      real changes; after the first list `has_synced` is set (see `wait_synced`).
    - A closed stream is re-watched from the last resourceVersion (bookmarks advance it); 410
      Expired (HTTP or ERROR event) triggers a relist; an unreachable server is retried with
      capped exponential backoff while the store - and the consumer's state - stay as they are.
    - Changes go to `on_event` (sync or async callable) and/or to `queue` (if `use_queue`).
    """

    def __init__(
        self,
        client: KubeClient,
        path: str,
        *,
        label_selector: str | None = None,
        field_selector: str | None = None,
        on_event: Handler | None = None,
        use_queue: bool = False,
        backoff: Backoff | None = None,
        watch_timeout: tuple[int, int] = (300, 600),
        name: str | None = None,
    ) -> None:
        self.client = client
        self.path = path
        self.label_selector = label_selector
        self.field_selector = field_selector
        self.on_event = on_event
        self.queue: asyncio.Queue[tuple[str, JSON | None, JSON | None]] | None = (
            asyncio.Queue() if use_queue else None
        )
        self.backoff = backoff or Backoff()
        self.watch_timeout = watch_timeout
        self.name = name or path
        self.store: dict[str, JSON] = {}
        self.resource_version = ""
        self.synced = asyncio.Event()
        self.relists = 0  # how many times we listed (1 = the initial list)
        self.connected = False  # whether the last request reached the server

    @property
    def has_synced(self) -> bool:
        return self.synced.is_set()

    async def wait_synced(self, timeout: float | None = None) -> None:
        await asyncio.wait_for(self.synced.wait(), timeout)

    async def events(self) -> AsyncIterator[tuple[str, JSON | None, JSON | None]]:
        """Iterate the queue (requires use_queue=True)."""
        if self.queue is None:
            raise RuntimeError("Informer was created without use_queue=True")
        while True:
            yield await self.queue.get()

    async def _emit(self, typ: str, old: JSON | None, new: JSON | None) -> None:
        if self.on_event is not None:
            try:
                r = self.on_event(typ, old, new)
                if inspect.isawaitable(r):
                    await r
            except Exception:  # a consumer bug must not stop the watch (it is logged loudly)
                log.exception("informer %s: handler failed on %s %s", self.name, typ,
                              object_key(new if new is not None else old or {}))
        if self.queue is not None:
            self.queue.put_nowait((typ, old, new))

    async def _relist(self) -> None:
        items, rv = await self.client.list_all(
            self.path, label_selector=self.label_selector, field_selector=self.field_selector
        )
        self.relists += 1
        fresh = {object_key(o): o for o in items}
        for key, gone in builtins.list(self.store.items()):
            if key not in fresh:
                del self.store[key]
                await self._emit("DELETED", gone, None)
        for key, obj in fresh.items():
            old = self.store.get(key)
            self.store[key] = obj
            if old is None:
                await self._emit("ADDED", None, obj)
            elif _rv(old) != _rv(obj) or old != obj:
                await self._emit("MODIFIED", old, obj)
        self.resource_version = rv
        self.synced.set()

    async def _watch_once(self) -> int:
        """One watch request; returns how many events it carried."""
        timeout = random.randint(*self.watch_timeout) if self.watch_timeout[1] > 0 else None
        n = 0
        async for ev in self.client.watch(
            self.path,
            resource_version=self.resource_version,
            label_selector=self.label_selector,
            field_selector=self.field_selector,
            allow_bookmarks=True,
            timeout_seconds=timeout,
        ):
            n += 1
            self.backoff.reset()
            rv = _rv(ev.object)
            if ev.type == "BOOKMARK":
                if rv:
                    self.resource_version = rv
                continue
            key = object_key(ev.object)
            if ev.type == "DELETED":
                old = self.store.pop(key, None)
                await self._emit("DELETED", old if old is not None else ev.object, None)
            elif ev.type in ("ADDED", "MODIFIED"):
                old = self.store.get(key)
                self.store[key] = ev.object
                await self._emit("ADDED" if old is None else "MODIFIED", old, ev.object)
            if rv:
                self.resource_version = rv
        return n

    async def run(self) -> None:
        """Run until cancelled."""
        need_list = True
        while True:
            try:
                if need_list:
                    await self._relist()
                    need_list = False
                self.connected = True
                t0 = asyncio.get_running_loop().time()
                n = await self._watch_once()
                # The server closed the stream normally: re-watch from the last RV, at once
                # unless the watch was suspiciously short (client-go treats that as an error).
                if n == 0 and asyncio.get_running_loop().time() - t0 < 1.0:
                    await asyncio.sleep(self.backoff.next())
            except ApiError as e:
                self.connected = True
                if e.expired:
                    log.info("informer %s: %s; relisting", self.name, e.message or "expired")
                    need_list = True
                    continue
                delay = self.backoff.next()
                log.warning("informer %s: %s; retrying in %.1fs", self.name, e, delay)
                need_list = need_list or e.code >= 500 or e.code == 429
                await asyncio.sleep(delay)
            except ServerUnavailable as e:
                self.connected = False
                delay = self.backoff.next()
                log.warning("informer %s: apiserver unreachable (%s); keeping state, retrying in %.1fs",
                            self.name, e, delay)
                await asyncio.sleep(delay)


def _rv(obj: Mapping[str, Any]) -> str:
    return str((obj.get("metadata") or {}).get("resourceVersion") or "")
