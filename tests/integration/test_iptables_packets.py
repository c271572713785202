"""Real packets through the iptables mode on H4a's 2-node netns lab (no apiserver): render a
state, apply it inside each node netns, and probe from pods on both nodes and from the ext
client. One module-scoped set of pods and one program per node serve all scenarios."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass

import pytest

from netns.lab import Lab
from proxy.model import Endpoint, ProxyConfig, ProxyState, ServicePort, ServicePortName
from proxy.modes.iptables import IptablesMode
from proxy.modes.iptables_render import IptablesPrior
from tests.integration.lab_fixtures import unique_pod

pytestmark = pytest.mark.netns
SERVICE_CIDR = "10.96.0.0/12"

# One process per batch of requests: N TCP connections (or UDP datagrams), one answer line each;
# failures print "ERR <errno name>" so tests can tell REJECT (ECONNREFUSED) from a DROP (timeout).
MULTI_PROBE = textwrap.dedent(
    """
    import errno, socket, sys
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
                        break
                    b += d
            else:
                s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
                s.settimeout(timeout)
                s.sendto(b"hi\\n", (ip, port))
                b = s.recv(4096)
            s.close()
            print(b.decode().strip(), flush=True)
        except socket.timeout:
            print("ERR TIMEOUT", flush=True)
        except OSError as e:
            print("ERR " + errno.errorcode.get(e.errno or 0, str(e)), flush=True)
    """
)


def probe_many(prefix: list[str], proto: str, ip: str, port: int, n: int = 1, timeout: float = 2.0) -> list[str]:
    argv = prefix + [sys.executable, "-I", "-c", MULTI_PROBE, proto, ip, str(port), str(n), str(timeout)]
    p = subprocess.run(argv, capture_output=True, text=True, timeout=30 + n * timeout)
    assert p.returncode == 0, p.stderr[-500:]
    return p.stdout.splitlines()


def answer(line: str) -> dict[str, str]:
    assert not line.startswith("ERR"), line
    return dict(kv.split("=", 1) for kv in line.split())


@dataclass
class Pod:
    name: str
    node: int
    ip: str
    prefix: list[str]


@dataclass
class World:
    lab: Lab
    pods: dict[str, Pod]
    modes: list[IptablesMode]
    priors: list[IptablesPrior | None]

    def ext(self) -> list[str]:
        return ["ip", "netns", "exec", self.lab.ext_netns]

    def node_prefix(self, i: int) -> list[str]:
        return ["ip", "netns", "exec", self.lab.nodes[i].netns]

    def program(self, ports: list[tuple[ServicePort, tuple[Endpoint, ...]]]) -> None:
        """Full sync of the same Services on every node (what each node's proxy would do)."""
        for i, m in enumerate(self.modes):
            st = ProxyState(m.config, {p.name: p for p, _ in ports}, {p.name: e for p, e in ports})
            plan = m.render(st, self.priors[i])
            self.priors[i] = m.apply(plan)

    def ep(self, pod: str, port: int = 8080) -> Endpoint:
        p = self.pods[pod]
        return Endpoint(p.ip, port, node_name=self.lab.nodes[p.node].name)


@pytest.fixture(scope="module", params=["nft", "legacy"])
def world(request: pytest.FixtureRequest, lab: Lab) -> Iterator[World]:
    backend = request.param
    pods: dict[str, Pod] = {}
    tag = unique_pod("ipt")
    layout = {"a": 0, "b": 1, "c": 1, "client1": 0, "client2": 1}
    try:
        for short, node in layout.items():
            name = f"{tag}-{short}"
            ip = lab.add_pod(node + 1, "default", name, image="kpx/echo")
            pods[short] = Pod(name, node, ip, lab.pod("default", name).enter_argv([]))
        # A real node has a default route, so un-DNATed Service traffic reaches FORWARD (where
        # REJECT/DROP live) instead of failing route lookup; the lab's nodes have none: add one.
        for n in lab.nodes:
            subprocess.run(["ip", "netns", "exec", n.netns, "ip", "route", "replace", SERVICE_CIDR, "dev", "eth0"], check=True)
        modes = [
            IptablesMode(
                ProxyConfig(node_name=n.name, node_ips=(n.ip,), cluster_cidr=lab.pod_cidr),
                backend=backend,
                netns=n.netns,
            )
            for n in lab.nodes
        ]
        yield World(lab, pods, modes, [None] * len(modes))
    finally:
        for n in lab.nodes:
            IptablesMode(ProxyConfig(node_name=n.name), backend="nft", netns=n.netns).cleanup()
            subprocess.run(["ip", "netns", "exec", n.netns, "ip", "route", "del", SERVICE_CIDR], check=False)
        for p in pods.values():
            try:
                lab.delete_pod("default", p.name)
            except Exception:
                pass


def spn(name: str, proto: str = "TCP") -> ServicePortName:
    return ServicePortName("default", name, "p", proto)


def test_clusterip_tcp_udp_from_both_nodes_fair_and_source_preserved(world: World) -> None:
    eps = (world.ep("a"), world.ep("b"), world.ep("c"))
    tcp = ServicePort(spn("web"), "10.96.50.10", 80)
    udp = ServicePort(spn("web", "UDP"), "10.96.50.10", 80, protocol="UDP")
    world.program([(tcp, eps), (udp, eps)])
    for client in ("client1", "client2"):
        c = world.pods[client]
        lines = probe_many(c.prefix, "tcp", "10.96.50.10", 80, n=150)
        seen = Counter(answer(x)["pod"] for x in lines)
        assert set(seen) == {world.pods[k].name for k in "abc"}, seen
        for k in "abc":
            assert 0.20 * 150 <= seen[world.pods[k].name] <= 0.47 * 150, seen
        # pod -> ClusterIP is not masqueraded: the backend sees the pod's own IP
        assert {answer(x)["client"].split(":")[0] for x in lines} == {c.ip}
        udp_seen = {answer(x)["pod"] for x in probe_many(c.prefix, "udp", "10.96.50.10", 80, n=30)}
        assert len(udp_seen) >= 2


def test_nodeport_from_ext_to_each_node_is_masqueraded(world: World) -> None:
    eps = (world.ep("a"), world.ep("b"))
    world.program([(ServicePort(spn("np"), "10.96.50.11", 80, node_port=30080), eps)])
    for node in world.lab.nodes:
        lines = probe_many(world.ext(), "tcp", node.ip, 30080, n=20)
        got = [answer(x) for x in lines]
        assert {g["pod"] for g in got} <= {world.pods["a"].name, world.pods["b"].name}
        # ETP=Cluster: SNAT to the node (its bridge or underlay address), never the ext client
        assert world.lab.ext_ip not in {g["client"].split(":")[0] for g in got}
    # localhostNodePorts (the v1alpha1 default): 127.0.0.1:<nodePort> on the node itself
    assert answer(probe_many(world.node_prefix(0), "tcp", "127.0.0.1", 30080)[0])["pod"] in {
        world.pods["a"].name,
        world.pods["b"].name,
    }
    udp = ServicePort(spn("np", "UDP"), "10.96.50.11", 80, protocol="UDP", node_port=30080)
    world.program([(udp, eps)])
    assert answer(probe_many(world.ext(), "udp", world.lab.nodes[1].ip, 30080)[0])["pod"] in {
        world.pods["a"].name,
        world.pods["b"].name,
    }


def test_etp_local_keeps_client_ip_and_drops_without_local_endpoint(world: World) -> None:
    p = ServicePort(spn("local"), "10.96.50.12", 80, node_port=30081, external_policy_local=True)
    world.program([(p, (world.ep("a"),))])  # endpoint only on node1
    got = answer(probe_many(world.ext(), "tcp", world.lab.nodes[0].ip, 30081)[0])
    assert got["pod"] == world.pods["a"].name and got["client"].split(":")[0] == world.lab.ext_ip
    assert probe_many(world.ext(), "tcp", world.lab.nodes[1].ip, 30081, timeout=1.0) == ["ERR TIMEOUT"]
    # pods on the endpoint-less node still reach it through the ClusterIP (Cluster internal policy)
    assert answer(probe_many(world.pods["client2"].prefix, "tcp", "10.96.50.12", 80)[0])["pod"] == world.pods["a"].name


def test_itp_local_uses_only_local_endpoints(world: World) -> None:
    p = ServicePort(spn("itp"), "10.96.50.13", 80, internal_policy_local=True)
    world.program([(p, (world.ep("a"), world.ep("b")))])
    got = {answer(x)["pod"] for x in probe_many(world.pods["client1"].prefix, "tcp", "10.96.50.13", 80, n=20)}
    assert got == {world.pods["a"].name}
    got = {answer(x)["pod"] for x in probe_many(world.pods["client2"].prefix, "tcp", "10.96.50.13", 80, n=20)}
    assert got == {world.pods["b"].name}
    world.program([(p, (world.ep("b"),))])  # node1 now has none: DROP, not REJECT
    assert probe_many(world.pods["client1"].prefix, "tcp", "10.96.50.13", 80, timeout=1.0) == ["ERR TIMEOUT"]


def test_no_endpoints_refused_at_once(world: World) -> None:
    world.program([(ServicePort(spn("empty"), "10.96.50.14", 80, node_port=30082), ())])
    assert probe_many(world.pods["client1"].prefix, "tcp", "10.96.50.14", 80, timeout=5) == ["ERR ECONNREFUSED"]
    assert probe_many(world.ext(), "tcp", world.lab.nodes[0].ip, 30082, timeout=5) == ["ERR ECONNREFUSED"]


def test_session_affinity_pins_client(world: World) -> None:
    p = ServicePort(spn("sticky"), "10.96.50.15", 80, affinity_timeout=600)
    world.program([(p, (world.ep("a"), world.ep("b"), world.ep("c")))])
    for client in ("client1", "client2"):
        got = {answer(x)["pod"] for x in probe_many(world.pods[client].prefix, "tcp", "10.96.50.15", 80, n=15)}
        assert len(got) == 1, got


def test_hairpin_pod_reaches_itself_masqueraded(world: World) -> None:
    world.program([(ServicePort(spn("hair"), "10.96.50.16", 80), (world.ep("a"),))])
    got = answer(probe_many(world.pods["a"].prefix, "tcp", "10.96.50.16", 80)[0])
    assert got["pod"] == world.pods["a"].name
    assert got["client"].split(":")[0] != world.pods["a"].ip  # KUBE-SEP -s <self> -j KUBE-MARK-MASQ


def test_removed_endpoint_gets_no_new_connections(world: World) -> None:
    p = ServicePort(spn("shrink"), "10.96.50.17", 80)
    world.program([(p, (world.ep("a"), world.ep("b")))])
    world.program([(p, (world.ep("b"),))])
    got = {answer(x)["pod"] for x in probe_many(world.pods["client1"].prefix, "tcp", "10.96.50.17", 80, n=20)}
    assert got == {world.pods["b"].name}


def test_external_ip_routed_to_node(world: World) -> None:
    eip = "203.0.113.50"
    world.program([(ServicePort(spn("eip"), "10.96.50.18", 80, external_ips=(eip,)), (world.ep("b"),))])
    subprocess.run(world.ext() + ["ip", "route", "replace", f"{eip}/32", "via", world.lab.nodes[0].ip], check=True)
    try:
        assert answer(probe_many(world.ext(), "tcp", eip, 80)[0])["pod"] == world.pods["b"].name
    finally:
        subprocess.run(world.ext() + ["ip", "route", "del", f"{eip}/32"], check=False)
