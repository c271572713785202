"""A running kpx cluster for integration tests: `kpx up` on a unique lab (apiserver + node agents,
and proxies when a mode is chosen), torn down with `kpx down` at the end even on failure.

    def test_x(cluster):
        a = cluster.create_pod("web-1", node="node1")            # kpx/echo + tcp readiness probe
        cluster.wait_ready("web-1")
        svc = cluster.create_service("web", {"app": "web-1"}, [{"port": 80, "targetPort": 8080}])
        line = cluster.ask_from_pod("web-1", "tcp", svc["spec"]["clusterIP"], 80)  # 'pod=... ip=... client=...'
        core = cluster.core()                                     # official kubernetes client CoreV1Api

`cluster` is session-scoped, 2 nodes, no proxy unless KPX_TEST_PROXY_MODE is set.
`cluster_factory(mode)` gives one shared session cluster per proxy mode (e.g. "iptables"), and
`make_cluster(proxy_mode=...)` (a context manager) builds a private one. Lab names, underlay subnets (198.18.0.0/15) and apiserver ports are unique per
session, so tests run next to a user's lab and other sessions. Pod names must be unique within the
session (`unique_name(prefix)`).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import os
import random
import secrets
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from netns.lab import Lab, state_root

_names = itertools.count(1)

# Slows every deadline down under emulation (the qemu/TCG vm tier sets 10): one knob, default 1.
TIME_SCALE = float(os.environ.get("KPX_TEST_TIME_SCALE") or 1)


def unique_name(prefix: str = "p") -> str:
    return f"{prefix}-{os.getpid() % 10000}-{next(_names)}"


def kpx(*args: str, timeout: float = 120, check: bool = False) -> subprocess.CompletedProcess[str]:
    p = subprocess.run([sys.executable, "-m", "kpx", *args], capture_output=True, text=True,
                       timeout=timeout * TIME_SCALE)
    if check and p.returncode != 0:
        raise AssertionError(f"kpx {' '.join(args)} failed ({p.returncode}): {p.stderr.strip()}")
    return p


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def pod_ready(pod: dict[str, Any]) -> bool:
    return any(c.get("type") == "Ready" and c.get("status") == "True"
               for c in (pod.get("status") or {}).get("conditions") or [])


@dataclass
class Cluster:
    name: str
    lab: Lab
    kubeconfig: Path
    port: int
    proxy_mode: str | None
    up_output: str = ""
    _clients: list[Any] = field(default_factory=list)

    # -- clients ---------------------------------------------------------------------------

    def api_client(self) -> Any:
        """A fresh official-client ApiClient for this cluster (closed at teardown)."""
        from kubernetes import config

        c = config.new_client_from_config(config_file=str(self.kubeconfig))
        self._clients.append(c)
        return c

    def core(self) -> Any:
        from kubernetes import client

        return client.CoreV1Api(self.api_client())

    def request(self, method: str, path: str, body: Any = None, **params: Any) -> dict[str, Any]:
        """One REST call through kpx.kubeclient (raises ApiError); JSON dicts, no client models."""
        from kpx.kubeclient import KubeClient, KubeConfig

        async def go() -> dict[str, Any]:
            async with KubeClient(KubeConfig.load(self.kubeconfig)) as kc:
                ct = "application/merge-patch+json" if method == "PATCH" else "application/json"
                return await kc.request(method, path, params=params, body=body, content_type=ct)

        return asyncio.run(go())

    # -- objects ---------------------------------------------------------------------------

    def create_pod(self, name: str, *, node: str | None = None, image: str = "kpx/echo",
                   args: list[str] | None = None, command: list[str] | None = None,
                   labels: dict[str, str] | None = None, namespace: str = "default", probe: bool = True,
                   port: int = 8080, containers: list[dict[str, Any]] | None = None,
                   **spec: Any) -> dict[str, Any]:
        """A pod (kpx/echo with a tcpSocket readiness probe on `port` by default); node pins it."""
        c: dict[str, Any] = {"name": "main", "image": image}
        if args:
            c["args"] = args
        if command:
            c["command"] = command
        if probe and not command:
            c["readinessProbe"] = {"tcpSocket": {"port": port}, "periodSeconds": 1}
        body_spec: dict[str, Any] = {"containers": containers or [c], "terminationGracePeriodSeconds": 2, **spec}
        if node:
            body_spec["nodeName"] = node
        body = {"apiVersion": "v1", "kind": "Pod",
                "metadata": {"name": name, "namespace": namespace, "labels": labels or {"app": name}},
                "spec": body_spec}
        return self.request("POST", f"/api/v1/namespaces/{namespace}/pods", body)

    def create_service(self, name: str, selector: dict[str, str], ports: list[dict[str, Any]],
                       type: str = "ClusterIP", namespace: str = "default", **spec: Any) -> dict[str, Any]:
        body = {"apiVersion": "v1", "kind": "Service", "metadata": {"name": name, "namespace": namespace},
                "spec": {"type": type, "selector": selector, "ports": ports, **spec}}
        return self.request("POST", f"/api/v1/namespaces/{namespace}/services", body)

    def get_pod(self, name: str, namespace: str = "default") -> dict[str, Any]:
        return self.request("GET", f"/api/v1/namespaces/{namespace}/pods/{name}")

    def wait_pod(self, name: str, pred: Any, namespace: str = "default", timeout: float = 30.0,
                 what: str = "condition") -> dict[str, Any]:
        timeout *= TIME_SCALE
        deadline = time.monotonic() + timeout
        pod: dict[str, Any] = {}
        while time.monotonic() < deadline:
            pod = self.get_pod(name, namespace)
            if pred(pod):
                return pod
            time.sleep(0.1)
        raise AssertionError(f"pod {namespace}/{name}: {what} not reached in {timeout}s; status={pod.get('status')}")

    def wait_ready(self, name: str, namespace: str = "default", timeout: float = 30.0) -> dict[str, Any]:
        return self.wait_pod(name, pod_ready, namespace, timeout, "Ready")

    def delete_pod(self, name: str, namespace: str = "default", wait: bool = True, timeout: float = 30.0,
                   grace: int | None = None) -> None:
        from kpx.kubeclient import ApiError

        params = {} if grace is None else {"gracePeriodSeconds": grace}
        timeout *= TIME_SCALE
        try:
            self.request("DELETE", f"/api/v1/namespaces/{namespace}/pods/{name}", **params)
        except ApiError as e:
            if e.code != 404:
                raise
        deadline = time.monotonic() + timeout
        while wait:
            try:
                self.get_pod(name, namespace)
            except ApiError as e:
                if e.code == 404:
                    return
                raise
            if time.monotonic() > deadline:
                raise AssertionError(f"pod {namespace}/{name} still exists {timeout}s after DELETE")
            time.sleep(0.1)

    # -- traffic ---------------------------------------------------------------------------

    def pod_netns(self, name: str, namespace: str = "default") -> str:
        return self.lab.pod_netns(namespace, name)

    def ask_from_pod(self, name: str, proto: str, ip: str, port: int = 8080, namespace: str = "default",
                     retry: float = 0.0) -> str:
        """One echo request from inside the pod's netns: the answer line, or 'ERROR <why>'."""
        from netns.demo import ask, ask_retry

        netns = self.pod_netns(name, namespace)
        return ask_retry(netns, proto, ip, port, retry) if retry else ask(netns, proto, ip, port)

    def ask_from_ext(self, proto: str, ip: str, port: int, retry: float = 0.0) -> str:
        from netns.demo import ask, ask_retry

        return ask_retry(self.lab.ext_netns, proto, ip, port, retry) if retry else ask(
            self.lab.ext_netns, proto, ip, port)

    # -- components --------------------------------------------------------------------------

    def up_state(self) -> dict[str, Any]:
        return json.loads((Path(self.lab.state_dir) / "up.json").read_text())

    def component_pid(self, role: str) -> int:
        return int(self.up_state()["components"][role])

    def close(self) -> None:
        for c in self._clients:
            with contextlib.suppress(Exception):
                c.close()
        self._clients.clear()


@contextlib.contextmanager
def make_cluster(nodes: int = 2, proxy_mode: str | None = None, prefix: str = "c",
                 storage: str = "sqlite") -> Iterator[Cluster]:
    """`kpx up` a unique lab (retrying on a subnet another session holds); `kpx down` afterwards."""
    rng = random.Random(os.getpid() ^ secrets.randbits(32))
    name = ""
    last = ""
    cluster: Cluster | None = None
    try:
        for _ in range(10):
            name = (prefix + secrets.token_hex(5))[:10]
            n = rng.randrange(512)
            subnet = f"198.{18 + n // 256}.{n % 256}.0/24"
            port = free_port()
            args = ["up", "--lab", name, "--nodes", str(nodes), "--subnet", subnet, "--apiserver-port", str(port),
                    "--storage", storage, "--timeout", str(90 * TIME_SCALE)]
            args += ["--proxy-mode", proxy_mode or "none"]
            p = kpx(*args, timeout=180)
            if p.returncode == 0:
                lab = Lab.load(name)
                cluster = Cluster(name, lab, state_root() / name / "kubeconfig", port, proxy_mode, p.stdout)
                break
            last = p.stderr.strip()
            if "overlaps" not in last and "in use" not in last:
                raise AssertionError(f"kpx up failed: {last}")
        if cluster is None:
            raise AssertionError(f"kpx up failed 10 times: {last}")
        yield cluster
    finally:
        if cluster is not None:
            cluster.close()
        if name:
            kpx("down", "--lab", name, timeout=120)


@pytest.fixture(scope="session")
def cluster() -> Iterator[Cluster]:
    with make_cluster(proxy_mode=os.environ.get("KPX_TEST_PROXY_MODE") or None) as c:
        yield c


@pytest.fixture(scope="session")
def cluster_factory() -> Iterator[Any]:
    """`cluster_factory("nftables")`: one shared 2-node cluster per proxy mode for the session
    (built on first use, torn down at the end), for the proxy modes' end-to-end tests."""
    stack = contextlib.ExitStack()
    made: dict[str | None, Cluster] = {}

    def get(proxy_mode: str | None = None) -> Cluster:
        if proxy_mode not in made:
            made[proxy_mode] = stack.enter_context(make_cluster(proxy_mode=proxy_mode, prefix="m"))
        return made[proxy_mode]

    with stack:
        yield get
