"""The apiserver over HTTPS, as clients see it, for SQLite and etcd storage.

    .venv/bin/python -m bench.apiserver_bench [--storage sqlite,etcd] [--creates 5000]
        [--watchers 100] [--list 10000] [--rss 30000] [--json OUT]

Phases (each against a `kpx apiserver` child process on a random loopback port, controllers off
so only the bench writes):
  creates   Service creates/s with 8 concurrent clients (POST, each waits for its 201), and the
            apiserver's CPU per create (load-independent: the machine is shared)
  latency   the same 8-client create load with N watchers attached (one watch stream each, in a
            separate process so their parsing does not steal the load generator's core); latency
            per (event, watcher) from the create's 201 and from its send (stamped in an annotation)
  list/rss  a fresh apiserver whose store is filled with 30k Services + 30k EndpointSlices cloned
            from objects it stored itself (written straight into the store while it is stopped:
            fast), restarted: its RSS (VmRSS), and a LIST of the 10k Services in one namespace
            (response time; with the client's JSON decode; the apiserver's CPU for it)

Targets (SQLite): >= 1000 creates/s, p99 <= 100 ms, LIST 10k <= 0.5 s, RSS <= 1 GiB.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import os
import signal
import socket
import ssl
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import yaml

ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class ApiserverProcess:
    """One `kpx apiserver` child on 127.0.0.1:<random port>; stopped (or SIGKILLed) by its PID."""

    def __init__(
        self,
        data_dir: Path,
        *,
        storage: str = "sqlite",
        etcd_servers: str = "",
        port: int = 0,
        controllers: str = "",
        extra: tuple[str, ...] = (),
    ) -> None:
        self.data_dir = data_dir
        self.storage = storage
        self.etcd_servers = etcd_servers
        self.port = port or free_port()
        self.controllers = controllers
        self.extra = extra
        self.proc: subprocess.Popen[bytes] | None = None
        self.url = f"https://127.0.0.1:{self.port}"
        self.log_path = data_dir.parent / f"{data_dir.name}-apiserver.log"

    def start(self, timeout: float = 30.0) -> None:
        cmd = [
            sys.executable, "-m", "kpx", "apiserver",
            "--data-dir", str(self.data_dir),
            "--secure-port", str(self.port),
            "--bind-address", "127.0.0.1",
            "--storage", self.storage,
            "--controllers", self.controllers,
            "--log-level", "warning",
            *self.extra,
        ]  # fmt: skip
        if self.etcd_servers:
            cmd += ["--etcd-servers", self.etcd_servers]
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                cmd, stdout=log, stderr=log, stdin=subprocess.DEVNULL, cwd=ROOT,
                env={**os.environ, "PYTHONPATH": str(ROOT)},
            )  # fmt: skip
        self._wait_ready(timeout)

    def _wait_ready(self, timeout: float) -> None:
        assert self.proc is not None
        deadline = time.monotonic() + timeout
        ctx = ssl.create_default_context()
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"kpx apiserver exited {self.proc.returncode}; see {self.log_path}")
            try:
                with (
                    socket.create_connection(("127.0.0.1", self.port), timeout=1) as raw,
                    ctx.wrap_socket(raw) as s,
                ):
                    s.sendall(b"GET /readyz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
                    if s.recv(64).startswith(b"HTTP/1.1 200"):
                        return
            except OSError:
                pass
            time.sleep(0.05)
        self.kill()
        raise RuntimeError(f"kpx apiserver not ready within {timeout}s; see {self.log_path}")

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def kill(self, sig: int = signal.SIGKILL) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.kill(self.proc.pid, sig)
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                os.kill(self.proc.pid, signal.SIGKILL)
                self.proc.wait(timeout=15)
        self.proc = None

    def cpu_seconds(self) -> float:
        """user+system CPU time the apiserver process has used so far."""
        with open(f"/proc/{self.pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def rss_mib(self) -> float:
        with open(f"/proc/{self.pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024
        return 0.0

    def credentials(self) -> tuple[ssl.SSLContext, str]:
        """(TLS context trusting the apiserver's CA, bearer token) from DATA_DIR/kubeconfig."""
        cfg = yaml.safe_load((self.data_dir / "kubeconfig").read_text())
        ca = base64.b64decode(cfg["clusters"][0]["cluster"]["certificate-authority-data"]).decode()
        ctx = ssl.create_default_context(cadata=ca)
        return ctx, cfg["users"][0]["user"]["token"]

    def session(self, limit: int = 64) -> aiohttp.ClientSession:
        ctx, token = self.credentials()
        return aiohttp.ClientSession(
            base_url=self.url,
            connector=aiohttp.TCPConnector(ssl=ctx, limit=limit),
            headers={"Authorization": f"Bearer {token}"},
            timeout=aiohttp.ClientTimeout(total=60),
        )


def service(name: str, ns: str = "default", stamp: bool = False) -> dict[str, Any]:
    meta: dict[str, Any] = {"name": name, "namespace": ns, "labels": {"app": name, "bench": "kpx"}}
    if stamp:
        meta["annotations"] = {"bench/sent": repr(time.time())}
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": meta,
        "spec": {"selector": {"app": name}, "ports": [{"name": "http", "port": 80, "targetPort": 8080}]},
    }


def endpointslice(name: str, ns: str, i: int) -> dict[str, Any]:
    return {
        "apiVersion": "discovery.k8s.io/v1",
        "kind": "EndpointSlice",
        "metadata": {"name": f"{name}-x1", "namespace": ns, "labels": {"kubernetes.io/service-name": name}},
        "addressType": "IPv4",
        "endpoints": [
            {
                "addresses": [f"10.244.{j}.{i % 250 + 2}"],
                "conditions": {"ready": True, "serving": True, "terminating": False},
                "nodeName": f"node{j}",
            }
            for j in range(2)
        ],
        "ports": [{"name": "http", "protocol": "TCP", "port": 8080}],
    }


async def run_clients(
    n_clients: int, total: int, make: Callable[[int], Awaitable[None]]
) -> tuple[float, int]:
    """Run `make(i)` for i in range(total) over n_clients concurrent workers; (seconds, done)."""
    counter = iter(range(total))
    done = 0

    async def worker() -> None:
        nonlocal done
        for i in counter:
            await make(i)
            done += 1

    t0 = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(n_clients)))
    return time.perf_counter() - t0, done


async def create_services(
    s: aiohttp.ClientSession,
    count: int,
    prefix: str,
    ns: str = "default",
    clients: int = 8,
    stamp: bool = False,
    acks: dict[str, float] | None = None,
) -> tuple[float, list[tuple[str, int]]]:
    acked: list[tuple[str, int]] = []

    async def one(i: int) -> None:
        name = f"{prefix}{i}"
        async with s.post(f"/api/v1/namespaces/{ns}/services", data=orjson.dumps(service(name, ns, stamp)),
                          headers={"Content-Type": "application/json"}) as r:  # fmt: skip
            body = await r.read()
            if r.status != 201:
                raise RuntimeError(f"create {name}: HTTP {r.status} {body[:200]!r}")
            if acks is not None:
                acks[name] = time.time()
            acked.append((name, int(orjson.loads(body)["metadata"]["resourceVersion"])))

    secs, _ = await run_clients(clients, count, one)
    return secs, acked


# ---------------------------------------------------------------------------- watchers (child process)

WATCHER_CHILD = r"""
import asyncio, json, ssl, sys, time, aiohttp
url, ca, token, n, rv, expect = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4]), sys.argv[5], int(sys.argv[6])
MARK = b'"bench/sent":"'
NAME = b'"name":"'
async def watch(session, lat):
    got = 0
    async with session.get("/api/v1/namespaces/default/services",
                           params={"watch": "1", "resourceVersion": rv}) as r:
        assert r.status == 200, r.status
        buf = b""
        async for chunk in r.content.iter_any():
            now = time.time()
            buf += chunk
            *lines, buf = buf.split(b"\n")
            for line in lines:
                i = line.find(MARK)
                if i >= 0:
                    j = line.index(b'"', i + len(MARK))
                    k = line.index(NAME) + len(NAME)
                    lat.append((line[k:line.index(b'"', k)].decode(), float(line[i + len(MARK):j]), now))
                    got += 1
            if got >= expect:
                return
async def main():
    ctx = ssl.create_default_context(cadata=ca)
    lat = []
    async with aiohttp.ClientSession(base_url=url, connector=aiohttp.TCPConnector(ssl=ctx, limit=0),
                                     headers={"Authorization": "Bearer " + token},
                                     timeout=aiohttp.ClientTimeout(total=600)) as s:
        tasks = [asyncio.create_task(watch(s, lat)) for _ in range(n)]
        await asyncio.sleep(0.5)
        print("ready", flush=True)
        await asyncio.gather(*tasks)
    sys.stdout.write(json.dumps(lat) + "\n")
asyncio.run(main())
"""


def percentile(values: list[float], p: float) -> float:
    if not values:
        return float("nan")
    v = sorted(values)
    return v[min(len(v) - 1, int(round(p / 100 * (len(v) - 1))))]


async def phase_latency(
    api: ApiserverProcess, s: aiohttp.ClientSession, watchers: int, count: int
) -> dict[str, Any]:
    async with s.get("/api/v1/namespaces/default/services", params={"limit": "1"}) as r:
        rv = (await r.json())["metadata"]["resourceVersion"]
    cfg = yaml.safe_load((api.data_dir / "kubeconfig").read_text())
    ca = base64.b64decode(cfg["clusters"][0]["cluster"]["certificate-authority-data"]).decode()
    token = cfg["users"][0]["user"]["token"]
    child = await asyncio.create_subprocess_exec(
        sys.executable, "-c", WATCHER_CHILD, api.url, ca, token, str(watchers), rv, str(count),
        stdout=asyncio.subprocess.PIPE, cwd=ROOT, limit=1 << 30,
    )  # fmt: skip
    assert child.stdout is not None
    acks: dict[str, float] = {}
    try:
        line = await asyncio.wait_for(child.stdout.readline(), 60)
        assert line.strip() == b"ready", line
        secs, _ = await create_services(s, count, "lat-", stamp=True, acks=acks)
        out = await asyncio.wait_for(child.stdout.readline(), 120)
        seen = json.loads(out)
    finally:
        if child.returncode is None:
            child.kill()
        await child.wait()
    from_send = [recv - sent for _, sent, recv in seen]
    from_ack = [recv - acks[name] for name, _, recv in seen if name in acks]
    return {
        "watchers": watchers,
        "creates": count,
        "creates_per_s": round(count / secs, 1),
        "deliveries": len(seen),
        # from the create's 201 to the watcher's receipt (negative: the event beat the response)
        "from_ack_p50_ms": round(percentile(from_ack, 50) * 1000, 1),
        "from_ack_p99_ms": round(percentile(from_ack, 99) * 1000, 1),
        # from sending the create (includes the write's own latency under load)
        "from_send_p50_ms": round(percentile(from_send, 50) * 1000, 1),
        "from_send_p99_ms": round(percentile(from_send, 99) * 1000, 1),
    }


async def fill_store(
    storage: str,
    api: ApiserverProcess,
    templates: list[tuple[str, dict[str, Any]]],
    n: int,
    ns_of: Callable[[int], str],
) -> float:
    """Write n clones of each template (resource, stored object) straight into the apiserver's store
    (the apiserver is stopped): the objects are exactly what the apiserver stored for the template."""
    import uuid

    from controlplane.resources import by_name
    from controlplane.store.factory import open_store

    store = open_store(storage, sqlite_path=str(api.data_dir / "apiserver.db"), etcd_endpoints=api.etcd_servers,
                       auto_compact=False, **({"request_timeout": 60.0} if storage == "etcd" else {}))  # fmt: skip
    await store.start()
    t0 = time.perf_counter()
    try:
        sem = asyncio.Semaphore(16)

        async def one(resource: str, tmpl: dict[str, Any], i: int) -> None:
            obj = orjson.loads(orjson.dumps(tmpl))
            ns = ns_of(i)
            meta = obj["metadata"]
            meta.pop("resourceVersion", None)
            meta.update(name=f"{meta['name']}-{i}", namespace=ns, uid=str(uuid.uuid4()))
            if resource == "services":
                ip = f"10.{100 + i // 65536}.{i // 256 % 256}.{i % 256}"
                obj["spec"]["clusterIP"], obj["spec"]["clusterIPs"] = ip, [ip]
                res = by_name("services")
            else:
                res = by_name("endpointslices", "discovery.k8s.io")
            async with sem:
                await store.create(res.key(ns, meta["name"]), orjson.dumps(obj))

        for resource, tmpl in templates:
            await asyncio.gather(*(one(resource, tmpl, i) for i in range(n)))
    finally:
        await store.close()
    return time.perf_counter() - t0


async def phase_fill_list_rss(storage: str, work: Path, etcd_url: str, n: int, list_n: int) -> dict[str, Any]:
    """A fresh apiserver holding n Services + n EndpointSlices: its RSS and a LIST of list_n Services."""
    api = ApiserverProcess(work / f"{storage}-fill", storage=storage, etcd_servers=etcd_url)
    api.start()
    templates: list[tuple[str, dict[str, Any]]] = []
    namespaces = ["list"] + [f"rss-{k}" for k in range(max(1, (n - list_n) // 5000))]
    try:
        async with api.session() as s:
            for ns in namespaces:
                async with s.post("/api/v1/namespaces", data=orjson.dumps({"metadata": {"name": ns}}),
                                  headers={"Content-Type": "application/json"}) as r:  # fmt: skip
                    assert r.status in (201, 409), await r.text()
            for resource, path, body in (
                ("services", "/api/v1/namespaces/list/services", service("tmpl", "list")),
                ("endpointslices", "/apis/discovery.k8s.io/v1/namespaces/list/endpointslices",
                 endpointslice("tmpl", "list", 0)),
            ):  # fmt: skip
                async with s.post(
                    path, data=orjson.dumps(body), headers={"Content-Type": "application/json"}
                ) as r:
                    assert r.status == 201, await r.text()
                    templates.append((resource, orjson.loads(await r.read())))
    finally:
        api.kill(signal.SIGTERM)
    # the first list_n clones land in namespace "list", the rest in rss-* namespaces of 5000 each
    spread = len(namespaces) - 1

    def ns_of(i: int) -> str:
        return "list" if i < list_n else namespaces[1 + min(spread - 1, (i - list_n) // 5000)]

    fill_s = await fill_store(storage, api, templates, n, ns_of)
    t0 = time.perf_counter()
    api.start(timeout=300)
    start_s = time.perf_counter() - t0
    try:
        async with api.session() as s:
            times: list[float] = []  # request sent -> last byte of the response received
            decoded: list[float] = []  # ... plus the client's JSON decode of the ~10 MB body
            cpu: list[float] = []  # the apiserver's CPU for one LIST
            items = 0
            for _ in range(5):
                c0 = api.cpu_seconds()
                t0 = time.perf_counter()
                async with s.get("/api/v1/namespaces/list/services") as r:
                    data = await r.read()
                times.append(time.perf_counter() - t0)
                items = len(orjson.loads(data)["items"])
                decoded.append(time.perf_counter() - t0)
                cpu.append(api.cpu_seconds() - c0)
            rss = api.rss_mib()
    finally:
        api.kill(signal.SIGTERM)
    return {
        "list": {
            "items": items,
            "bytes": len(data),
            "response_best_s": round(min(times), 3),
            "response_median_s": round(sorted(times)[2], 3),
            "with_client_decode_median_s": round(sorted(decoded)[2], 3),
            "server_cpu_median_s": round(sorted(cpu)[2], 3),
        },
        "rss": {"services": n, "endpointslices": n, "rss_mib": round(rss, 1), "fill_s": round(fill_s, 1),
                "restart_s": round(start_s, 1)},
    }  # fmt: skip


async def bench_one(storage: str, args: argparse.Namespace, work: Path, etcd_url: str) -> dict[str, Any]:
    api = ApiserverProcess(work / f"{storage}-data", storage=storage, etcd_servers=etcd_url)
    api.start()
    res: dict[str, Any] = {"storage": storage}
    try:
        async with api.session() as s:
            await create_services(s, 200, "warm-")  # warm up TLS connections and code paths
            cpu0 = api.cpu_seconds()
            secs, acked = await create_services(s, args.creates, "c-")
            cpu_ms = (api.cpu_seconds() - cpu0) / max(1, len(acked)) * 1000
            res["creates"] = {
                "count": len(acked),
                "clients": 8,
                "per_s": round(len(acked) / secs, 1),
                # load-independent: the apiserver's own CPU per create, and what one free core allows
                "server_cpu_ms_per_create": round(cpu_ms, 2),
                "per_s_one_free_core": round(1000 / cpu_ms) if cpu_ms else None,
                "load_average": round(os.getloadavg()[0], 1),
            }
            print(f"[{storage}] creates: {res['creates']}", flush=True)
            if args.watchers:
                res["latency"] = await phase_latency(api, s, args.watchers, args.latency_creates)
                print(f"[{storage}] watch latency: {res['latency']}", flush=True)
    finally:
        api.kill(signal.SIGTERM)
    if args.rss:
        res.update(await phase_fill_list_rss(storage, work, etcd_url, args.rss, args.list))
        print(f"[{storage}] list: {res['list']} rss: {res['rss']}", flush=True)
    return res


class _Etcd:
    def __init__(self, work: Path) -> None:
        self.port, self.peer = free_port(), free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        peer = f"http://127.0.0.1:{self.peer}"
        with open(work / "etcd.log", "ab") as log:
            self.proc = subprocess.Popen(
                ["etcd", "--name", "bench", "--data-dir", str(work / "etcd"), "--listen-client-urls", self.url,
                 "--advertise-client-urls", self.url, "--listen-peer-urls", peer,
                 "--initial-advertise-peer-urls", peer, "--initial-cluster", f"bench={peer}"],
                stdout=log, stderr=log, stdin=subprocess.DEVNULL,
            )  # fmt: skip
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.5):
                    return
            except OSError:
                time.sleep(0.05)
        raise RuntimeError("etcd did not start")

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGTERM)
            self.proc.wait(timeout=20)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="apiserver_bench", description=__doc__.split("\n")[0])
    ap.add_argument("--storage", default="sqlite,etcd")
    ap.add_argument("--creates", type=int, default=5000)
    ap.add_argument("--watchers", type=int, default=100)
    ap.add_argument("--latency-creates", type=int, default=2000)
    ap.add_argument("--list", type=int, default=10000)
    ap.add_argument("--rss", type=int, default=30000)
    ap.add_argument("--json", default="")
    args = ap.parse_args(argv)
    results = []
    with tempfile.TemporaryDirectory(prefix="kpx-apiserver-bench-") as tmp:
        work = Path(tmp)
        for storage in [x.strip() for x in args.storage.split(",") if x.strip()]:
            etcd = _Etcd(work) if storage == "etcd" else None
            try:
                results.append(asyncio.run(bench_one(storage, args, work, etcd.url if etcd else "")))
            finally:
                if etcd is not None:
                    etcd.stop()
    text = json.dumps(results, indent=2)
    print(text)
    if args.json:
        Path(args.json).write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
