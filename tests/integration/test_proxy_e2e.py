"""End-to-end proxy scenarios (issue 4) on ONE `kpx up` cluster per proxy mode: apiserver, 2 node
agents, one `kpx proxy` per node netns, an ext client; real pods, real Services, real packets.

Parametrized by mode (`MODES`): another mode joins by adding its name once it passes. Pods are
created once per module (backends on both nodes, one client per node) and shared by scenarios;
scenario-specific objects carry unique names. The last scenarios disturb the proxies (SIGKILL
and restart, nat flush, --cleanup) and run in file order after the traffic scenarios.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import textwrap
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest

from tests.integration.cluster_fixtures import TIME_SCALE, Cluster, make_cluster, unique_name
from tests.integration.test_iptables_packets import answer, probe_many

pytestmark = pytest.mark.netns

MODES = ["iptables", "nftables"]  # a mode joins when it passes; it also adds itself to FLUSH_NAT below
SERVICE_CIDR = "10.96.0.0/12"


@dataclass
class E2E:
    c: Cluster
    mode: str
    app: str  # label of the 3 backends a (node1), b, c (node2)
    backends: dict[str, str]  # pod name -> pod IP
    clients: dict[str, str]  # node name -> client pod name

    def pod_prefix(self, pod: str) -> list[str]:
        return ["ip", "netns", "exec", self.c.pod_netns(pod)]

    def ext(self) -> list[str]:
        return ["ip", "netns", "exec", self.c.lab.ext_netns]

    def node(self, i: int) -> Any:
        return self.c.lab.nodes[i]

    def ip_of(self, pod: str) -> str:
        return str(self.c.get_pod(pod)["status"]["podIP"])


@pytest.fixture(scope="module", params=MODES)
def e2e(request: pytest.FixtureRequest) -> Iterator[E2E]:
    with e2e_cluster(request.param) as e:
        yield e


@contextlib.contextmanager
def e2e_cluster(mode: str) -> Iterator[E2E]:
    """The scenarios' cluster for one mode (the vm tier builds its ipvs one with this too)."""
    with make_cluster(nodes=2, proxy_mode=mode, prefix="e2e") as c:
        # real nodes have a default route, so traffic the proxy does not DNAT reaches FORWARD (where
        # REJECT/DROP live) instead of failing route lookup; the lab's nodes have none
        for n in c.lab.nodes:
            subprocess.run(["ip", "netns", "exec", n.netns, "ip", "route", "replace", SERVICE_CIDR, "dev", "eth0"],
                           check=True)
        app = unique_name("web")
        layout = {f"{app}-a": "node1", f"{app}-b": "node2", f"{app}-c": "node2"}
        for pod, node in layout.items():
            c.create_pod(pod, node=node, labels={"app": app})
        clients = {"node1": unique_name("cl1"), "node2": unique_name("cl2")}
        for node, pod in clients.items():
            c.create_pod(pod, node=node, labels={"app": pod})
        for pod in [*layout, *clients.values()]:
            c.wait_ready(pod)
        e = E2E(c, mode, app, {}, clients)
        e.backends = {pod: e.ip_of(pod) for pod in layout}
        yield e


def service(e: E2E, name: str, selector: dict[str, str], proto: str = "TCP", port: int = 80, **spec: Any) -> dict:
    ports = [{"name": "p", "port": port, "targetPort": 8080, "protocol": proto}]
    typ = spec.pop("type", "ClusterIP")
    return e.c.create_service(name, selector, ports, type=typ, **spec)


def wait_answers(prefix: list[str], proto: str, ip: str, port: int, want: set[str] | None = None,
                 timeout: float = 20.0) -> dict[str, str]:
    """Retry one request until it is answered (by one of `want`, if given): the rules are synced."""
    timeout *= TIME_SCALE
    deadline = time.monotonic() + timeout
    last = ""
    while time.monotonic() < deadline:
        last = probe_many(prefix, proto, ip, port, timeout=1.0)[0]
        if not last.startswith("ERR"):
            got = answer(last)
            if want is None or got["pod"] in want:
                return got
        time.sleep(0.2)
    raise AssertionError(f"{proto} {ip}:{port} not answered{' by ' + str(want) if want else ''} in {timeout}s: {last}")


def wait_for(pred: Any, timeout: float = 20.0, what: str = "condition") -> None:
    timeout *= TIME_SCALE
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return
        time.sleep(0.2)
    raise AssertionError(f"{what} not reached in {timeout}s")


# -- traffic ------------------------------------------------------------------------------------


@pytest.mark.parametrize("proto", ["TCP", "UDP"])
def test_clusterip_from_both_nodes_to_both_nodes(e2e: E2E, proto: str) -> None:
    s = service(e2e, unique_name("cip"), {"app": e2e.app}, proto)
    cip = s["spec"]["clusterIP"]
    for client in e2e.clients.values():
        wait_answers(e2e.pod_prefix(client), proto.lower(), cip, 80)
        got = {answer(x)["pod"] for x in probe_many(e2e.pod_prefix(client), proto.lower(), cip, 80, n=40)}
        assert got == set(e2e.backends), got  # backends on both nodes reached from each node


def test_fair_spread_and_pod_source_ip_preserved(e2e: E2E) -> None:
    s = service(e2e, unique_name("fair"), {"app": e2e.app})
    cip = s["spec"]["clusterIP"]
    client = e2e.clients["node1"]
    wait_answers(e2e.pod_prefix(client), "tcp", cip, 80)
    lines = probe_many(e2e.pod_prefix(client), "tcp", cip, 80, n=300)
    seen = Counter(answer(x)["pod"] for x in lines)
    for pod in e2e.backends:
        assert 0.20 * 300 <= seen[pod] <= 0.47 * 300, seen
    assert {answer(x)["client"].split(":")[0] for x in lines} == {e2e.ip_of(client)}


def test_nodeport_from_ext_to_each_node(e2e: E2E) -> None:
    s = service(e2e, unique_name("np"), {"app": e2e.app}, type="NodePort")
    np_ = s["spec"]["ports"][0]["nodePort"]
    assert 30000 <= np_ <= 32767
    for i in range(2):
        got = wait_answers(e2e.ext(), "tcp", e2e.node(i).ip, np_)
        assert got["pod"] in e2e.backends
        assert got["client"].split(":")[0] != e2e.c.lab.ext_ip  # ETP=Cluster is masqueraded


def test_session_affinity_pins_a_client(e2e: E2E) -> None:
    s = service(e2e, unique_name("aff"), {"app": e2e.app}, sessionAffinity="ClientIP")
    cip = s["spec"]["clusterIP"]
    for client in e2e.clients.values():
        wait_answers(e2e.pod_prefix(client), "tcp", cip, 80)
        got = {answer(x)["pod"] for x in probe_many(e2e.pod_prefix(client), "tcp", cip, 80, n=30)}
        assert len(got) == 1, got


def test_etp_local_keeps_client_ip_and_other_node_drops(e2e: E2E) -> None:
    a = f"{e2e.app}-a"  # the only backend on node1
    s = service(e2e, unique_name("etp"), {"app": e2e.app}, type="NodePort", externalTrafficPolicy="Local")
    np_ = s["spec"]["ports"][0]["nodePort"]
    got = wait_answers(e2e.ext(), "tcp", e2e.node(0).ip, np_)
    assert got["pod"] == a and got["client"].split(":")[0] == e2e.c.lab.ext_ip
    # node2 has b and c locally: also answers, from a local pod, client IP kept
    got = wait_answers(e2e.ext(), "tcp", e2e.node(1).ip, np_)
    assert got["pod"] in {f"{e2e.app}-b", f"{e2e.app}-c"} and got["client"].split(":")[0] == e2e.c.lab.ext_ip
    # a Service whose only endpoint is on node1: node2 drops (no local endpoint)
    only_a = service(e2e, unique_name("etp1"), {"app": e2e.app, "statefulset.kubernetes.io/pod-name": a},
                     type="NodePort", externalTrafficPolicy="Local")
    np1 = only_a["spec"]["ports"][0]["nodePort"]
    e2e.c.request("PATCH", f"/api/v1/namespaces/default/pods/{a}",
                  {"metadata": {"labels": {"statefulset.kubernetes.io/pod-name": a}}})
    wait_answers(e2e.ext(), "tcp", e2e.node(0).ip, np1, {a})
    # node2's proxy syncs on its own clock: until it has, its kernel refuses (no rule at all)
    wait_for(lambda: probe_many(e2e.ext(), "tcp", e2e.node(1).ip, np1, timeout=1.5) == ["ERR TIMEOUT"],
             what="node2 drops the Local NodePort without a local endpoint")


def test_itp_local_uses_only_this_nodes_endpoints(e2e: E2E) -> None:
    s = service(e2e, unique_name("itp"), {"app": e2e.app}, internalTrafficPolicy="Local")
    cip = s["spec"]["clusterIP"]
    n1, n2 = e2e.pod_prefix(e2e.clients["node1"]), e2e.pod_prefix(e2e.clients["node2"])
    wait_answers(n1, "tcp", cip, 80)
    assert {answer(x)["pod"] for x in probe_many(n1, "tcp", cip, 80, n=20)} == {f"{e2e.app}-a"}
    wait_answers(n2, "tcp", cip, 80)
    assert {answer(x)["pod"] for x in probe_many(n2, "tcp", cip, 80, n=20)} == {f"{e2e.app}-b", f"{e2e.app}-c"}


def test_service_without_endpoints_refuses_at_once(e2e: E2E) -> None:
    s = service(e2e, unique_name("none"), {"app": unique_name("nobody")}, type="NodePort")
    cip, np_ = s["spec"]["clusterIP"], s["spec"]["ports"][0]["nodePort"]
    client = e2e.pod_prefix(e2e.clients["node1"])
    wait_for(lambda: probe_many(client, "tcp", cip, 80, timeout=5) == ["ERR ECONNREFUSED"], what="REJECT programmed")
    t0 = time.monotonic()
    assert probe_many(client, "tcp", cip, 80, timeout=5) == ["ERR ECONNREFUSED"]
    assert probe_many(e2e.ext(), "tcp", e2e.node(1).ip, np_, timeout=5) == ["ERR ECONNREFUSED"]
    assert time.monotonic() - t0 < 4 * TIME_SCALE  # refused, not timed out


def test_removed_endpoint_gets_no_new_connections(e2e: E2E) -> None:
    app = unique_name("rm")
    pods = [f"{app}-1", f"{app}-2"]
    e2e.c.create_pod(pods[0], node="node1", labels={"app": app})
    e2e.c.create_pod(pods[1], node="node2", labels={"app": app})
    for p in pods:
        e2e.c.wait_ready(p)
    s = service(e2e, unique_name("rms"), {"app": app})
    cip = s["spec"]["clusterIP"]
    client = e2e.pod_prefix(e2e.clients["node1"])
    wait_answers(client, "tcp", cip, 80, {pods[1]})
    gone_ip = e2e.ip_of(pods[1])
    e2e.c.delete_pod(pods[1])
    node1 = ["ip", "netns", "exec", e2e.node(0).netns]
    wait_for(lambda: f"{gone_ip}:8080" not in _save(node1), what="endpoint removed from node1's rules")
    got = {answer(x)["pod"] for x in probe_many(client, "tcp", cip, 80, n=30)}
    assert got == {pods[0]}


def test_hairpin_pod_reaches_itself(e2e: E2E) -> None:
    a = f"{e2e.app}-a"
    s = service(e2e, unique_name("hp"), {"app": e2e.app})
    cip = s["spec"]["clusterIP"]
    got = wait_answers(e2e.pod_prefix(a), "tcp", cip, 80, {a}, timeout=30)
    assert got["client"].split(":")[0] != e2e.backends[a]  # hairpin is masqueraded


def test_external_ip(e2e: E2E) -> None:
    eip = "203.0.113.77"
    s = service(e2e, unique_name("eip"), {"app": e2e.app}, externalIPs=[eip])
    assert s["spec"]["externalIPs"] == [eip]
    subprocess.run(e2e.ext() + ["ip", "route", "replace", f"{eip}/32", "via", e2e.node(1).ip], check=True)
    try:
        assert wait_answers(e2e.ext(), "tcp", eip, 80)["pod"] in e2e.backends
    finally:
        subprocess.run(e2e.ext() + ["ip", "route", "del", f"{eip}/32"], check=False)


def test_udp_backend_replaced_keeps_serving(e2e: E2E) -> None:
    app = unique_name("udpr")
    old, new = f"{app}-old", f"{app}-new"
    e2e.c.create_pod(old, node="node2", labels={"app": app})
    e2e.c.wait_ready(old)
    s = service(e2e, unique_name("udps"), {"app": app}, "UDP", port=53)
    cip = s["spec"]["clusterIP"]
    client = e2e.pod_prefix(e2e.clients["node1"])
    wait_answers(client, "udp", cip, 53, {old})
    e2e.c.delete_pod(old)
    e2e.c.create_pod(new, node="node2", labels={"app": app})
    e2e.c.wait_ready(new)
    wait_answers(client, "udp", cip, 53, {new}, timeout=30)


# -- disruptions (run last, in this order) ----------------------------------------------------

LONG_CLIENT = textwrap.dedent(
    """
    import socket, sys, time
    s = socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=3)
    end = time.monotonic() + float(sys.argv[3]); n = 0
    print("connected", flush=True)
    try:
        while time.monotonic() < end:
            s.sendall(b"x\\n"); b = b""
            while not b.endswith(b"\\n"):
                d = s.recv(4096)
                if not d:
                    raise ConnectionError("closed by peer")
                b += d
            n += 1; time.sleep(0.05)
        print("OK", n, flush=True)
    except OSError as e:
        print("BROKEN", n, e, flush=True)
    """
)


def _save(prefix: list[str]) -> str:
    """Everything a proxy mode can program in a netns, as text: both iptables backends and nft."""
    out = []
    for argv in (["iptables-nft-save"], ["iptables-legacy-save"], ["nft", "list", "ruleset"]):
        p = subprocess.run(prefix + argv, capture_output=True, text=True)
        out.append(p.stdout)
    return "\n".join(out)


def _flush_iptables_nat(prefix: list[str]) -> None:
    nft = ":KUBE-SERVICES" in subprocess.run(prefix + ["iptables-nft-save", "-t", "nat"], capture_output=True,
                                             text=True).stdout
    backend = "nft" if nft else "legacy"
    subprocess.run(prefix + [f"iptables-{backend}", "-w", "5", "-t", "nat", "-F"], check=True)
    subprocess.run(prefix + [f"iptables-{backend}", "-w", "5", "-t", "nat", "-X"], check=True)


# How someone wipes a mode's service NAT behind its back (upstream e2e "should recreate its
# iptables rules if they are deleted"); a mode joining MODES adds its way here.
def _delete_nft_table(prefix: list[str]) -> None:
    subprocess.run(prefix + ["nft", "delete", "table", "ip", "kube-proxy"], check=True)


FLUSH_NAT = {"iptables": _flush_iptables_nat, "nftables": _delete_nft_table}


def _restart_proxy(e2e: E2E, i: int, *extra: str, mode: str | None = None) -> int:
    from netns.up import _http_ok, kpx_argv, node_kubeconfig_path, spawn

    n = e2e.node(i)
    role = f"proxy/{n.name}"
    st = e2e.c.up_state()
    pid = int(st["components"][role])
    os.kill(pid, signal.SIGKILL)
    wait_for(lambda: not os.path.exists(f"/proc/{pid}") or _zombie(pid), what="old proxy gone")
    argv = kpx_argv("proxy", "--proxy-mode", mode or e2e.mode, "--kubeconfig", str(node_kubeconfig_path(e2e.c.lab)),
                    "--hostname-override", n.name, "--cluster-cidr", e2e.c.lab.pod_cidr, *extra)
    p = spawn(e2e.c.lab, role, argv, netns=n.netns)
    _record_component(e2e, role, p.pid)
    wait_for(lambda: _http_ok(f"http://{n.ip}:10256/healthz"), timeout=30, what="restarted proxy healthy")
    return p.pid


def _zombie(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(")")[-1].split()[0] == "Z"
    except OSError:
        return True


def _record_component(e2e: E2E, role: str, pid: int) -> None:
    import json
    from pathlib import Path

    path = Path(e2e.c.lab.state_dir) / "up.json"
    st = json.loads(path.read_text())
    st["components"][role] = pid
    path.write_text(json.dumps(st))


def test_proxy_sigkill_and_restart_resets_no_connection(e2e: E2E) -> None:
    s = service(e2e, unique_name("long"), {"app": e2e.app})
    cip = s["spec"]["clusterIP"]
    client = e2e.pod_prefix(e2e.clients["node1"])
    wait_answers(client, "tcp", cip, 80)
    long = subprocess.Popen(client + [sys.executable, "-I", "-c", LONG_CLIENT, cip, "80", str(6 + 6 * TIME_SCALE)],
                            stdout=subprocess.PIPE, text=True)
    try:
        assert long.stdout is not None and long.stdout.readline().strip() == "connected"
        _restart_proxy(e2e, 0, "--iptables-sync-period", "2s")
        # new connections work through the restarted proxy's rules
        wait_answers(client, "tcp", cip, 80)
        out, _ = long.communicate(timeout=40 * TIME_SCALE)
    finally:
        if long.poll() is None:
            long.kill()
    assert out.startswith("OK"), out  # the established connection was never reset


def test_flushed_nat_table_comes_back(e2e: E2E) -> None:
    s = service(e2e, unique_name("flush"), {"app": e2e.app})
    cip = s["spec"]["clusterIP"]
    client = e2e.pod_prefix(e2e.clients["node1"])
    wait_answers(client, "tcp", cip, 80)
    FLUSH_NAT[e2e.mode](["ip", "netns", "exec", e2e.node(0).netns])
    assert probe_many(client, "tcp", cip, 80, timeout=1)[0].startswith("ERR")  # really gone
    wait_answers(client, "tcp", cip, 80, timeout=45)  # the canary check forced a full resync


# What each mode leaves in a node netns: a switch must leave none of the old mode's objects.
MODE_MARKS = {"iptables": ("KUBE-SVC-", "KUBE-SEP-", ":KUBE-SERVICES"), "nftables": ("table ip kube-proxy",)}


def test_switching_modes_and_back_leaves_no_rules_of_the_other(e2e: E2E) -> None:
    other = next(m for m in MODE_MARKS if m != e2e.mode)
    s = service(e2e, unique_name("sw"), {"app": e2e.app}, type="NodePort")
    cip, np_ = s["spec"]["clusterIP"], s["spec"]["ports"][0]["nodePort"]
    client = e2e.pod_prefix(e2e.clients["node1"])
    node1 = ["ip", "netns", "exec", e2e.node(0).netns]
    wait_answers(client, "tcp", cip, 80)
    for mode, gone in ((other, e2e.mode), (e2e.mode, other)):
        for i in (0, 1):
            _restart_proxy(e2e, i, mode=mode)
        wait_answers(client, "tcp", cip, 80)
        wait_answers(e2e.ext(), "tcp", e2e.node(0).ip, np_)
        dump = _save(node1)
        assert not [m for m in MODE_MARKS[gone] if m in dump], f"{gone} rules left after switching to {mode}"
        assert any(m in dump for m in MODE_MARKS[mode])


def test_proxy_cleanup_leaves_no_kpx_rule(e2e: E2E) -> None:
    n = e2e.node(1)
    role = f"proxy/{n.name}"
    pid = int(e2e.c.up_state()["components"][role])
    node2 = ["ip", "netns", "exec", n.netns]
    assert "KUBE-SERVICES" in _save(node2) or "kube-proxy" in _save(node2)
    os.kill(pid, signal.SIGTERM)
    wait_for(lambda: not os.path.exists(f"/proc/{pid}") or _zombie(pid), what="proxy stopped")
    from netns.up import kpx_argv

    p = subprocess.run(node2 + kpx_argv("proxy", "--cleanup"), capture_output=True, text=True, timeout=60)
    assert p.returncode == 0, p.stderr
    left = [ln for ln in _save(node2).splitlines() if "KUBE-" in ln or "table ip kube-proxy" in ln]
    assert left == [], left
