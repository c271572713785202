"""userspace mode end to end: `kpx up --proxy-mode userspace` (apiserver, 2 node agents, one
`kpx proxy --proxy-mode userspace` per node netns), real pods and Services, real packets.

The userspace divergences are asserted: the backend sees the node (the proxy), and a proxy
restart ends the connections it was relaying (the proxy process owns them), while new
connections are refused only while the restart runs.
"""

from __future__ import annotations

import os
import signal
import subprocess
import textwrap
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest

from tests.integration.cluster_fixtures import Cluster, make_cluster, unique_name
from tests.integration.test_userspace_lab import answer, probe, run_in

pytestmark = pytest.mark.netns
SERVICE_CIDR = "10.96.0.0/12"


class E2E:
    def __init__(self, c: Cluster, app: str, backends: dict[str, str], clients: dict[str, str]) -> None:
        self.c, self.app, self.backends, self.clients = c, app, backends, clients

    def pod(self, name: str) -> list[str]:
        return ["ip", "netns", "exec", self.c.pod_netns(name)]

    def node_addrs(self, i: int) -> set[str]:
        n = self.c.lab.nodes[i]
        return {n.ip, n.bridge_ip}


@pytest.fixture(scope="module")
def e2e() -> Iterator[E2E]:
    with make_cluster(nodes=2, proxy_mode="userspace", prefix="us") as c:
        for n in c.lab.nodes:  # a real node's default route (for the node's own Service traffic)
            subprocess.run(["ip", "netns", "exec", n.netns, "ip", "route", "replace", SERVICE_CIDR, "dev", "eth0"],
                           check=True)
        app = unique_name("usweb")
        layout = {f"{app}-a": "node1", f"{app}-b": "node2", f"{app}-c": "node2"}
        for pod, node in layout.items():
            c.create_pod(pod, node=node, labels={"app": app})
        clients = {"node1": unique_name("uscl1"), "node2": unique_name("uscl2")}
        for node, pod in clients.items():
            c.create_pod(pod, node=node, labels={"app": pod})
        for pod in [*layout, *clients.values()]:
            c.wait_ready(pod)
        yield E2E(c, app, {p: str(c.get_pod(p)["status"]["podIP"]) for p in layout}, clients)


def service(e: E2E, name: str, selector: dict[str, str], proto: str = "TCP", **spec: Any) -> dict[str, Any]:
    ports = [{"name": "p", "port": 80, "targetPort": 8080, "protocol": proto}]
    typ = spec.pop("type", "ClusterIP")
    return e.c.create_service(name, selector, ports, type=typ, **spec)


def wait_answered(prefix: list[str], proto: str, ip: str, port: int, ok: Any = None, timeout: float = 30) -> str:
    deadline = time.monotonic() + timeout
    last = ""
    while time.monotonic() < deadline:
        last = probe(prefix, proto, ip, port, timeout=1.0)[0]
        if (ok or (lambda x: not x.startswith("ERR")))(last):
            return last
        time.sleep(0.2)
    raise AssertionError(f"{proto} {ip}:{port}: {last}")


@pytest.mark.parametrize("proto", ["TCP", "UDP"])
def test_clusterip_both_nodes_backend_sees_the_node(e2e: E2E, proto: str) -> None:
    cip = service(e2e, unique_name("uscip"), {"app": e2e.app}, proto)["spec"]["clusterIP"]
    for i, client in enumerate(e2e.clients.values()):
        wait_answered(e2e.pod(client), proto.lower(), cip, 80)
        got = [answer(x) for x in probe(e2e.pod(client), proto.lower(), cip, 80, n=30)]
        assert {g["pod"] for g in got} == set(e2e.backends)
        assert {g["client"].rsplit(":", 1)[0] for g in got} <= e2e.node_addrs(i)


def test_nodeport_from_ext(e2e: E2E) -> None:
    s = service(e2e, unique_name("usnp"), {"app": e2e.app}, type="NodePort")
    np_ = s["spec"]["ports"][0]["nodePort"]
    ext = ["ip", "netns", "exec", e2e.c.lab.ext_netns]
    for i, n in enumerate(e2e.c.lab.nodes):
        got = answer(wait_answered(ext, "tcp", n.ip, np_))
        assert got["pod"] in e2e.backends and got["client"].rsplit(":", 1)[0] in e2e.node_addrs(i)


def test_no_endpoints_refused_then_served_when_a_pod_matches(e2e: E2E) -> None:
    label = unique_name("usnone")
    cip = service(e2e, label, {"app": label})["spec"]["clusterIP"]
    client = e2e.pod(e2e.clients["node1"])
    wait_answered(client, "tcp", cip, 80, ok=lambda x: x == "ERR ECONNREFUSED")
    e2e.c.create_pod(label, node="node2", labels={"app": label})
    e2e.c.wait_ready(label)
    assert answer(wait_answered(client, "tcp", cip, 80))["pod"] == label


def test_deleted_backend_gets_no_new_connections(e2e: E2E) -> None:
    label = unique_name("usdel")
    pods = [f"{label}-1", f"{label}-2"]
    for p in pods:
        e2e.c.create_pod(p, node="node2", labels={"app": label})
    for p in pods:
        e2e.c.wait_ready(p)
    cip = service(e2e, label, {"app": label})["spec"]["clusterIP"]
    client = e2e.pod(e2e.clients["node1"])
    wait_answered(client, "tcp", cip, 80)
    e2e.c.delete_pod(pods[0])
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        seen = {answer(x)["pod"] for x in probe(client, "tcp", cip, 80, n=6)}
        if seen == {pods[1]}:
            break
        time.sleep(0.3)
    assert seen == {pods[1]}


RESTART_CLIENT = textwrap.dedent(
    """
    import socket, sys, time
    ip, secs = sys.argv[1], float(sys.argv[2])
    long = socket.create_connection((ip, 80), timeout=5)
    long.sendall(b"x\\n"); long.recv(4096)
    print("connected", flush=True)
    end = time.monotonic() + secs
    while time.monotonic() < end:
        t = time.time()
        try:
            s = socket.create_connection((ip, 80), timeout=2)
            s.sendall(b"hi\\n"); ok = s.recv(4096).startswith(b"pod=")
            s.close()
        except OSError:
            ok = False
        print(f"{t:.4f} {int(ok)}", flush=True)
        time.sleep(0.02)
    try:
        long.sendall(b"y\\n"); print("long", "ok" if long.recv(4096) else "closed", flush=True)
    except OSError:
        print("long closed", flush=True)
    """
)


def test_proxy_restart_refuses_only_while_restarting(e2e: E2E) -> None:
    from netns.up import kpx_argv, node_kubeconfig_path, spawn

    cip = service(e2e, unique_name("usrst"), {"app": e2e.app})["spec"]["clusterIP"]
    client = e2e.pod(e2e.clients["node1"])
    wait_answered(client, "tcp", cip, 80)
    out: list[str] = []
    t = threading.Thread(target=lambda: out.extend(run_in(client, RESTART_CLIENT, cip, 8, timeout=60)))
    t.start()
    time.sleep(1.5)
    n = e2e.c.lab.nodes[0]
    role = f"proxy/{n.name}"
    began = time.time()
    pid = int(e2e.c.up_state()["components"][role])
    os.kill(pid, signal.SIGKILL)
    while not _gone(pid):
        time.sleep(0.02)
    argv = kpx_argv("proxy", "--proxy-mode", "userspace", "--kubeconfig", str(node_kubeconfig_path(e2e.c.lab)),
                    "--hostname-override", n.name, "--cluster-cidr", e2e.c.lab.pod_cidr)
    p = spawn(e2e.c.lab, role, argv, netns=n.netns)
    _record(e2e, role, p.pid)
    deadline = time.monotonic() + 60
    while _last_sync(n.netns) < began and time.monotonic() < deadline:  # the restart ends with its first sync
        time.sleep(0.05)
    ended = time.time()
    t.join()
    samples = [(float(a), b == "1") for a, b in (x.split() for x in out if x[0].isdigit())]
    failed = [ts for ts, ok in samples if not ok]
    assert failed, "SIGKILL of the only proxy must interrupt service for a moment"
    # one window of refusals, inside the restart (kill .. first sync of the new proxy)
    assert all(began <= ts <= ended for ts in failed), (began, ended, failed)
    window = [ok for ts, ok in samples if failed[0] <= ts <= failed[-1]]
    assert not any(window), "refusals came and went: more than one window"
    assert samples[-1][1]
    assert out[-1] == "long closed"  # userspace: the killed proxy owned the established connection


def _last_sync(netns: str) -> float:
    p = subprocess.run(["ip", "netns", "exec", netns, "curl", "-s", "-m", "1", "http://127.0.0.1:10249/metrics"],
                       capture_output=True, text=True)
    for line in p.stdout.splitlines():
        if line.startswith("kubeproxy_sync_proxy_rules_last_timestamp_seconds "):
            return float(line.split()[1])
    return 0.0


def _gone(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(")")[-1].split()[0] == "Z"
    except OSError:
        return True


def _record(e2e: E2E, role: str, pid: int) -> None:
    import json
    from pathlib import Path

    path = Path(e2e.c.lab.state_dir) / "up.json"
    st = json.loads(path.read_text())
    st["components"][role] = pid
    path.write_text(json.dumps(st))


