"""`kpx proxy` as `kpx up` runs it (iptables mode, one per node netns), seen from outside:
UDP traffic survives a server pod cycle (the conntrack reconciler removes the flow pinned to the
dead pod, upstream e2e "should be able to preserve UDP traffic when server pod cycles for a
ClusterIP service"), and the node-netns servers answer on upstream's ports (10249, 10256).
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Iterator
from typing import Any

import pytest

from tests.integration.cluster_fixtures import make_cluster, unique_name

pytestmark = pytest.mark.netns

# A UDP client that always uses the same source port, like a long-lived statsd/DNS client.
UDP_FIXED_SPORT = (
    "import socket,sys\n"
    "s=socket.socket(socket.AF_INET,socket.SOCK_DGRAM); s.settimeout(1)\n"
    "s.setsockopt(socket.SOL_SOCKET,socket.SO_REUSEADDR,1); s.bind(('',40123))\n"
    "s.sendto(b'hello\\n',(sys.argv[1],int(sys.argv[2])))\n"
    "try:\n    print(s.recv(4096).decode().strip())\nexcept OSError as e:\n    print('ERROR',e)\n"
)


@pytest.fixture(scope="module")
def cluster() -> Iterator[Any]:
    with make_cluster(nodes=2, proxy_mode="iptables", prefix="pcl") as c:
        yield c


def alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/status") as f:
            return "zombie" not in f.read().lower()
    except OSError:
        return False


def udp_fixed(cluster: Any, pod: str, ip: str, port: int) -> str:
    netns = cluster.pod_netns(pod)
    p = subprocess.run(["ip", "netns", "exec", netns, sys.executable, "-I", "-c", UDP_FIXED_SPORT, ip, str(port)],
                       capture_output=True, text=True, timeout=15)
    return p.stdout.strip() or p.stderr.strip()


def wait_answer(cluster: Any, pod: str, ip: str, port: int, want: str, timeout: float = 20.0) -> str:
    deadline = time.monotonic() + timeout
    line = ""
    while time.monotonic() < deadline:
        line = udp_fixed(cluster, pod, ip, port)
        if line.startswith(f"pod={want} "):
            return line
        time.sleep(0.2)
    raise AssertionError(f"no answer from {want} via {ip}:{port} in {timeout}s; last: {line}")


def test_udp_flow_follows_the_server_pod_when_it_cycles(cluster: Any) -> None:
    a, b, client, svc = unique_name("udpa"), unique_name("udpb"), unique_name("udpc"), unique_name("udps")
    cluster.create_pod(a, node="node1", labels={"app": svc})
    cluster.create_pod(client, node="node2")
    cluster.wait_ready(a)
    cluster.wait_ready(client)
    s = cluster.create_service(svc, {"app": svc}, [{"name": "u", "port": 53, "targetPort": 8080, "protocol": "UDP"}])
    cip = s["spec"]["clusterIP"]
    wait_answer(cluster, client, cip, 53, a)
    # the server pod is replaced; the client keeps its source port, so its conntrack flow would
    # keep going to the dead pod's IP without the reconciler
    cluster.delete_pod(a)
    cluster.create_pod(b, node="node1", labels={"app": svc})
    cluster.wait_ready(b)
    line = wait_answer(cluster, client, cip, 53, b)
    assert ":40123" in line  # the same client flow (source port) reached the new pod
    node2 = cluster.lab.nodes[1].netns
    metrics = subprocess.run(["ip", "netns", "exec", node2, sys.executable, "-c",
                              "import urllib.request;print(urllib.request.urlopen("
                              "'http://127.0.0.1:10249/metrics',timeout=5).read().decode())"],
                             capture_output=True, text=True, timeout=30).stdout
    deleted = [ln for ln in metrics.splitlines()
               if ln.startswith('kubeproxy_conntrack_reconciler_deleted_entries_total{ip_family="IPv4"}')]
    assert deleted and float(deleted[0].split()[-1]) >= 1


def test_node_servers_on_upstream_ports(cluster: Any) -> None:
    n1 = cluster.lab.nodes[0]
    code = (
        "import json,urllib.request,sys\n"
        "h=urllib.request.urlopen(f'http://{sys.argv[1]}:10256/healthz',timeout=5)\n"
        "print(json.dumps({'code':h.status,'body':json.loads(h.read()),"
        "'mode':urllib.request.urlopen('http://127.0.0.1:10249/proxyMode',timeout=5).read().decode()}))\n"
    )
    p = subprocess.run(["ip", "netns", "exec", n1.netns, sys.executable, "-c", code, n1.ip],
                       capture_output=True, text=True, timeout=30)
    assert p.returncode == 0, p.stderr
    doc = json.loads(p.stdout)
    assert doc["code"] == 200 and doc["body"]["nodeEligible"] is True and doc["mode"] == "iptables"


def test_rules_survive_a_proxy_stop_and_a_flush_is_repaired(cluster: Any, tmp_path: Any) -> None:
    """kube-proxy semantics: stopping the proxy leaves the data plane as it is; a restarted proxy
    (the real CLI, here with a 2 s sync period) notices a flushed nat table through its canary
    check and repairs it with a full resync."""
    import os
    import signal

    from netns.up import node_kubeconfig_path

    pod, svc = unique_name("flush"), unique_name("flushs")
    cluster.create_pod(pod, node="node1", labels={"app": svc})
    cluster.wait_ready(pod)
    s = cluster.create_service(svc, {"app": svc}, [{"name": "t", "port": 80, "targetPort": 8080}], type="NodePort")
    node_port = s["spec"]["ports"][0]["nodePort"]
    n1 = cluster.lab.nodes[0]
    assert cluster.ask_from_ext("tcp", n1.ip, node_port, retry=20).startswith(f"pod={pod} ")
    old = cluster.component_pid("proxy/node1")
    os.kill(old, signal.SIGTERM)
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline and alive(old):
        time.sleep(0.1)
    # no proxy on node1 now, yet its rules still carry traffic
    assert cluster.ask_from_ext("tcp", n1.ip, node_port).startswith(f"pod={pod} ")
    log = open(tmp_path / "proxy.log", "wb")  # noqa: SIM115 - closed in finally
    proc = subprocess.Popen(
        ["ip", "netns", "exec", n1.netns, sys.executable, "-m", "kpx", "proxy", "--proxy-mode", "iptables",
         "--kubeconfig", str(node_kubeconfig_path(cluster.lab)), "--hostname-override", "node1",
         "--cluster-cidr", cluster.lab.pod_cidr, "--iptables-sync-period", "2s", "--iptables-min-sync-period", "100ms"],
        stdout=log, stderr=log, stdin=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 30
        while "sync ok kind=full" not in (tmp_path / "proxy.log").read_text():
            assert proc.poll() is None and time.monotonic() < deadline, (tmp_path / "proxy.log").read_text()
            time.sleep(0.2)
        for ipt in ("iptables-nft", "iptables-legacy"):
            subprocess.run(["ip", "netns", "exec", n1.netns, ipt, "-t", "nat", "-F"], capture_output=True)
        deadline = time.monotonic() + 30
        while "forcing a full resync" not in (tmp_path / "proxy.log").read_text():
            assert time.monotonic() < deadline, (tmp_path / "proxy.log").read_text()
            time.sleep(0.2)
        assert cluster.ask_from_ext("tcp", n1.ip, node_port, retry=20).startswith(f"pod={pod} ")
    finally:
        proc.terminate()
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)
        log.close()
