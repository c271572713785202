"""Real packets through the userspace mode on the 2-node netns lab (no apiserver): each node's
UserspaceMode renders a state and applies it inside its node netns (its data-path thread
joins that netns); clients are pods on both nodes and the ext client.

The documented divergences from the kernel modes are asserted, not skipped: the backend sees
the proxy's address (the node's), never the client's, also for externalTrafficPolicy: Local.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap
import threading
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass

import pytest

from netns.lab import Lab
from proxy.model import Endpoint, ProxyConfig, ProxyState, ServicePort, ServicePortName
from proxy.modes.userspace import UserspaceMode
from proxy.userspace.portals import UserspacePrior
from tests.integration.lab_fixtures import unique_pod
from tests.integration.test_iptables_packets import Pod, answer

pytestmark = pytest.mark.netns
SERVICE_CIDR = "10.96.0.0/12"
# The flows' idle timeout (upstream's default is 250 ms): longer here so that a reply delayed by
# a loaded shared machine still finds its flow; the idle-timeout test waits past it.
UDP_IDLE = 1.0

# N requests, each on a new connection (TCP) or a new connected socket (UDP, so an ICMP port
# unreachable shows as ECONNREFUSED); one answer line or "ERR <errno>" per request.
PROBE = textwrap.dedent(
    """
    import errno, socket, sys, time
    proto, ip, port, n, timeout = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), float(sys.argv[5])
    for _ in range(n):
        try:
            if proto == "tcp":
                s = socket.create_connection((ip, port), timeout=timeout)
                s.sendall(b"hi\\n")
                b = b""
                while not b.endswith(b"\\n"):
                    d = s.recv(4096)
                    if not d:
                        raise ConnectionResetError(errno.ECONNRESET, "closed")
                    b += d
            else:
                s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
                s.settimeout(timeout)
                s.connect((ip, port))
                s.send(b"hi\\n")
                b = s.recv(4096)
            s.close()
            print(b.decode().strip(), flush=True)
        except socket.timeout:
            print("ERR TIMEOUT", flush=True)
        except OSError as e:
            print("ERR " + errno.errorcode.get(e.errno or 0, str(e)), flush=True)
    """
)

# upload N MiB (deterministic bytes), read back the server's sha256 of what arrived, then
# download N MiB and hash it; prints "<sent sha> <server sha> <received sha> <expected sha>".
TRANSFER_CLIENT = textwrap.dedent(
    """
    import hashlib, socket, sys
    ip, port, mib = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    block = hashlib.sha512(b"kpx").digest() * 16384  # 1 MiB
    s = socket.create_connection((ip, port), timeout=60)
    s.sendall(f"{mib}\\n".encode())
    sent = hashlib.sha256()
    for i in range(mib):
        chunk = bytes([i % 251]) + block[1:]
        sent.update(chunk)
        s.sendall(chunk)
    f = s.makefile("rb")
    server_sha = f.readline().decode().strip()
    got = hashlib.sha256()
    left = mib << 20
    while left:
        d = f.read(min(left, 1 << 20))
        if not d:
            break
        got.update(d)
        left -= len(d)
    exp = hashlib.sha256()
    for i in range(mib):
        exp.update(bytes([(i * 7) % 251]) + block[1:])
    print(sent.hexdigest(), server_sha, got.hexdigest(), exp.hexdigest())
    """
)
TRANSFER_SERVER = textwrap.dedent(
    """
    import hashlib, socket, threading
    block = hashlib.sha512(b"kpx").digest() * 16384
    ls = socket.socket(); ls.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    ls.bind(("0.0.0.0", 9000)); ls.listen(16)
    def serve(c):
        f = c.makefile("rb")
        mib = int(f.readline())
        h = hashlib.sha256(); left = mib << 20
        while left:
            d = f.read(min(left, 1 << 20))
            if not d: break
            h.update(d); left -= len(d)
        c.sendall((h.hexdigest() + "\\n").encode())
        for i in range(mib):
            c.sendall(bytes([(i * 7) % 251]) + block[1:])
        c.close()
    while True:
        c, _ = ls.accept()
        threading.Thread(target=serve, args=(c,), daemon=True).start()
    """
)


def run_in(prefix: list[str], script: str, *args: object, timeout: float = 120) -> list[str]:
    p = subprocess.run(prefix + [sys.executable, "-I", "-c", script, *map(str, args)],
                       capture_output=True, text=True, timeout=timeout)
    assert p.returncode == 0, p.stderr[-800:]
    return p.stdout.splitlines()


def probe(prefix: list[str], proto: str, ip: str, port: int, n: int = 1, timeout: float = 5.0) -> list[str]:
    return run_in(prefix, PROBE, proto, ip, port, n, timeout, timeout=60 + n * timeout)


@dataclass
class World:
    lab: Lab
    pods: dict[str, Pod]
    modes: list[UserspaceMode]
    priors: list[UserspacePrior | None]
    services: list[tuple[ServicePort, tuple[Endpoint, ...]]]

    def ext(self) -> list[str]:
        return ["ip", "netns", "exec", self.lab.ext_netns]

    def node_prefix(self, i: int) -> list[str]:
        return ["ip", "netns", "exec", self.lab.nodes[i].netns]

    def node_addrs(self, i: int) -> set[str]:
        n = self.lab.nodes[i]
        return {n.ip, n.bridge_ip}

    def new_mode(self, i: int) -> UserspaceMode:
        n = self.lab.nodes[i]
        return UserspaceMode(ProxyConfig(node_name=n.name, node_ips=(n.ip,), cluster_cidr=self.lab.pod_cidr),
                             backend="nft", netns=n.netns, udp_idle_timeout=UDP_IDLE)

    def program(self, ports: list[tuple[ServicePort, tuple[Endpoint, ...]]], nodes: tuple[int, ...] = (0, 1)) -> None:
        """A sync of these Services (replacing the previous set) on the given nodes."""
        self.services = ports
        for i in nodes:
            m = self.modes[i]
            st = ProxyState(m.config, {p.name: p for p, _ in ports}, {p.name: e for p, e in ports})
            self.priors[i] = m.apply(m.render(st, self.priors[i]))

    def ep(self, pod: str, port: int = 8080) -> Endpoint:
        p = self.pods[pod]
        return Endpoint(p.ip, port, node_name=self.lab.nodes[p.node].name)


@pytest.fixture(scope="module")
def world(lab: Lab) -> Iterator[World]:
    pods: dict[str, Pod] = {}
    tag = unique_pod("us")
    layout = {"a": 0, "b": 1, "c": 1, "client1": 0, "client2": 1}
    w: World | None = None
    try:
        for short, node in layout.items():
            name = f"{tag}-{short}"
            ip = lab.add_pod(node + 1, "default", name, image="kpx/echo")
            pods[short] = Pod(name, node, ip, lab.pod("default", name).enter_argv([]))
        name = f"{tag}-bulk"
        ip = lab.add_pod(2, "default", name, image=None, command=[sys.executable, "-I", "-c", TRANSFER_SERVER],
                         wait_port=9000)
        pods["bulk"] = Pod(name, 1, ip, lab.pod("default", name).enter_argv([]))
        # a real node has a default route; the lab's nodes have none, and a locally generated
        # packet needs a route before nat OUTPUT sees it (pods' traffic is REDIRECTed earlier)
        for n in lab.nodes:
            subprocess.run(["ip", "netns", "exec", n.netns, "ip", "route", "replace", SERVICE_CIDR, "dev", "eth0"],
                           check=True)
        # the first packets across a fresh lab can be lost: wait until every client reaches
        # every backend directly, so the scenarios measure the proxy and not the warm-up
        for cl in ("client1", "client2"):
            for be, port in (("a", 8080), ("b", 8080), ("c", 8080), ("bulk", 9000)):
                _wait_reachable(pods[cl].prefix, pods[be].ip, port)
        w = World(lab, pods, [], [None, None], [])
        w.modes = [w.new_mode(0), w.new_mode(1)]
        yield w
    finally:
        if w is not None:
            for m in w.modes:
                m.close()
        for n in lab.nodes:
            UserspaceMode(ProxyConfig(node_name=n.name), backend="nft", netns=n.netns).cleanup()
            subprocess.run(["ip", "netns", "exec", n.netns, "ip", "route", "del", SERVICE_CIDR], check=False)
        for p in pods.values():
            try:
                lab.delete_pod("default", p.name)
            except Exception:
                pass


def _wait_reachable(prefix: list[str], ip: str, port: int, timeout: float = 60.0) -> None:
    script = ("import socket,sys,time\n"
              "end=time.monotonic()+float(sys.argv[3])\n"
              "while True:\n"
              "    try:\n"
              "        socket.create_connection((sys.argv[1],int(sys.argv[2])),timeout=1).close(); break\n"
              "    except OSError:\n"
              "        if time.monotonic()>end: raise\n"
              "        time.sleep(0.1)\n")
    run_in(prefix, script, ip, port, timeout, timeout=timeout + 30)


def spn(name: str, proto: str = "TCP") -> ServicePortName:
    return ServicePortName("default", name, "p", proto)


def test_clusterip_tcp_udp_across_nodes_fair_spread_backend_sees_proxy(world: World) -> None:
    eps = (world.ep("a"), world.ep("b"), world.ep("c"))
    tcp = ServicePort(spn("web"), "10.96.60.10", 80)
    udp = ServicePort(spn("web", "UDP"), "10.96.60.10", 80, protocol="UDP")
    world.program([(tcp, eps), (udp, eps)])
    names = {world.pods[k].name for k in "abc"}
    for i, client in enumerate(("client1", "client2")):
        c = world.pods[client]
        lines = probe(c.prefix, "tcp", "10.96.60.10", 80, n=300 if i == 0 else 60)
        seen = Counter(answer(x)["pod"] for x in lines)
        assert set(seen) == names, seen
        for k in names:
            assert 0.20 * len(lines) <= seen[k] <= 0.47 * len(lines), seen
        # divergence from the kernel modes: the backend sees the proxy (this node), not the pod
        sources = {answer(x)["client"].rsplit(":", 1)[0] for x in lines}
        assert c.ip not in sources and sources <= world.node_addrs(c.node), sources
        udp_lines = probe(c.prefix, "udp", "10.96.60.10", 80, n=30)
        udp_seen = Counter(answer(x)["pod"] for x in udp_lines)
        assert set(udp_seen) == names, udp_seen
        assert {answer(x)["client"].rsplit(":", 1)[0] for x in udp_lines} <= world.node_addrs(c.node)
    # the host itself (OUTPUT -> KUBE-PORTALS-HOST, DNAT to the node IP)
    assert answer(probe(world.node_prefix(0), "tcp", "10.96.60.10", 80)[0])["pod"] in names
    assert answer(probe(world.node_prefix(1), "udp", "10.96.60.10", 80)[0])["pod"] in names


def test_nodeport_from_ext_and_etp_local_loses_client_ip(world: World) -> None:
    eps = (world.ep("a"), world.ep("b"))
    np_ = ServicePort(spn("np"), "10.96.60.11", 80, service_type="NodePort", node_port=30090)
    local = ServicePort(spn("npl"), "10.96.60.12", 80, service_type="NodePort", node_port=30091,
                        external_policy_local=True)
    world.program([(np_, eps), (local, (world.ep("a"),))])
    for i, node in enumerate(world.lab.nodes):
        got = [answer(x) for x in probe(world.ext(), "tcp", node.ip, 30090, n=10)]
        assert {g["pod"] for g in got} == {world.pods["a"].name, world.pods["b"].name}
        assert {g["client"].rsplit(":", 1)[0] for g in got} <= world.node_addrs(i)
        # ETP=Local cannot keep the client IP in userspace mode: the backend sees the node
        g = answer(probe(world.ext(), "tcp", node.ip, 30091)[0])
        assert g["pod"] == world.pods["a"].name
        assert g["client"].rsplit(":", 1)[0] != world.lab.ext_ip
        assert g["client"].rsplit(":", 1)[0] in world.node_addrs(i)
    # from the node itself, to its own IP and to 127.0.0.1
    assert answer(probe(world.node_prefix(0), "tcp", world.lab.nodes[0].ip, 30090)[0])["pod"]
    assert answer(probe(world.node_prefix(0), "tcp", "127.0.0.1", 30090)[0])["pod"]


def test_session_affinity_and_its_timeout(world: World) -> None:
    eps = (world.ep("a"), world.ep("b"), world.ep("c"))
    sticky = ServicePort(spn("sticky"), "10.96.60.13", 80, affinity_timeout=2)
    world.program([(sticky, eps)], nodes=(0,))
    c = world.pods["client1"]
    first = {answer(x)["pod"] for x in probe(c.prefix, "tcp", "10.96.60.13", 80, n=20)}
    assert len(first) == 1
    time.sleep(2.2)  # the affinity timeout itself is under test
    after = {answer(x)["pod"] for x in probe(c.prefix, "tcp", "10.96.60.13", 80, n=5)}
    assert len(after) == 1 and after != first


def test_udp_flow_idle_timeout(world: World) -> None:
    eps = (world.ep("a"), world.ep("b"), world.ep("c"))
    world.program([(ServicePort(spn("dns", "UDP"), "10.96.60.14", 53, protocol="UDP"), eps)], nodes=(0,))
    script = textwrap.dedent(
        """
        import socket, sys, time
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); s.settimeout(3)
        s.connect(("10.96.60.14", 53))
        out = []
        for pause in (0, 0.05, float(sys.argv[1])):
            time.sleep(pause)
            s.send(b"hi\\n"); out.append(s.recv(4096).decode().split()[0])
        print(" ".join(out))
        """
    )
    one, two, three = run_in(world.pods["client1"].prefix, script, UDP_IDLE * 2 + 0.2)[0].split()
    assert one == two  # same client address within the idle timeout: same flow, same endpoint
    assert three != one  # after the idle timeout the flow ended; the next datagram is balanced anew


def test_no_endpoints_is_refused(world: World) -> None:
    world.program([(ServicePort(spn("empty"), "10.96.60.15", 80), ()),
                   (ServicePort(spn("empty", "UDP"), "10.96.60.15", 80, protocol="UDP"), ())])
    c = world.pods["client2"]
    assert probe(c.prefix, "tcp", "10.96.60.15", 80) == ["ERR ECONNREFUSED"]
    assert probe(c.prefix, "udp", "10.96.60.15", 80) == ["ERR ECONNREFUSED"]


def test_dead_endpoints_are_skipped_by_the_retry_ladder(world: World) -> None:
    # one endpoint IP nobody has (no ARP answer: the 250 ms dial timeout fires), one closed port (RST)
    dead_ip = Endpoint(world.lab.nodes[1].pod_cidr.rsplit(".", 1)[0] + ".250", 8080, node_name="node2")
    closed = Endpoint(world.pods["b"].ip, 9, node_name="node2")
    world.program([(ServicePort(spn("flaky"), "10.96.60.16", 80), (dead_ip, closed, world.ep("a")))], nodes=(0,))
    got = probe(world.pods["client1"].prefix, "tcp", "10.96.60.16", 80, n=9, timeout=8)
    assert [answer(x)["pod"] for x in got] == [world.pods["a"].name] * 9
    assert world.modes[0].proxier is not None and world.modes[0].proxier.dp.dial_failures >= 9


def test_endpoint_removal_keeps_established_and_moves_new(world: World) -> None:
    svc = ServicePort(spn("drain"), "10.96.60.17", 80)
    world.program([(svc, (world.ep("a"), world.ep("b")))], nodes=(1,))
    script = textwrap.dedent(
        """
        import socket, sys
        s = socket.create_connection(("10.96.60.17", 80), timeout=5)
        f = s.makefile("rwb", buffering=0)
        s.sendall(b"one\\n"); print(f.readline().decode().split()[0], flush=True)
        sys.stdin.readline()  # the test removes the endpoint meanwhile
        s.sendall(b"two\\n"); print(f.readline().decode().split()[0], flush=True)
        """
    )
    p = subprocess.Popen(world.pods["client2"].prefix + [sys.executable, "-I", "-c", script],
                         stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert p.stdout is not None and p.stdin is not None
        first = p.stdout.readline().strip()
        victim = "a" if first == f"pod={world.pods['a'].name}" else "b"
        keep = "b" if victim == "a" else "a"
        world.program([(svc, (world.ep(keep),))], nodes=(1,))
        new = {answer(x)["pod"] for x in probe(world.pods["client2"].prefix, "tcp", "10.96.60.17", 80, n=10)}
        assert new == {world.pods[keep].name}
        p.stdin.write("go\n")
        p.stdin.flush()
        assert p.stdout.readline().strip() == first  # the established connection still flows
        assert p.wait(10) == 0
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()


def test_thousand_concurrent_connections(world: World) -> None:
    eps = (world.ep("a"), world.ep("b"), world.ep("c"))
    world.program([(ServicePort(spn("many"), "10.96.60.18", 80), eps)], nodes=(0,))
    script = textwrap.dedent(
        """
        import asyncio, resource, sys
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        N = int(sys.argv[1])
        async def one(i, answered, release):
            r, w = await asyncio.wait_for(asyncio.open_connection("10.96.60.18", 80), 60)
            w.write(b"hi\\n")
            line = await asyncio.wait_for(r.readline(), 60)
            answered.append(line)
            await release.wait()  # all N are open at the same time
            w.close()
            return line.startswith(b"pod=")
        async def main():
            answered, release = [], asyncio.Event()
            tasks = [asyncio.create_task(one(i, answered, release)) for i in range(N)]
            while len(answered) < N and not all(t.done() for t in tasks):
                await asyncio.sleep(0.05)
            peak = len(answered)
            release.set()
            res = await asyncio.gather(*tasks, return_exceptions=True)
            print(sum(1 for x in res if x is True), peak)
        asyncio.run(main())
        """
    )
    ok, peak = map(int, run_in(world.pods["client1"].prefix, script, 1000, timeout=180)[0].split())
    assert ok == 1000 and peak == 1000


def test_large_transfer_arrives_intact(world: World) -> None:
    svc = ServicePort(spn("bulk"), "10.96.60.19", 9000)
    world.program([(svc, (world.ep("bulk", 9000),))], nodes=(0,))
    sent, server, got, expected = run_in(world.pods["client1"].prefix, TRANSFER_CLIENT, "10.96.60.19", 9000, 100,
                                         timeout=300)[0].split()
    assert server == sent and got == expected


def test_restart_under_traffic_refuses_no_longer_than_the_restart(world: World) -> None:
    eps = (world.ep("a"), world.ep("b"))
    world.program([(ServicePort(spn("restart"), "10.96.60.20", 80), eps)], nodes=(1,))
    script = textwrap.dedent(
        """
        import socket, sys, time
        end = time.monotonic() + float(sys.argv[1])
        while time.monotonic() < end:
            t = time.time()
            try:
                s = socket.create_connection(("10.96.60.20", 80), timeout=2)
                s.sendall(b"hi\\n"); ok = s.recv(4096).startswith(b"pod=")
                s.close()
            except OSError:
                ok = False
            print(f"{t:.4f} {int(ok)}", flush=True)
            time.sleep(0.01)
        """
    )
    result: list[str] = []
    t = threading.Thread(target=lambda: result.extend(run_in(world.pods["client2"].prefix, script, 4.0)))
    t.start()
    time.sleep(1.0)
    began = time.time()
    world.modes[1].close()  # the old proxy instance goes away...
    world.modes[1] = world.new_mode(1)  # ...and a new one starts with no memory of it
    world.priors[1] = None
    world.program(world.services, nodes=(1,))
    ended = time.time()
    t.join()
    samples = [(float(a), b == "1") for a, b in (x.split() for x in result)]
    assert sum(ok for _, ok in samples) > 20
    failed = [ts for ts, ok in samples if not ok]
    # every failed attempt started while the restart ran (or in the probe before it)
    assert all(began - 0.05 <= ts <= ended for ts in failed), (began, ended, failed)
    assert samples[-1][1]
