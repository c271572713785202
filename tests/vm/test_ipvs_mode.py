"""The IPVS mode on a real IPVS kernel (inside the VM): programmed with netlink, proven with real
packets from a pod-like client, the node itself and an outside client, cross-checked with ipvsadm."""

import socket
import subprocess
import sys
import textwrap
import time
import uuid
from dataclasses import replace

import pytest

from netns.ns import in_netns, netns_add, netns_delete
from proxy.model import Endpoint, ProxyConfig, ProxyState, ServicePort, ServicePortName
from proxy.modes.ipvs import IpvsMode

pytestmark = pytest.mark.vm

ECHO = textwrap.dedent("""
    import socket, sys, threading
    name = sys.argv[1]
    def serve(c, a):
        with c:
            f = c.makefile("rwb", buffering=0)
            for line in f:
                f.write(f"pod={name} client={a[0]}:{a[1]}\\n".encode())
    s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind(("0.0.0.0", 8080)); s.listen(128)
    while True:
        threading.Thread(target=serve, args=s.accept(), daemon=True).start()
""")


def sh(cmd):
    return subprocess.run(["bash", "-c", cmd], check=True, capture_output=True, text=True).stdout


class Topo:
    """node netns with two backends (b1, b2), a pod-like client (pc, in the cluster CIDR) and an
    outside client (ext) on the node's underlay address."""

    def __init__(self, tmp_path):
        t = uuid.uuid4().hex[:5]
        self.node, self.b1, self.b2, self.pc, self.ext = (f"kpx-vm{t}-{n}" for n in ("node", "b1", "b2", "pc", "ext"))
        self.all = [self.node, self.b1, self.b2, self.pc, self.ext]
        self.procs = []
        netns_add(self.all)
        links = [(self.b1, "10.244.1", "v1"), (self.b2, "10.244.2", "v2"), (self.pc, "10.244.9", "v9")]
        cmds = [f"ip -n {n} link set lo up" for n in self.all]
        for ns, net, dev in links:
            cmds += [f"ip -n {self.node} link add {dev} type veth peer name eth0 netns {ns}",
                     f"ip -n {self.node} addr add {net}.1/24 dev {dev}", f"ip -n {self.node} link set {dev} up",
                     f"ip -n {ns} addr add {net}.2/24 dev eth0", f"ip -n {ns} link set eth0 up",
                     f"ip -n {ns} route add default via {net}.1"]
        cmds += [f"ip -n {self.node} link add eth0 type veth peer name eth0 netns {self.ext}",
                 f"ip -n {self.node} addr add 192.168.56.11/24 dev eth0", f"ip -n {self.node} link set eth0 up",
                 f"ip -n {self.ext} addr add 192.168.56.200/24 dev eth0", f"ip -n {self.ext} link set eth0 up",
                 f"ip netns exec {self.node} sysctl -qw net.ipv4.ip_forward=1"]
        sh("; ".join(cmds))
        script = tmp_path / "echo.py"
        script.write_text(ECHO)
        for ns, name in ((self.b1, "b1"), (self.b2, "b2")):
            self.procs.append(subprocess.Popen(["ip", "netns", "exec", ns, sys.executable, str(script), name]))
        for ip in ("10.244.1.2", "10.244.2.2"):
            self.wait_port(self.node, ip, 8080)

    def wait_port(self, ns, ip, port, deadline=30.0):
        end = time.monotonic() + deadline
        while time.monotonic() < end:
            try:
                self.ask(ns, ip, port, timeout=1)
                return
            except OSError:
                time.sleep(0.2)
        raise AssertionError(f"{ip}:{port} never answered from {ns}")

    def connect(self, ns, ip, port, timeout=3.0):
        return in_netns(ns, lambda: socket.create_connection((ip, port), timeout=timeout))

    def ask(self, ns, ip, port, timeout=3.0):
        s = self.connect(ns, ip, port, timeout)
        with s:
            return converse(s)

    def close(self):
        for p in self.procs:
            p.kill()
            p.wait()
        for n in self.all:
            netns_delete(n)


def converse(s):
    s.sendall(b"hi\n")
    data = b""
    while not data.endswith(b"\n"):
        chunk = s.recv(256)
        if not chunk:
            raise ConnectionError("closed")
        data += chunk
    return data.decode().strip()


@pytest.fixture
def topo(tmp_path):
    t = Topo(tmp_path)
    try:
        yield t
    finally:
        t.close()


CFG = ProxyConfig(node_name="node1", node_ips=("192.168.56.11",), cluster_cidr="10.244.0.0/16")
WEB = ServicePort(ServicePortName("default", "web", "http"), "10.96.0.20", 80, node_port=30080)
EMPTY = ServicePort(ServicePortName("default", "empty", "http"), "10.96.0.21", 80)
B1, B2 = Endpoint("10.244.1.2", 8080, node_name="node1"), Endpoint("10.244.2.2", 8080, node_name="node1")


def sync(topo, mode, state, prior):
    return in_netns(topo.node, lambda: mode.apply(mode.render(state, prior)))


def state(eps, svc=WEB, changed=None):
    return ProxyState(CFG, {svc.name: svc, EMPTY.name: EMPTY}, {svc.name: eps, EMPTY.name: ()}, changed)


def test_clusterip_nodeport_and_no_endpoints(topo):
    mode = IpvsMode(CFG)
    sync(topo, mode, state((B1, B2)), None)
    listing = sh(f"ip netns exec {topo.node} ipvsadm -Ln")
    assert "TCP  10.96.0.20:80 rr" in listing and "TCP  192.168.56.11:30080 rr" in listing
    assert listing.count("-> 10.244.1.2:8080") == 2 and "Masq" in listing
    addrs = sh(f"ip -n {topo.node} -4 -o addr show dev kube-ipvs0")
    assert "10.96.0.20/32" in addrs and "10.96.0.21/32" in addrs

    # pod -> ClusterIP: round robin over both backends, pod source IP preserved
    answers = [topo.ask(topo.pc, "10.96.0.20", 80) for _ in range(6)]
    assert {a.split()[0] for a in answers} == {"pod=b1", "pod=b2"}
    assert all("client=10.244.9.2:" in a for a in answers)
    # the node itself -> ClusterIP
    assert topo.ask(topo.node, "10.96.0.20", 80).startswith("pod=")
    # outside client -> NodePort (masqueraded: ETP=Cluster)
    a = topo.ask(topo.ext, "192.168.56.11", 30080)
    assert a.startswith("pod=") and "client=10.244." in a
    # a Service without endpoints refuses at once
    t0 = time.monotonic()
    with pytest.raises(ConnectionRefusedError):
        topo.ask(topo.pc, "10.96.0.21", 80, timeout=5)
    assert time.monotonic() - t0 < 2
    # a ClusterIP on a port it does not serve is rejected (KUBE-IPVS-FILTER)
    with pytest.raises(ConnectionRefusedError):
        topo.ask(topo.pc, "10.96.0.20", 22, timeout=5)


def test_affinity_pins_a_client(topo):
    mode = IpvsMode(CFG)
    sync(topo, mode, state((B1, B2), svc=replace(WEB, affinity_timeout=60)), None)
    assert "persistent 60" in sh(f"ip netns exec {topo.node} ipvsadm -Ln")
    assert len({topo.ask(topo.pc, "10.96.0.20", 80).split()[0] for _ in range(6)}) == 1


def test_removed_endpoint_drains_and_restart_keeps_connections(topo):
    mode = IpvsMode(CFG)
    prior = sync(topo, mode, state((B1, B2)), None)
    conns = [topo.connect(topo.pc, "10.96.0.20", 80) for _ in range(2)]
    owners = {converse(c).split()[0]: c for c in conns}
    assert set(owners) == {"pod=b1", "pod=b2"}
    # b2 goes: weight 0, its established connection keeps working, new ones go to b1
    prior = sync(topo, mode, state((B1,), changed=frozenset({WEB.name})), prior)
    assert any("10.244.2.2:8080" in line and " 0 " in line for line in sh(f"ip netns exec {topo.node} ipvsadm -Ln").splitlines())
    assert converse(owners["pod=b2"]).startswith("pod=b2")
    assert {topo.ask(topo.pc, "10.96.0.20", 80).split()[0] for _ in range(4)} == {"pod=b1"}
    # a restarted proxy (no prior) re-programs without breaking established connections
    restarted = IpvsMode(CFG)
    prior2 = sync(topo, restarted, state((B1,)), None)
    assert converse(owners["pod=b1"]).startswith("pod=b1")
    # once the drained connection closes, a sync deletes the real server
    owners["pod=b2"].close()
    owners["pod=b1"].close()
    deadline = time.monotonic() + 180
    while "10.244.2.2:8080" in sh(f"ip netns exec {topo.node} ipvsadm -Ln") and time.monotonic() < deadline:
        sh(f"ip netns exec {topo.node} ipvsadm -Lnc")  # visible for debugging in failures
        prior = sync(topo, mode, state((B1,), changed=frozenset()), prior)
        time.sleep(2)
    assert "10.244.2.2:8080" not in sh(f"ip netns exec {topo.node} ipvsadm -Ln")
    assert prior2 is not None


def test_cleanup_leaves_nothing(topo):
    mode = IpvsMode(CFG)
    sync(topo, mode, state((B1, B2)), None)
    in_netns(topo.node, mode.cleanup)
    assert sh(f"ip netns exec {topo.node} ipvsadm -Ln").count("->") == 1  # only the header line
    assert "kube-ipvs0" not in sh(f"ip -n {topo.node} link")
    assert "KUBE-" not in sh(f"ip netns exec {topo.node} iptables-save") + sh(f"ip netns exec {topo.node} ipset list -n")
