"""The bench's cluster: a `kpx up` lab without proxies (the bench starts one `kpx proxy` per cell on
the client's node), the Services and EndpointSlices it creates through the apiserver, the backend
and client pods, and the processes it runs inside pod netns (iperf3 servers, recorded with the lab
so `kpx down` removes them too).

    bl = BenchLab.up("bench")  ...  bl.down()       # or BenchLab.attach("mylab") for --lab --reuse
"""

from __future__ import annotations

import asyncio
import os
import random
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from kpx.errors import UserError
from netns.lab import Lab, LabNode, state_root

NS = "bench"
TARGET = "zz-target"  # sorts after every filler: iptables walks past all of them (as upstream's tests)
TARGET_LABELS = {"app": "bench-target"}
# iperf3 runs a control and a data connection, which a 10-endpoint Service would spread over two
# backends: throughput goes through a one-endpoint Service of its own (backend-0), also created last
IPERF_SVC, IPERF_LABELS = "zz-target-iperf", {"bench-iperf": "yes"}
ECHO_PORT, IPERF_PORT = 8080, 5201
FILLER_BASE = 0x64400000  # 100.64.0.0/10: filler endpoint addresses, no pod behind any of them
MANAGED_BY = "kpx-bench"
TRIGGER = "endpoints.kubernetes.io/last-change-trigger-time"
SLICES = "/apis/discovery.k8s.io/v1/namespaces/bench/endpointslices"
SERVICES = "/api/v1/namespaces/bench/services"


def now_rfc3339() -> str:
    return datetime.now(UTC).isoformat(timespec="microseconds").replace("+00:00", "Z")


def filler_ip(i: int, k: int, endpoints: int) -> str:
    n = FILLER_BASE + 1 + (i * endpoints + k) % (0x3FFFFF - 2)
    return f"{n >> 24}.{(n >> 16) & 255}.{(n >> 8) & 255}.{n & 255}"


def filler_name(i: int) -> str:
    return f"svc-{i:05d}"


def service_body(name: str, selector: dict[str, str] | None = None,
                 ports: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    spec: dict[str, Any] = {"type": "ClusterIP",
                            "ports": ports or [{"name": "http", "port": 80, "targetPort": ECHO_PORT}]}
    if selector:
        spec["selector"] = selector
    return {"apiVersion": "v1", "kind": "Service", "metadata": {"name": name, "namespace": NS}, "spec": spec}


def slice_body(name: str, service: str, ips: list[str], trigger: str | None = None) -> dict[str, Any]:
    md: dict[str, Any] = {"name": name, "namespace": NS,
                          "labels": {"kubernetes.io/service-name": service,
                                     "endpointslice.kubernetes.io/managed-by": MANAGED_BY}}
    if trigger:
        md["annotations"] = {TRIGGER: trigger}
    return {"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice", "metadata": md, "addressType": "IPv4",
            "endpoints": [{"addresses": [ip], "conditions": {"ready": True}} for ip in ips],
            "ports": [{"name": "http", "port": ECHO_PORT, "protocol": "TCP"}]}


def _kpx(*args: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "kpx", *args], capture_output=True, text=True, timeout=timeout)


@dataclass
class BenchLab:
    lab: Lab
    kubeconfig: Path
    owned: bool  # built by the bench (and removed by it)
    pids: list[int] = field(default_factory=list)
    backend_ips: list[str] = field(default_factory=list)
    target_ip: str = ""
    iperf_ip: str = ""

    # ------------------------------------------------------------------ lifecycle

    @staticmethod
    def check_free(name: str) -> None:
        if Lab.exists(name):
            raise UserError(f"lab {name} is already up: remove it ('kpx down --lab {name}'), use another name "
                            f"(--lab), or run on it with --reuse")

    @classmethod
    def up(cls, name: str, nodes: int = 2) -> BenchLab:
        cls.check_free(name)
        rng = random.Random()
        last = ""
        for _ in range(10):
            n = rng.randrange(512)
            subnet = f"198.{18 + n // 256}.{n % 256}.0/24"
            from netns.up import free_port

            try:
                p = _kpx("up", "--lab", name, "--nodes", str(nodes), "--subnet", subnet,
                         "--apiserver-port", str(free_port()), "--timeout", "180",
                         "--proxy-mode", "none")  # the bench starts its own proxy per cell
            except subprocess.TimeoutExpired:
                cls.remove(name)
                raise UserError(f"'kpx up --lab {name}' did not finish in 300 s (machine too slow or loaded?); "
                                f"the lab was removed") from None
            if p.returncode == 0:
                return cls(Lab.load(name), state_root() / name / "kubeconfig", owned=True)
            last = p.stderr.strip().splitlines()[-1] if p.stderr.strip() else f"exit {p.returncode}"
            if "overlaps" not in last and "in use" not in last:
                break
        raise UserError(f"could not build lab {name}: {last}")

    @classmethod
    def attach(cls, name: str) -> BenchLab:
        if not Lab.exists(name):
            raise UserError(f"--reuse: lab {name} is not up ('kpx up --lab {name}' first, or drop --reuse)")
        from netns.up import UpState

        lab = Lab.load(name)
        st = UpState.load(lab)
        if st is None:
            raise UserError(f"--reuse: lab {name} was not built by 'kpx up' (no up.json)")
        if st.proxy_mode and st.proxy_mode != "none":
            raise UserError(f"--reuse: lab {name} runs 'kpx proxy --proxy-mode {st.proxy_mode}' on every node; the "
                            f"bench starts its own proxies: 'kpx up --lab {name} --proxy-mode none'")
        return cls(lab, state_root() / name / "kubeconfig", owned=False)

    @staticmethod
    def remove(name: str) -> None:
        _kpx("down", "--lab", name, timeout=180)

    def down(self) -> None:
        for pid in self.pids:
            try:
                os.kill(pid, 15)
            except ProcessLookupError:
                pass
        if self.owned:
            _kpx("down", "--lab", self.lab.name, timeout=180)

    @property
    def client_node(self) -> LabNode:
        return self.lab.nodes[0]

    @property
    def backend_node(self) -> LabNode:
        return self.lab.nodes[-1]

    @property
    def client_netns(self) -> str:
        return self.lab.pod_netns(NS, "client")

    def spawn(self, role: str, argv: list[str], netns: str) -> subprocess.Popen[bytes]:
        from netns.up import spawn

        p = spawn(self.lab, role, argv, netns=netns)
        self.pids.append(p.pid)
        return p

    def stop(self, p: subprocess.Popen[bytes], timeout: float = 20) -> None:
        p.terminate()
        try:
            p.wait(timeout)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait(5)
        if p.pid in self.pids:
            self.pids.remove(p.pid)

    # ------------------------------------------------------------------ API

    def run(self, fn: Callable[[Any], Awaitable[Any]]) -> Any:
        from kpx.kubeclient import KubeClient, KubeConfig

        async def go() -> Any:
            async with KubeClient(KubeConfig.load(self.kubeconfig), request_timeout=60) as kc:
                return await fn(kc)

        return asyncio.run(go())

    def prepare(self, endpoints: int, timeout: float = 240) -> None:
        """Namespace, client pod on the first node, `endpoints` kpx/echo backends on the last."""
        from kpx.kubeclient import ApiError

        async def go(kc: Any) -> None:
            try:
                await kc.create("/api/v1/namespaces", {"apiVersion": "v1", "kind": "Namespace",
                                                       "metadata": {"name": NS}})
            except ApiError as e:
                if e.code != 409:
                    raise
            pods = [("client", self.client_node.name, {"app": "bench-client"})]
            pods += [(f"backend-{k}", self.backend_node.name, {**TARGET_LABELS, **(IPERF_LABELS if k == 0 else {})})
                     for k in range(endpoints)]
            for name, node, labels in pods:
                body = {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": name, "namespace": NS,
                                                                        "labels": labels},
                        "spec": {"nodeName": node, "terminationGracePeriodSeconds": 1, "containers": [
                            {"name": "main", "image": "kpx/echo",
                             "readinessProbe": {"tcpSocket": {"port": ECHO_PORT}, "periodSeconds": 1}}]}}
                try:
                    await kc.create(f"/api/v1/namespaces/{NS}/pods", body)
                except ApiError as e:
                    if e.code != 409:
                        raise
            deadline = time.monotonic() + timeout
            while True:
                items = (await kc.get(f"/api/v1/namespaces/{NS}/pods")).get("items") or []
                ready = {p["metadata"]["name"]: p for p in items if any(
                    c.get("type") == "Ready" and c.get("status") == "True"
                    for c in (p.get("status") or {}).get("conditions") or [])}
                if len(ready) >= len(pods):
                    self.backend_ips = [ready[f"backend-{k}"]["status"]["podIP"] for k in range(endpoints)]
                    return
                if time.monotonic() > deadline:
                    raise UserError(f"only {len(ready)} of {len(pods)} bench pods Ready after "
                                    f"{timeout:.0f}s (see 'kpx status --lab {self.lab.name}')")
                await asyncio.sleep(0.3)

        self.run(go)
        for k in range(endpoints):
            self.spawn(f"bench/iperf3-{k}", ["iperf3", "-s", "-p", str(IPERF_PORT)],
                       self.lab.pod_netns(NS, f"backend-{k}"))

    def fill(self, start: int, stop: int, endpoints: int, workers: int = 32,
             progress: Callable[[int], None] | None = None) -> None:
        """Filler Services start..stop-1: selectorless, one hand-written EndpointSlice each."""
        from kpx.kubeclient import ApiError

        async def go(kc: Any) -> None:
            todo = iter(range(start, stop))
            done = 0

            async def worker() -> None:
                nonlocal done
                for i in todo:
                    name = filler_name(i)
                    for path, body in ((SERVICES, service_body(name)),
                                       (SLICES, slice_body(f"{name}-bench", name,
                                                           [filler_ip(i, k, endpoints) for k in range(endpoints)]))):
                        try:
                            await kc.create(path, body)
                        except ApiError as e:
                            if e.code != 409:
                                raise
                    done += 1
                    if progress and done % 100 == 0:
                        progress(done)

            await asyncio.gather(*(worker() for _ in range(workers)))

        self.run(go)

    def recreate_target(self, timeout: float = 60) -> str:
        """The measured Services, created after every filler; sets their ClusterIPs once their
        EndpointSlices list every backend."""
        self.target_ip = self._recreate(TARGET, TARGET_LABELS, [{"name": "http", "port": 80, "targetPort": ECHO_PORT}],
                                        set(self.backend_ips), timeout)
        self.iperf_ip = self._recreate(IPERF_SVC, IPERF_LABELS,
                                       [{"name": "iperf", "port": IPERF_PORT, "targetPort": IPERF_PORT}],
                                       {self.backend_ips[0]}, timeout)
        return self.target_ip

    def _recreate(self, name: str, selector: dict[str, str], ports: list[dict[str, Any]], want: set[str],
                  timeout: float) -> str:
        from kpx.kubeclient import ApiError

        async def go(kc: Any) -> str:
            try:
                await kc.delete(f"{SERVICES}/{name}")
            except ApiError as e:
                if e.code != 404:
                    raise
            deadline = time.monotonic() + timeout
            while True:
                try:
                    svc = await kc.create(SERVICES, service_body(name, selector, ports))
                    break
                except ApiError as e:  # the old one is still being deleted
                    if e.code != 409 or time.monotonic() > deadline:
                        raise
                    await asyncio.sleep(0.2)
            while True:
                items = (await kc.get(SLICES, labelSelector=f"kubernetes.io/service-name={name}")).get("items")
                addrs = {a for s in items or [] for ep in s.get("endpoints") or [] for a in ep.get("addresses", [])}
                if addrs == want:
                    return str(svc["spec"]["clusterIP"])
                if time.monotonic() > deadline:
                    raise UserError(f"the EndpointSlice of {name} did not list the backends in {timeout}s")
                await asyncio.sleep(0.2)

        return str(self.run(go))
