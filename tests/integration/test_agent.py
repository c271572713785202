"""The node agent through the apiserver, on a real lab: pods as sandboxes, status, traffic,
restarts, probes, deletion and adoption by a restarted agent."""

from __future__ import annotations

import ipaddress
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from netns import ns
from netns.lab import Lab
from netns.sandbox import Sandbox, SandboxError, veth_name
from tests.integration.cluster_fixtures import Cluster, kpx, pod_ready, unique_name

pytestmark = pytest.mark.netns


def pod_ip(pod: dict) -> str:
    return pod["status"]["podIP"]


def fields(line: str) -> dict[str, str]:
    assert not line.startswith("ERROR"), line
    return dict(kv.split("=", 1) for kv in line.split())


def container_status(pod: dict, name: str = "main") -> dict:
    return next((c for c in (pod.get("status") or {}).get("containerStatuses") or [] if c["name"] == name), {})


def dead(pid: int) -> bool:
    """Gone, or a zombie waiting for its (non-kpx) parent to reap it."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            data = f.read()
    except OSError:
        return True
    return data[data.rfind(b")") + 2 :].split()[0] == b"Z"


def wait_event(cluster: Cluster, pod: str, reason: str, timeout: float = 10.0) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        items = cluster.request("GET", "/api/v1/namespaces/default/events")["items"]
        for e in items:
            if e["involvedObject"].get("name") == pod and e["reason"] == reason:
                return e
        assert time.monotonic() < deadline, f"no {reason} event for {pod}: {[e['reason'] for e in items][-10:]}"
        time.sleep(0.2)


def test_pod_status_fields_from_the_agent(cluster: Cluster) -> None:
    name = unique_name("st")
    cluster.create_pod(name, node="node2")
    pod = cluster.wait_ready(name)
    st = pod["status"]
    node2 = cluster.lab.node("node2")
    assert st["phase"] == "Running"
    assert st["hostIP"] == node2.ip and st["hostIPs"] == [{"ip": node2.ip}]
    assert st["podIPs"] == [{"ip": st["podIP"]}]
    assert ipaddress.ip_address(st["podIP"]) in ipaddress.ip_network(node2.pod_cidr)
    types = {c["type"]: c["status"] for c in st["conditions"]}
    assert types["Ready"] == "True" and types["ContainersReady"] == "True" and types["PodScheduled"] == "True"
    cs = container_status(pod)
    assert cs["ready"] is True and "running" in cs["state"] and cs["restartCount"] == 0
    assert Sandbox.load(cluster.lab, "default", name).ip == st["podIP"]


def test_two_containers_share_ip_hostname_and_localhost(cluster: Cluster) -> None:
    name = unique_name("two")
    cluster.create_pod(name, node="node1", containers=[
        {"name": "echo", "image": "kpx/echo", "readinessProbe": {"tcpSocket": {"port": 8080}, "periodSeconds": 1}},
        {"name": "web", "image": "kpx/http", "args": ["--port", "9090"],
         "readinessProbe": {"httpGet": {"port": 9090, "path": "/"}, "periodSeconds": 1}},
    ])
    pod = cluster.wait_ready(name)
    ip = pod_ip(pod)
    sb = Sandbox.load(cluster.lab, "default", name)
    pids = [sb.containers[c]["pid"] for c in ("echo", "web")]
    # Same network and UTS namespaces (one IP, one hostname = the pod name).
    assert len({os.stat(f"/proc/{p}/ns/net").st_ino for p in pids}) == 1
    assert len({os.stat(f"/proc/{p}/ns/uts").st_ino for p in pids}) == 1
    host = subprocess.run(sb.enter_argv(["hostname"]), capture_output=True, text=True, check=True).stdout.strip()
    assert host == name
    # localhost reaches the other container; the pod IP answers for both.
    assert fields(cluster.ask_from_pod(name, "tcp", "127.0.0.1", 8080))["ip"] == ip
    http = subprocess.run(sb.enter_argv([sys.executable, "-I", "-c",
                          "import urllib.request;print(urllib.request.urlopen('http://127.0.0.1:9090/').read().decode())"]),
                          capture_output=True, text=True, check=True).stdout
    assert fields(http.strip())["pod"] == name and fields(http.strip())["ip"] == ip


def test_pod_to_pod_same_node_and_across_nodes_tcp_udp(cluster: Cluster) -> None:
    a, b, c = unique_name("pa"), unique_name("pb"), unique_name("pc")
    cluster.create_pod(a, node="node1")
    cluster.create_pod(b, node="node1")
    cluster.create_pod(c, node="node2")
    ips = {n: pod_ip(cluster.wait_ready(n)) for n in (a, b, c)}
    for dst in (b, c):
        for proto in ("tcp", "udp"):
            got = fields(cluster.ask_from_pod(a, proto, ips[dst], 8080))
            assert got["pod"] == dst and got["ip"] == ips[dst]
            assert got["client"].split(":")[0] == ips[a]  # no NAT between pods
    # and back from node2 to node1
    assert fields(cluster.ask_from_pod(c, "udp", ips[a], 8080))["client"].split(":")[0] == ips[c]


def test_container_restart_keeps_sandbox_and_ip(cluster: Cluster) -> None:
    name = unique_name("rs")
    cluster.create_pod(name, node="node1")
    pod = cluster.wait_ready(name)
    ip = pod_ip(pod)
    sb = Sandbox.load(cluster.lab, "default", name)
    holder, pid = sb.holder_pid, sb.containers["main"]["pid"]
    os.kill(pid, signal.SIGKILL)
    pod = cluster.wait_pod(name, lambda p: container_status(p).get("restartCount", 0) >= 1 and pod_ready(p),
                           what="restarted and Ready")
    cs = container_status(pod)
    assert cs["lastState"]["terminated"]["exitCode"] == 137
    assert pod_ip(pod) == ip
    sb2 = Sandbox.load(cluster.lab, "default", name)
    assert sb2.holder_pid == holder and sb2.ip == ip and sb2.containers["main"]["pid"] != pid
    assert fields(cluster.ask_from_pod(name, "tcp", ip, 8080))["pod"] == name


def test_restart_policy_never_leaves_pod_failed(cluster: Cluster) -> None:
    name = unique_name("nv")
    cluster.create_pod(name, node="node2", command=["sh", "-c", "exit 3"], restartPolicy="Never")
    pod = cluster.wait_pod(name, lambda p: p["status"].get("phase") == "Failed", what="phase Failed")
    t = container_status(pod)["state"]["terminated"]
    assert t["exitCode"] == 3 and t["reason"] == "Error"


def test_unknown_image_is_a_clear_failure(cluster: Cluster) -> None:
    name = unique_name("img")
    cluster.create_pod(name, node="node1", image="nginx:1.27", probe=False)
    pod = cluster.wait_pod(name, lambda p: "waiting" in (container_status(p).get("state") or {})
                           and container_status(p)["state"]["waiting"]["reason"] == "ErrImagePull",
                           what="ErrImagePull")
    w = container_status(pod)["state"]["waiting"]
    assert "nginx:1.27" in w["message"] and "kpx/echo" in w["message"]
    assert not pod_ready(pod)
    # and a Warning event, as kubelet posts, so `kubectl describe pod` says why
    ev = wait_event(cluster, name, "Failed")
    assert ev["type"] == "Warning" and "nginx:1.27" in ev["message"] and ev["source"]["host"] == "node1"
    assert ev["involvedObject"]["uid"] == pod["metadata"]["uid"]


def test_readiness_probes_drive_ready(cluster: Cluster, tmp_path: Path) -> None:
    flag = tmp_path / "ready"
    name = unique_name("pr")
    cluster.create_pod(name, node="node2", containers=[{
        "name": "main", "image": "kpx/echo",
        "readinessProbe": {"exec": {"command": ["test", "-f", str(flag)]}, "periodSeconds": 1, "failureThreshold": 1},
    }])
    cluster.wait_pod(name, lambda p: container_status(p).get("started") is True, what="started")
    time.sleep(1.5)
    assert not pod_ready(cluster.get_pod(name))
    flag.write_text("")
    cluster.wait_ready(name)
    flag.unlink()
    cluster.wait_pod(name, lambda p: not pod_ready(p), what="NotReady again")
    assert wait_event(cluster, name, "Unhealthy")["message"].startswith("Readiness probe failed")
    # an httpGet probe against a port nobody serves never turns Ready
    bad = unique_name("pb")
    cluster.create_pod(bad, node="node2", containers=[{
        "name": "main", "image": "kpx/echo",
        "readinessProbe": {"httpGet": {"port": 9999, "path": "/"}, "periodSeconds": 1}}])
    cluster.wait_pod(bad, lambda p: container_status(p).get("started") is True, what="started")
    time.sleep(1.5)
    assert not pod_ready(cluster.get_pod(bad))


def test_delete_removes_netns_veth_and_releases_ip(cluster: Cluster) -> None:
    name = unique_name("del")
    cluster.create_pod(name, node="node2")
    pod = cluster.wait_ready(name)
    ip = pod_ip(pod)
    lab = cluster.lab
    netns = lab.pod_netns("default", name)
    veth = veth_name(lab.name, "default", name)
    node = lab.node("node2")
    assert ns.netns_exists(netns)
    assert any(link["ifname"] == veth for link in ns.ip_json(["link", "show"], node.netns))
    assert lab.ipam(node).leases().get(ip) == f"default/{name}"
    sb = Sandbox.load(lab, "default", name)
    pids = [sb.holder_pid, sb.containers["main"]["pid"]]
    cluster.delete_pod(name)  # graceful: the agent stops containers, removes the sandbox, confirms
    assert not ns.netns_exists(netns)
    assert not any(link["ifname"] == veth for link in ns.ip_json(["link", "show"], node.netns))
    assert ip not in lab.ipam(node).leases()
    assert all(dead(p) for p in pids)
    with pytest.raises(SandboxError):
        Sandbox.load(lab, "default", name)


def test_second_agent_for_a_node_is_refused(cluster: Cluster) -> None:
    lab = cluster.lab
    state = Path(lab.state_dir) / "nodes" / "node1"
    p = subprocess.run(ns.netns_argv(lab.node("node1").netns, [
        sys.executable, "-m", "kpx", "node", "--kubeconfig", str(Path(lab.state_dir) / "node-kubeconfig"),
        "--node-name", "node1", "--lab", lab.name, "--state-dir", str(state)]),
        capture_output=True, text=True, timeout=30)
    assert p.returncode != 0
    assert p.stderr.count("\n") == 1 and "already running" in p.stderr and "Traceback" not in p.stderr


def _restart_agent(cluster: Cluster, node: str) -> None:
    from netns.up import kpx_argv, spawn

    lab = Lab.load(cluster.name)
    n = lab.node(node)
    spawn(lab, f"node/{n.name}", kpx_argv(
        "node", "--kubeconfig", str(Path(lab.state_dir) / "node-kubeconfig"), "--node-name", n.name,
        "--node-ip", n.ip, "--lab", lab.name, "--state-dir", str(Path(lab.state_dir) / "nodes" / n.name)),
        netns=n.netns)


def _agent_pid(cluster: Cluster, node: str) -> int:
    recs = [r for r in Lab.load(cluster.name).processes() if r.get("role") == f"node/{node}"
            and ns.proc_is(r["pid"], r["start"])]
    assert len(recs) == 1, recs
    return int(recs[0]["pid"])


def test_restarted_agent_adopts_without_duplicates_orphans_or_ip_reuse(cluster: Cluster) -> None:
    lab = cluster.lab
    keep, gone = unique_name("ad"), unique_name("ag")
    for n in (keep, gone):
        cluster.create_pod(n, node="node1")
    before = {n: cluster.wait_ready(n) for n in (keep, gone)}
    sb_keep = Sandbox.load(lab, "default", keep)
    agent = _agent_pid(cluster, "node1")
    os.kill(agent, signal.SIGKILL)
    while ns.proc_starttime(agent) is not None:
        time.sleep(0.05)
    # While the agent is down: the pods keep serving, and one pod is force-deleted from the API.
    assert fields(cluster.ask_from_pod(keep, "tcp", pod_ip(before[keep]), 8080))["pod"] == keep
    cluster.delete_pod(gone, grace=0)
    netns_before = sorted(n for n in ns.list_netns() if n.startswith(f"kpx-{lab.name}-default-"))
    _restart_agent(cluster, "node1")
    # The orphan's sandbox goes, its IP is released; the kept pod is the same sandbox and process.
    deadline = time.monotonic() + 30
    while ns.netns_exists(lab.pod_netns("default", gone)):
        assert time.monotonic() < deadline, "orphan sandbox not removed by the restarted agent"
        time.sleep(0.1)
    assert pod_ip(before[gone]) not in lab.ipam("node1").leases()
    sb_now = Sandbox.load(lab, "default", keep)
    assert (sb_now.holder_pid, sb_now.ip, sb_now.containers["main"]["pid"]) == (
        sb_keep.holder_pid, sb_keep.ip, sb_keep.containers["main"]["pid"])
    pod = cluster.wait_ready(keep)
    assert pod_ip(pod) == pod_ip(before[keep]) and container_status(pod)["restartCount"] == 0
    netns_after = sorted(n for n in ns.list_netns() if n.startswith(f"kpx-{lab.name}-default-"))
    assert set(netns_after) == set(netns_before) - {lab.pod_netns("default", gone)}
    # A new pod on that node gets a fresh IP (neither a live nor the just-released one).
    new = unique_name("an")
    cluster.create_pod(new, node="node1")
    ip_new = pod_ip(cluster.wait_ready(new))
    assert ip_new not in (pod_ip(before[keep]), pod_ip(before[gone]))
    # The adopted container is still watched: killing it restarts it.
    os.kill(sb_keep.containers["main"]["pid"], signal.SIGKILL)
    cluster.wait_pod(keep, lambda p: container_status(p).get("restartCount", 0) >= 1 and pod_ready(p),
                     what="adopted container restarted")


def test_kpx_exec_into_node_and_pod(cluster: Cluster) -> None:
    name = unique_name("ex")
    cluster.create_pod(name, node="node2")
    ip = pod_ip(cluster.wait_ready(name))
    p = kpx("exec", "--lab", cluster.name, f"pod/default/{name}", "--", "ip", "-4", "-o", "addr", "show", "eth0")
    assert p.returncode == 0 and f"{ip}/" in p.stdout
    p = kpx("exec", "--lab", cluster.name, "node/node2", "--", "ip", "-4", "-o", "addr", "show", "eth0")
    assert p.returncode == 0 and cluster.lab.node("node2").ip in p.stdout
    p = kpx("exec", "--lab", cluster.name, "pod/default/no-such-pod", "--", "true")
    assert p.returncode == 1 and p.stderr.count("\n") == 1 and "no pod default/no-such-pod" in p.stderr


def test_host_gw_routes_follow_node_objects(cluster: Cluster) -> None:
    lab = cluster.lab
    name = unique_name("fake").replace("-", "")
    via = str(ipaddress.ip_network(lab.subnet).network_address + 150)
    cidr = "10.244.150.0/24"
    cluster.request("POST", "/api/v1/nodes", {"apiVersion": "v1", "kind": "Node", "metadata": {"name": name},
                                              "spec": {"podCIDR": cidr, "podCIDRs": [cidr]}})
    try:
        cluster.request("PATCH", f"/api/v1/nodes/{name}/status",
                        {"status": {"addresses": [{"type": "InternalIP", "address": via}]}})

        def routes(node: str) -> dict[str, str]:
            return {r["dst"]: r.get("gateway", "") for r in ns.ip_json(["route", "show", "proto", "static"],
                                                                       lab.node(node).netns)}

        deadline = time.monotonic() + 10
        while not all(routes(n.name).get(cidr) == via for n in lab.nodes):
            assert time.monotonic() < deadline, f"route {cidr} via {via} not programmed: {routes('node1')}"
            time.sleep(0.1)
        # each node also routes to the other real node, never to itself
        assert routes("node1").get(lab.node("node2").pod_cidr) == lab.node("node2").ip
        assert lab.node("node1").pod_cidr not in routes("node1")
    finally:
        cluster.request("DELETE", f"/api/v1/nodes/{name}")
    deadline = time.monotonic() + 10
    while any(cidr in routes(n.name) for n in lab.nodes):
        assert time.monotonic() < deadline, "route to a deleted Node's podCIDR was not removed"
        time.sleep(0.1)


def test_graceful_deletion_waits_the_grace_period_then_kills(cluster: Cluster) -> None:
    name = unique_name("gr")
    ignore_term = "import signal,time; signal.signal(signal.SIGTERM, signal.SIG_IGN); print('up', flush=True); time.sleep(600)"
    cluster.create_pod(name, node="node2", command=[sys.executable, "-c", ignore_term], terminationGracePeriodSeconds=2)
    cluster.wait_pod(name, lambda p: container_status(p).get("started") is True, what="started")
    pid = Sandbox.load(cluster.lab, "default", name).containers["main"]["pid"]
    cluster.request("DELETE", f"/api/v1/namespaces/default/pods/{name}")
    # Terminating: still there with a deletionTimestamp while the container ignores SIGTERM
    pod = cluster.get_pod(name)
    assert pod["metadata"].get("deletionTimestamp") and pod["metadata"]["deletionGracePeriodSeconds"] == 2
    time.sleep(1.0)
    assert not dead(pid), "killed before the grace period ended"
    cluster.delete_pod(name, timeout=15)  # waits until the agent confirmed (SIGKILL after 2 s)
    assert dead(pid)
    assert not ns.netns_exists(cluster.pod_netns(name))
