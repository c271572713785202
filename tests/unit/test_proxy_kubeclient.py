"""kpx.kubeclient: kubeconfig parsing, Status errors, watch decoding and the Informer's
list/watch/relist/backoff logic, against a scripted in-process HTTP server on 127.0.0.1.

The same paths run against the real apiserver in tests/integration/test_proxy_core*.py.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import functools
import inspect
import json
from collections.abc import AsyncIterator
from typing import Any

import pytest
from aiohttp import web

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

pytestmark = pytest.mark.unit


def _kubeconfig(**user: Any) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Config",
        "current-context": "lab",
        "clusters": [{"name": "c", "cluster": {"server": "https://127.0.0.1:6443/",
                                               "certificate-authority": "ca.crt"}}],
        "users": [{"name": "u", "user": user}],
        "contexts": [{"name": "lab", "context": {"cluster": "c", "user": "u", "namespace": "kube-system"}}],
    }


def test_kubeconfig_paths_are_relative_to_the_file(tmp_path):
    import yaml

    p = tmp_path / "kubeconfig"
    p.write_text(yaml.safe_dump(_kubeconfig(token="t0ken", **{"client-certificate": "/abs/c.crt"})))
    cfg = KubeConfig.load(p)
    assert cfg.server == "https://127.0.0.1:6443"
    assert cfg.ca_file == str(tmp_path / "ca.crt")
    assert cfg.client_cert_file == "/abs/c.crt"
    assert cfg.token == "t0ken" and cfg.namespace == "kube-system"


def test_kubeconfig_embedded_data_is_decoded():
    doc = _kubeconfig(**{"client-certificate-data": base64.b64encode(b"PEM").decode()})
    doc["clusters"][0]["cluster"] = {"server": "http://x", "certificate-authority-data": base64.b64encode(b"CA").decode(),
                                     "insecure-skip-tls-verify": True}
    cfg = KubeConfig.from_dict(doc)
    assert cfg.ca_data == "CA" and cfg.client_cert_data == "PEM" and cfg.insecure_skip_tls_verify


def test_kubeconfig_errors_are_one_line(tmp_path):
    with pytest.raises(KubeError, match="cannot read kubeconfig"):
        KubeConfig.load(tmp_path / "missing")
    with pytest.raises(KubeError, match="no context named 'nope'"):
        KubeConfig.from_dict(_kubeconfig(), context="nope")


def test_api_path():
    assert api_path("v1", "services", "ns", "x") == "/api/v1/namespaces/ns/services/x"
    assert api_path("discovery.k8s.io/v1", "endpointslices") == "/apis/discovery.k8s.io/v1/endpointslices"
    assert api_path("v1", "nodes", name="n1", subresource="status") == "/api/v1/nodes/n1/status"


# --------------------------------------------------------------------------- scripted server


def _svc(name: str, rv: int) -> dict[str, Any]:
    return {"kind": "Service", "apiVersion": "v1",
            "metadata": {"namespace": "default", "name": name, "resourceVersion": str(rv)}}


class Scripted:
    """A tiny apiserver stand-in: serves `objects` at `rv`, and watch streams from `watch_script`."""

    def __init__(self) -> None:
        self.objects: dict[str, dict[str, Any]] = {}
        self.rv = 1
        self.lists: list[dict[str, str]] = []
        self.watches: list[dict[str, str]] = []
        self.watch_script: list[list[Any]] = []  # per watch request: events, or ("http", code)
        self.list_states: list[tuple[dict[str, dict[str, Any]], int]] = []  # next state per new list
        self.stop = asyncio.Event()

    async def handle(self, request: web.Request) -> web.StreamResponse:
        q = dict(request.query)
        if request.path == "/apis/discovery.k8s.io":
            return web.json_response({"kind": "APIGroup", "versions": [{"groupVersion": "discovery.k8s.io/v1beta1"}]})
        if request.path.endswith("/missing"):
            return web.json_response({"kind": "Status", "status": "Failure", "reason": "NotFound",
                                      "message": 'services "missing" not found', "code": 404}, status=404)
        if q.get("watch") != "1":
            self.lists.append(q)
            if "continue" not in q and self.list_states and len(self.lists) > 1:
                self.objects, self.rv = self.list_states.pop(0)
            items = sorted(self.objects.values(), key=lambda o: o["metadata"]["name"])
            limit = int(q.get("limit") or 0)
            start = int(q.get("continue") or 0)
            page = items[start : start + limit] if limit else items
            nxt = str(start + limit) if limit and start + limit < len(items) else ""
            return web.json_response({"kind": "ServiceList", "items": page,
                                      "metadata": {"resourceVersion": str(self.rv), "continue": nxt}})
        self.watches.append(q)
        script = self.watch_script.pop(0) if self.watch_script else []
        if script and script[0] == "http":
            return web.json_response({"kind": "Status", "reason": "Expired", "message": "too old", "code": script[1]},
                                     status=script[1])
        resp = web.StreamResponse()
        resp.content_type = "application/json"
        await resp.prepare(request)
        for ev in script:
            if ev == "hang":
                await self.stop.wait()
            if isinstance(ev, bytes):  # raw bytes, written as they are
                await resp.write(ev)
                continue
            # split each event across two writes to prove the line reassembly
            data = json.dumps(ev).encode() + b"\n"
            await resp.write(data[:7])
            await resp.write(data[7:])
        return resp


@contextlib.asynccontextmanager
async def _serve() -> AsyncIterator[tuple[Scripted, KubeClient]]:
    s = Scripted()
    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", s.handle)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    kc = KubeClient(KubeConfig(server=f"http://127.0.0.1:{port}", token="t"))
    try:
        yield s, kc
    finally:
        s.stop.set()
        await kc.close()
        await runner.cleanup()


def with_server(fn):
    """Run `async def test(s, kc)` with a fresh scripted server (no pytest-asyncio needed)."""

    @functools.wraps(fn)
    def wrapper():
        async def main():
            async with _serve() as (s, kc):
                await fn(s, kc)

        asyncio.run(main())

    wrapper.__signature__ = inspect.Signature()  # type: ignore[attr-defined]
    return wrapper


@with_server
async def test_status_error_carries_code_reason_message(s, kc):
    with pytest.raises(ApiError) as ei:
        await kc.get("/api/v1/namespaces/default/services/missing")
    assert (ei.value.code, ei.value.reason) == (404, "NotFound")
    assert "not found" in ei.value.message


@with_server
async def test_discovery_falls_back_to_v1beta1(s, kc):
    assert await kc.endpointslice_api_version() == "discovery.k8s.io/v1beta1"


def test_unreachable_server_raises_server_unavailable():
    asyncio.run(_unreachable())


async def _unreachable():
    async with KubeClient(KubeConfig(server="http://127.0.0.1:9")) as kc:
        with pytest.raises(ServerUnavailable):
            await kc.get("/api/v1/services")


async def _until(pred, timeout=5.0):
    deadline = asyncio.get_running_loop().time() + timeout
    while not pred():
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError("condition not met in time")
        await asyncio.sleep(0.01)


@with_server
async def test_informer_lists_pages_watches_and_relists_on_410(s, kc):
    for i in range(3):
        s.objects[f"s{i}"] = _svc(f"s{i}", 1)
    s.rv = 5
    s.watch_script = [
        [{"type": "ADDED", "object": _svc("s3", 6)},
         {"type": "BOOKMARK", "object": {"kind": "Service", "metadata": {"resourceVersion": "8"}}}],
        [{"type": "MODIFIED", "object": _svc("s0", 9)},
         {"type": "ERROR", "object": {"kind": "Status", "reason": "Expired", "message": "too old", "code": 410}}],
        ["hang"],
    ]
    # after the ERROR 410 the informer relists; the server state then lacks s1 and has s3
    s.list_states = [({"s0": _svc("s0", 9), "s2": _svc("s2", 1), "s3": _svc("s3", 6)}, 12)]
    got: list[tuple[str, str | None, str | None]] = []

    def on(t, old, new):
        got.append((t, old and old["metadata"]["name"], new and new["metadata"]["name"]))

    inf = Informer(kc, "/api/v1/services", on_event=on, backoff=Backoff(0.01, 0.05))
    task = asyncio.create_task(inf.run())
    try:
        await _until(lambda: len(s.watches) >= 3 and inf.relists == 2)
    finally:
        task.cancel()
    assert inf.has_synced
    assert got[:3] == [("ADDED", None, "s0"), ("ADDED", None, "s1"), ("ADDED", None, "s2")]
    assert ("ADDED", None, "s3") in got and ("MODIFIED", "s0", "s0") in got
    assert got[-1] == ("DELETED", "s1", None)  # noticed by diffing the relist
    assert s.lists[0]["limit"] == "500"
    # first watch from the list RV; second from the bookmark's; third from the relist's
    assert [w.get("resourceVersion") for w in s.watches[:3]] == ["5", "8", "12"]
    assert all(w.get("allowWatchBookmarks") == "true" for w in s.watches)
    assert set(inf.store) == {"default/s0", "default/s2", "default/s3"}
    assert inf.resource_version == "12"


@with_server
async def test_informer_relists_on_http_410_and_queues(s, kc):
    s.objects["a"] = _svc("a", 1)
    s.watch_script = [["http", 410], ["hang"]]
    inf = Informer(kc, "/api/v1/services", use_queue=True, backoff=Backoff(0.01, 0.05))
    task = asyncio.create_task(inf.run())
    try:
        await _until(lambda: inf.relists == 2 and len(s.watches) == 2)
        first = await asyncio.wait_for(inf.queue.get(), 1)  # type: ignore[union-attr]
    finally:
        task.cancel()
    assert first[0] == "ADDED" and first[2]["metadata"]["name"] == "a"
    assert inf.queue.empty()  # type: ignore[union-attr]  # relist of unchanged state: no event


def test_informer_backs_off_and_keeps_store_while_server_is_away():
    asyncio.run(_away())


async def _away():
    kc = KubeClient(KubeConfig(server="http://127.0.0.1:9"))
    inf = Informer(kc, "/api/v1/services", backoff=Backoff(0.01, 0.04, jitter=0))
    inf.store["default/x"] = _svc("x", 1)
    task = asyncio.create_task(inf.run())
    try:
        await asyncio.sleep(0.3)
    finally:
        task.cancel()
        await kc.close()
    assert not inf.connected and not inf.has_synced
    assert "default/x" in inf.store
    assert inf.backoff._next == 0.04  # capped


def test_backoff_is_exponential_and_capped():
    b = Backoff(1, 8, jitter=0)
    assert [b.next() for _ in range(5)] == [1, 2, 4, 8, 8]
    b.reset()
    assert b.next() == 1


@with_server
async def test_list_all_follows_continue(s, kc):
    for i in range(5):
        s.objects[f"s{i}"] = _svc(f"s{i}", 1)
    s.rv = 7
    items, rv = await kc.list_all("/api/v1/services", page_size=2)
    assert [o["metadata"]["name"] for o in items] == ["s0", "s1", "s2", "s3", "s4"]
    assert rv == "7" and [q.get("continue") for q in s.lists] == [None, "2", "4"]


@with_server
async def test_a_failing_handler_does_not_stop_the_informer(s, kc):
    s.objects = {"bad": _svc("bad", 1), "good": _svc("good", 1)}
    s.watch_script = [[{"type": "ADDED", "object": _svc("later", 3)}], ["hang"]]
    seen = []

    def on(t, old, new):
        if new and new["metadata"]["name"] == "bad":
            raise RuntimeError("consumer bug")
        seen.append(new["metadata"]["name"])

    inf = Informer(kc, "/api/v1/services", on_event=on, backoff=Backoff(0.01, 0.05))
    task = asyncio.create_task(inf.run())
    try:
        await _until(lambda: "later" in seen)
    finally:
        task.cancel()
    assert seen == ["good", "later"] and set(inf.store) == {"default/bad", "default/good", "default/later"}


@with_server
async def test_watch_splits_lines_across_and_within_chunks(s, kc):
    e = [json.dumps({"type": "ADDED", "object": _svc(f"w{i}", i)}).encode() + b"\n" for i in range(4)]
    s.watch_script = [[e[0] + e[1] + e[2][:5], e[2][5:] + e[3][:-1], b"\n"]]
    got = [ev.object["metadata"]["name"] async for ev in kc.watch("/api/v1/services", resource_version="1")]
    assert got == ["w0", "w1", "w2", "w3"]
