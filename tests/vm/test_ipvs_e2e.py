"""The proxy end-to-end scenarios (issue 4's suite, tests/integration/test_proxy_e2e.py) on a
`kpx up --proxy-mode ipvs` cluster INSIDE the VM (this host's kernel has no IPVS): real pods on 2
nodes, real packets, the kernel's IPVS table cross-checked with `ipvsadm -Ln` in the node netns.

The shared scenarios are imported from the e2e suite and run here against the module's `e2e`
fixture (an ipvs cluster). The IPVS divergences from iptables mode (README's mode table) are
asserted, not skipped: a node without a local endpoint for an ETP=Local NodePort refuses (a virtual
server with no real servers answers RST) instead of dropping; a removed TCP endpoint drains at
weight 0 and keeps its established connection. Deadlines scale with KPX_TEST_TIME_SCALE (the
Makefile's test-vm sets it: Python under TCG is 20-30x slower than native).
"""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass

import pytest

from tests.integration import test_proxy_e2e as suite
from tests.integration.cluster_fixtures import TIME_SCALE, unique_name
from tests.integration.test_iptables_packets import answer, probe_many
from tests.integration.test_proxy_e2e import E2E, LONG_CLIENT, e2e_cluster, service, wait_answers, wait_for

pytestmark = pytest.mark.vm

# The shared scenarios, collected here in this order (pytest collects in definition order).
test_clusterip_from_both_nodes_to_both_nodes = suite.test_clusterip_from_both_nodes_to_both_nodes
test_fair_spread_and_pod_source_ip_preserved = suite.test_fair_spread_and_pod_source_ip_preserved
test_nodeport_from_ext_to_each_node = suite.test_nodeport_from_ext_to_each_node
test_session_affinity_pins_a_client = suite.test_session_affinity_pins_a_client
test_service_without_endpoints_refuses_at_once = suite.test_service_without_endpoints_refuses_at_once


@pytest.fixture(scope="module")
def e2e() -> Iterator[E2E]:
    with e2e_cluster("ipvs") as e:
        yield e


@dataclass(frozen=True)
class Real:
    addr: str
    forward: str
    weight: int
    active: int
    inactive: int


def ipvsadm(e: E2E, node: int = 0) -> dict[str, tuple[list[str], list[Real]]]:
    """`ipvsadm -Ln` in a node netns: 'TCP 10.96.0.10:80' -> (scheduler and flags, real servers)."""
    out = subprocess.run(["ip", "netns", "exec", e.node(node).netns, "ipvsadm", "-Ln"], capture_output=True,
                         text=True, check=True).stdout
    table: dict[str, tuple[list[str], list[Real]]] = {}
    cur: list[Real] = []
    for line in out.splitlines():
        f = line.split()
        if f and f[0] in ("TCP", "UDP", "SCTP"):
            cur = []
            table[f"{f[0]} {f[1]}"] = (f[2:], cur)
        elif len(f) == 6 and f[0] == "->" and f[1][0].isdigit():
            cur.append(Real(f[1], f[2], int(f[3]), int(f[4]), int(f[5])))
    return table


def test_ipvsadm_shows_rr_virtual_servers_with_masq_real_servers(e2e: E2E) -> None:
    s = service(e2e, unique_name("vs"), {"app": e2e.app}, type="NodePort")
    cip, np_ = s["spec"]["clusterIP"], s["spec"]["ports"][0]["nodePort"]
    wait_answers(e2e.pod_prefix(e2e.clients["node1"]), "tcp", cip, 80)
    want = {f"{ip}:8080" for ip in e2e.backends.values()}
    for node in (0, 1):
        table = ipvsadm(e2e, node)
        for vs in (f"TCP {cip}:80", f"TCP {e2e.node(node).ip}:{np_}"):
            assert vs in table, (vs, sorted(table))
            flags, reals = table[vs]
            assert flags == ["rr"], (vs, flags)
            assert {r.addr for r in reals} == want, (vs, reals)
            assert {(r.forward, r.weight) for r in reals} == {("Masq", 1)}, (vs, reals)
    aff = service(e2e, unique_name("vsa"), {"app": e2e.app}, sessionAffinity="ClientIP")
    acip = aff["spec"]["clusterIP"]
    wait_answers(e2e.pod_prefix(e2e.clients["node1"]), "tcp", acip, 80)
    flags, _ = ipvsadm(e2e)[f"TCP {acip}:80"]
    assert flags == ["rr", "persistent", "10800"], flags  # ClientIP affinity = persistence (upstream's timeout)


def test_etp_local_keeps_client_ip_and_other_node_refuses(e2e: E2E) -> None:
    """IPVS divergence: the node without a local endpoint keeps a virtual server with no real
    servers, so it refuses (RST) where iptables mode drops."""
    a = f"{e2e.app}-a"  # the only backend on node1
    sel = f"kpx-e2e-only-{a}"
    e2e.c.request("PATCH", f"/api/v1/namespaces/default/pods/{a}", {"metadata": {"labels": {"only": sel}}})
    s = service(e2e, unique_name("etp"), {"app": e2e.app, "only": sel}, type="NodePort",
                externalTrafficPolicy="Local")
    np_ = s["spec"]["ports"][0]["nodePort"]
    got = wait_answers(e2e.ext(), "tcp", e2e.node(0).ip, np_, {a})
    assert got["client"].split(":")[0] == e2e.c.lab.ext_ip  # not masqueraded: client IP kept
    vs = f"TCP {e2e.node(1).ip}:{np_}"
    wait_for(lambda: vs in ipvsadm(e2e, 1), what=f"{vs} on node2")
    assert ipvsadm(e2e, 1)[vs][1] == []  # node2: the virtual server exists, with no real server
    assert probe_many(e2e.ext(), "tcp", e2e.node(1).ip, np_, timeout=5) == ["ERR ECONNREFUSED"]


def test_removed_endpoint_drains_and_keeps_its_established_connection(e2e: E2E) -> None:
    app = unique_name("dr")
    old, new = f"{app}-old", f"{app}-new"
    e2e.c.create_pod(old, node="node2", labels={"app": app})
    e2e.c.wait_ready(old)
    s = service(e2e, unique_name("drs"), {"app": app})
    cip = s["spec"]["clusterIP"]
    client = e2e.pod_prefix(e2e.clients["node1"])
    wait_answers(client, "tcp", cip, 80, {old})
    old_ip = f"{e2e.ip_of(old)}:8080"
    duration = 10 + 5 * TIME_SCALE  # outlasts the steps below (asserted), without idling for minutes
    long = subprocess.Popen(client + [sys.executable, "-I", "-c", LONG_CLIENT, cip, "80", str(duration)],
                            stdout=subprocess.PIPE, text=True)
    try:
        assert long.stdout is not None and long.stdout.readline().strip() == "connected"
        e2e.c.create_pod(new, node="node1", labels={"app": app})
        e2e.c.wait_ready(new)
        # the old pod leaves the Service (it keeps running): its real server drains at weight 0
        e2e.c.request("PATCH", f"/api/v1/namespaces/default/pods/{old}", {"metadata": {"labels": {"app": "gone"}}})

        def draining() -> bool:
            reals = {r.addr: r for r in ipvsadm(e2e).get(f"TCP {cip}:80", ([], []))[1]}
            return old_ip in reals and reals[old_ip].weight == 0 and reals[old_ip].active >= 1

        wait_for(draining, what=f"{old_ip} at weight 0 with its connection")
        reals = {r.addr: r for r in ipvsadm(e2e)[f"TCP {cip}:80"][1]}
        assert reals[f"{e2e.ip_of(new)}:8080"].weight == 1, reals
        # new connections only reach the new endpoint
        assert {answer(x)["pod"] for x in probe_many(client, "tcp", cip, 80, n=10)} == {new}
        assert long.poll() is None, "the long connection ended before the drain was checked: raise its duration"
        out, _ = long.communicate(timeout=duration + 60 * TIME_SCALE)
    finally:
        if long.poll() is None:
            long.kill()
        e2e.c.delete_pod(old, wait=False)
    assert out.startswith("OK"), out  # the established connection kept working while it drained


# Disrupts node1's proxy (SIGKILL, restart under traffic): last.
test_proxy_sigkill_and_restart_resets_no_connection = suite.test_proxy_sigkill_and_restart_resets_no_connection
