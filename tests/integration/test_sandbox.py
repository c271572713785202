"""Pod sandboxes on the real kernel: shared namespaces, restart, pod-to-pod traffic, teardown."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from netns import ns
from netns.images import UnknownImage, image_argv
from netns.lab import Lab
from netns.sandbox import Sandbox, SandboxError, destroy_many
from tests.integration.lab_fixtures import unique_pod
from tests.integration.netprobe import parse, probe

pytestmark = pytest.mark.netns


def _exited(pid: int) -> bool:
    """Gone, or a zombie waiting for its parent (this test process) to collect it."""
    return ns.proc_starttime(pid) is None or Path(f"/proc/{pid}/stat").read_text().split(") ")[1][0] == "Z"


def _run(sb: Sandbox, argv: list[str]) -> str:
    p = subprocess.run(sb.enter_argv(argv), capture_output=True, text=True, timeout=15)
    assert p.returncode == 0, p.stderr
    return p.stdout.strip()


def test_containers_share_ip_hostname_and_localhost(lab: Lab) -> None:
    name = unique_pod("two")
    ip = lab.add_pod(1, "default", name)  # container "main": kpx/echo on 8080
    sb = lab.pod("default", name)
    try:
        assert (
            sb.ip == ip
            and ip in ns.ip_json(["-4", "addr", "show", "eth0"], sb.netns)[0]["addr_info"][0]["local"]
        )
        side = subprocess.Popen(sb.enter_argv(["sleep", "30"]))
        try:
            # a second container sees the same hostname, the same eth0 IP, and reaches main on localhost
            assert _run(sb, ["hostname"]) == name
            assert f"inet {ip}/24" in _run(sb, ["ip", "-4", "-o", "addr", "show", "eth0"])
            line = parse(probe(sb.enter_argv([]), "tcp", "127.0.0.1"))
            assert line["pod"] == name and line["ip"] == ip and line["client"].startswith("127.0.0.1:")
            for pid in (sb.holder_pid, sb.container_pid("main"), side.pid):
                assert os.readlink(f"/proc/{pid}/ns/net") == os.readlink(f"/proc/{sb.holder_pid}/ns/net")
                assert os.readlink(f"/proc/{pid}/ns/uts") == os.readlink(f"/proc/{sb.holder_pid}/ns/uts")
                assert os.readlink(f"/proc/{pid}/ns/ipc") == os.readlink(f"/proc/{sb.holder_pid}/ns/ipc")
            assert os.readlink(f"/proc/{sb.holder_pid}/ns/net") != os.readlink("/proc/self/ns/net")
            # `ip netns exec` works on the bind mount
            assert ip in ns.run(["ip", "netns", "exec", sb.netns, "ip", "-4", "-o", "addr"]).stdout
        finally:
            side.kill()
            side.wait()
    finally:
        lab.delete_pod("default", name)


def test_container_restart_keeps_sandbox_and_ip(lab: Lab) -> None:
    name = unique_pod("rs")
    ip = lab.add_pod(2, "default", name)
    sb = lab.pod("default", name)
    try:
        first = sb.container_pid("main")
        assert first is not None
        sb.stop_container("main", grace=1)
        assert _exited(first), "the old container process is gone"
        assert sb.alive(), "the sandbox outlives its containers"
        sb.start_container("main", image_argv("kpx/echo"))
        sb.wait_listening(8080)
        assert sb.container_pid("main") != first
        again = Sandbox.load(lab, "default", name)
        assert again.ip == ip and again.container_pid("main") == sb.container_pid("main")
        client = lab.pod("default", name)
        assert parse(probe(client.enter_argv([]), "udp", ip))["ip"] == ip
    finally:
        sb.destroy()


@pytest.mark.parametrize("proto", ["tcp", "udp"])
def test_pod_to_pod_same_node_and_across_nodes(lab: Lab, proto: str) -> None:
    a, b, c = unique_pod("a"), unique_pod("b"), unique_pod("c")
    ip_a = lab.add_pod(1, "default", a)
    ip_b = lab.add_pod(1, "default", b)
    ip_c = lab.add_pod(2, "default", c)
    try:
        client = lab.pod("default", a)
        same = parse(probe(client.enter_argv([]), proto, ip_b))
        assert (
            same == {"pod": b, "ip": ip_b, "client": same["client"]} and same["client"].split(":")[0] == ip_a
        )
        cross = parse(probe(client.enter_argv([]), proto, ip_c))
        assert cross["pod"] == c and cross["client"].split(":")[0] == ip_a  # host-gw: no NAT on the way
        # the ext client reaches no pod (no route to pod CIDRs): only node IPs are outside-visible
        p = subprocess.run(
            ["nsenter", f"--net=/run/netns/{lab.ext_netns}", "--", sys.executable, "-I", "-c",
             f"import socket; socket.create_connection(('{ip_c}', 8080), timeout=1)"],
            capture_output=True, text=True,
        )  # fmt: skip
        assert p.returncode != 0
    finally:
        for n in (a, b, c):
            lab.delete_pod("default", n)


def test_destroy_removes_netns_veth_and_lease(lab: Lab) -> None:
    name = unique_pod("d")
    ip = lab.add_pod(1, "default", name)
    sb = lab.pod("default", name)
    node = lab.node(1)
    ipam = lab.ipam(1)
    assert ipam.leases()[ip] == f"default/{name}"
    assert sb.veth_host in {lk["ifname"] for lk in ns.ip_json(["link", "show"], node.netns)}
    holder, main = sb.holder_pid, sb.container_pid("main")
    sb.destroy()
    assert not ns.netns_exists(sb.netns)
    assert sb.veth_host not in {lk["ifname"] for lk in ns.ip_json(["link", "show"], node.netns)}
    assert ip not in ipam.leases()
    assert not Sandbox.record_path(lab.state_dir, sb.netns).exists()
    for pid in (holder, main):
        assert pid is not None and _exited(pid)
    sb.destroy()  # idempotent


def test_holder_is_tiny_and_adoptable(lab: Lab) -> None:
    names = [unique_pod("h") for _ in range(3)]
    sbs = [Sandbox.create(lab, 2, "default", n) for n in names]
    try:
        for sb in sbs:
            rss_kib = int(next(ln for ln in Path(f"/proc/{sb.holder_pid}/status").read_text().splitlines()
                               if ln.startswith("VmRSS:")).split()[1])  # fmt: skip
            assert rss_kib <= 2048
            assert Path(f"/proc/{sb.holder_pid}/comm").read_text().strip() == "kpx-holder"
        # a restarted agent finds them again from disk, alive
        adopted = {sb.pod: sb for sb in Sandbox.list(lab, "node2") if sb.pod in names}
        assert set(adopted) == set(names) and all(sb.alive() for sb in adopted.values())
        assert {sb.ip for sb in adopted.values()} == {sb.ip for sb in sbs}
    finally:
        destroy_many(sbs)
    assert not [sb for sb in Sandbox.list(lab, "node2") if sb.pod in names]
    assert not [n for n in names if ns.netns_exists(lab.pod_netns("default", n))]


def test_duplicate_sandbox_and_unknown_image(lab: Lab) -> None:
    name = unique_pod("dup")
    sb = Sandbox.create(lab, 1, "default", name)
    try:
        with pytest.raises(SandboxError, match="already exists"):
            Sandbox.create(lab, 1, "default", name)
        assert sb.alive()
    finally:
        sb.destroy()
    with pytest.raises(UnknownImage, match="not built in"):
        lab.add_pod(1, "default", unique_pod("img"), image="nginx:1.25")
    assert image_argv("docker.io/kpx/http:latest")[-1] == "--http"


def test_http_image_answers(lab: Lab) -> None:
    name = unique_pod("web")
    ip = lab.add_pod(2, "default", name, image="kpx/http", args=["--port", "8081"])
    client = unique_pod("cl")
    lab.add_pod(1, "default", client)
    try:
        code = (
            "import http.client,sys\n"
            "c=http.client.HTTPConnection(sys.argv[1],8081,timeout=3)\n"
            "for _ in range(2):\n"
            "    c.request('GET','/x'); r=c.getresponse(); print(r.status, r.read().decode().strip())\n"
        )
        out = _run(lab.pod("default", client), [sys.executable, "-I", "-c", code, ip]).splitlines()
        c_ip = lab.pod("default", client).ip
        assert len(out) == 2  # two requests on one keep-alive connection
        for line in out:
            status, rest = line.split(" ", 1)
            assert status == "200"
            got = parse(rest)
            assert got["pod"] == name and got["ip"] == ip and got["client"].split(":")[0] == c_ip
    finally:
        lab.delete_pod("default", name)
        lab.delete_pod("default", client)


def test_bridged_same_node_traffic_traverses_node_iptables(lab: Lab) -> None:
    """br_netfilter is on per node netns: a FORWARD rule in the node's iptables sees traffic
    between two pods on the same cni0 bridge (what kube-proxy relies on for hairpin and
    same-node Service traffic). Without bridge-nf-call-iptables the DROP would not apply."""
    a, b = unique_pod("bna"), unique_pod("bnb")
    ip_a = lab.add_pod(1, "default", a)
    ip_b = lab.add_pod(1, "default", b)
    node = lab.node(1)
    rule = ["FORWARD", "-s", ip_a, "-d", ip_b, "-p", "tcp", "--dport", "8080", "-j", "DROP"]
    rule += ["-m", "comment", "--comment", f"kpx-test-{a}"]
    try:
        client = lab.pod("default", a)
        assert parse(probe(client.enter_argv([]), "tcp", ip_b))["pod"] == b
        ns.run(ns.netns_argv(node.netns, ["iptables", "-I", *rule]))
        try:
            p = subprocess.run(
                client.enter_argv([sys.executable, "-I", "-c",
                                   f"import socket; socket.create_connection(('{ip_b}', 8080), timeout=1)"]),
                capture_output=True, text=True,
            )  # fmt: skip
            assert p.returncode != 0 and "timed out" in p.stderr
            # UDP is not matched by the tcp rule: still answered
            assert parse(probe(client.enter_argv([]), "udp", ip_b))["pod"] == b
        finally:
            ns.run(ns.netns_argv(node.netns, ["iptables", "-D", *rule]))
        assert parse(probe(client.enter_argv([]), "tcp", ip_b))["pod"] == b
    finally:
        lab.delete_pod("default", a)
        lab.delete_pod("default", b)


def test_destroy_kills_unrecorded_processes_in_the_pod(lab: Lab) -> None:
    """A process that joined the pod but never made it into the record (agent crashed right
    after starting it) must not keep the netns and its veth alive."""
    name = unique_pod("stray")
    sb = Sandbox.create(lab, 1, "default", name)
    stray = subprocess.Popen(sb.enter_argv(["sleep", "300"]))
    try:
        inode, deadline = ns.netns_inode(sb.netns), time.monotonic() + 10
        while os.stat(f"/proc/{stray.pid}/ns/net").st_ino != inode:  # nsenter has joined the pod
            assert time.monotonic() < deadline
            time.sleep(0.01)
        sb.destroy(grace=1)
        stray.wait(timeout=5)
        assert not ns.netns_exists(sb.netns)
        assert sb.veth_host not in {lk["ifname"] for lk in ns.ip_json(["link", "show"], lab.node(1).netns)}
    finally:
        if stray.poll() is None:
            stray.kill()
            stray.wait()


def test_hairpin_pod_reaches_itself_through_a_dnat_vip(lab: Lab) -> None:
    """What kube-proxy does for a pod that hits its own Service: DNAT in the node netns sends
    the packet back out of the same cni0 port (hairpin on) and MASQUERADE makes the reply come
    back through the node. Proves hairpin_mode + br_netfilter + forwarding in one packet."""
    name = unique_pod("hp")
    ip = lab.add_pod(1, "default", name)
    node = lab.node(1)
    vip = "10.96.250.250"
    tag = ["-m", "comment", "--comment", f"kpx-test-{name}"]
    dnat = [
        "PREROUTING",
        "-d",
        vip,
        "-p",
        "tcp",
        "--dport",
        "80",
        "-j",
        "DNAT",
        "--to-destination",
        f"{ip}:8080",
    ]
    masq = ["POSTROUTING", "-s", ip, "-d", ip, "-j", "MASQUERADE"]
    ns.run(ns.netns_argv(node.netns, ["iptables", "-t", "nat", "-A", *dnat, *tag]))
    ns.run(ns.netns_argv(node.netns, ["iptables", "-t", "nat", "-A", *masq, *tag]))
    try:
        got = parse(probe(lab.pod("default", name).enter_argv([]), "tcp", vip, 80))
        assert got["pod"] == name and got["ip"] == ip
        assert got["client"].split(":")[0] == node.bridge_ip  # masqueraded to cni0's address
    finally:
        ns.run(ns.netns_argv(node.netns, ["iptables", "-t", "nat", "-D", *dnat, *tag]))
        ns.run(ns.netns_argv(node.netns, ["iptables", "-t", "nat", "-D", *masq, *tag]))
        lab.delete_pod("default", name)


def test_add_pods_in_bulk(lab: Lab) -> None:
    names = [unique_pod("bulk") for _ in range(12)]
    ips = lab.add_pods(2, "default", names)
    try:
        assert list(ips) == names and len(set(ips.values())) == 12
        client = lab.pod("default", names[0])
        for n in (names[5], names[11]):
            assert parse(probe(client.enter_argv([]), "udp", ips[n]))["pod"] == n
        with pytest.raises(SandboxError, match="already exists"):
            lab.add_pods(2, "default", [unique_pod("new"), names[3]])  # one clash: nothing new stays
        assert {sb.pod for sb in Sandbox.list(lab, "node2")} & set(names) == set(names)
        assert len([sb for sb in Sandbox.list(lab, "node2") if sb.pod.startswith("new-")]) == 0
    finally:
        destroy_many([lab.pod("default", n) for n in names])


def test_holder_reports_each_sandbox_and_failures(lab: Lab) -> None:
    from netns.sandbox import holder_binary

    ok_path = ns.netns_path(lab.pod_netns("default", unique_pod("hb")))
    p = subprocess.run(
        [holder_binary(), ok_path, "hb", "/nonexistent-kpx-dir/x", "bad"], capture_output=True, text=True
    )
    ready, error = p.stdout.splitlines()
    pid = int(ready.split()[1])
    try:
        assert p.returncode == 1
        assert ready == f"ready {pid} {ok_path}"
        assert error.startswith("error /nonexistent-kpx-dir/x create: No such file or directory")
        assert Path(f"/proc/{pid}/comm").read_text().strip() == "kpx-holder"
        assert os.stat(ok_path).st_ino == os.stat(f"/proc/{pid}/ns/net").st_ino
    finally:
        os.kill(pid, 15)
        ns.netns_delete(os.path.basename(ok_path))
    assert not os.path.exists(ok_path)


def test_create_many_is_all_or_nothing(lab: Lab, monkeypatch: pytest.MonkeyPatch) -> None:
    names = [unique_pod("cm") for _ in range(3)]
    real = ns.configure_iface

    def fail_third(netns: str, *a, **k):  # type: ignore[no-untyped-def]
        if netns.endswith(names[2]):
            raise ns.NsError("injected")
        return real(netns, *a, **k)

    monkeypatch.setattr(ns, "configure_iface", fail_third)
    with pytest.raises(ns.NsError, match="injected"):
        Sandbox.create_many(lab, 1, [("default", n) for n in names])
    for n in names:
        assert not ns.netns_exists(lab.pod_netns("default", n))
        assert lab.ipam(1).lookup(f"default/{n}") is None
    assert not [sb for sb in Sandbox.list(lab, "node1") if sb.pod in names]
