"""`kpx node` on a machine of its own (as on a Vagrant VM): no lab around the agent. A fresh netns
plugged into the cluster's underlay stands in for the VM's root netns; the agent waits for the
apiserver's node IPAM, builds cni0 itself, runs pods, and host-gw routes join it to the lab."""

from __future__ import annotations

import ipaddress
import os
import secrets
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from netns import ns
from netns.demo import ask_retry
from netns.hostnode import handle_name, host_lab_name
from netns.sandbox import Sandbox, destroy_many
from tests.integration.cluster_fixtures import Cluster, unique_name

pytestmark = pytest.mark.netns


@pytest.fixture()
def machine(cluster: Cluster, tmp_path: Path) -> Iterator[tuple[str, str, str, Path]]:
    """(node name, its IP, its netns, its state dir) with an agent running in it."""
    lab = cluster.lab
    tag = secrets.token_hex(2)
    name, netns, veth = f"vm{tag}", f"kpx-{lab.name}-vm{tag}", f"vm{tag}"
    net = ipaddress.ip_network(lab.subnet)
    ip = str(net.network_address + 170 + int(tag, 16) % 25)
    state = tmp_path / "state"
    # Taint the Node before the agent registers, so scheduled pods of other tests never land here.
    cluster.request("POST", "/api/v1/nodes", {"apiVersion": "v1", "kind": "Node", "metadata": {"name": name},
                                              "spec": {"taints": [{"key": "kpx.dev/test", "value": "vm",
                                                                   "effect": "NoSchedule"}]}})
    agent = None
    try:
        ns.netns_add([netns])
        ns.ip_batch([f"link add {veth} type veth peer name eth0 netns {netns}", f"link set {veth} master br-{lab.name}",
                     f"link set {veth} up"], lab.net_netns)
        ns.ip_batch(["link set lo up", f"addr add {ip}/{net.prefixlen} dev eth0", "link set eth0 up"], netns)
        log = open(tmp_path / "agent.log", "ab")  # noqa: SIM115 - the child owns it
        agent = subprocess.Popen(ns.netns_argv(netns, [
            sys.executable, "-m", "kpx", "node", "--kubeconfig", str(Path(lab.state_dir) / "node-kubeconfig"),
            "--node-name", name, "--node-ip", ip, "--state-dir", str(state), "--heartbeat", "2"]),
            stdout=log, stderr=log, start_new_session=True)
        log.close()
        yield name, ip, netns, state
    finally:
        if agent is not None:
            agent.send_signal(signal.SIGKILL)
            agent.wait()
        if (state / "sandboxes").exists():
            destroy_many([Sandbox.from_record(p) for p in (state / "sandboxes").glob("*.json")], grace=0.5)
        cluster.request("DELETE", f"/api/v1/nodes/{name}")
        ns.netns_delete(handle_name(name))
        ns.netns_delete(netns)


def test_agent_on_its_own_machine_joins_the_lab(cluster: Cluster, machine: tuple[str, str, str, Path]) -> None:
    name, ip, netns, state = machine
    deadline = time.monotonic() + 30
    node: dict = {}
    while time.monotonic() < deadline:
        node = cluster.request("GET", f"/api/v1/nodes/{name}")
        if any(c["type"] == "Ready" and c["status"] == "True" for c in node.get("status", {}).get("conditions", [])):
            break
        time.sleep(0.2)
    else:
        raise AssertionError(f"node {name} never Ready: {(state.parent / 'agent.log').read_text()[-2000:]}")
    cidr = node["spec"]["podCIDR"]  # from the apiserver's node IPAM: the agent did not preset it
    assert cidr not in {n.pod_cidr for n in cluster.lab.nodes}
    assert {"type": "InternalIP", "address": ip} in node["status"]["addresses"]
    gw = str(ipaddress.ip_network(cidr).network_address + 1)
    addrs = [a["local"] for li in ns.ip_json(["addr", "show", "cni0"], netns) for a in li["addr_info"]
             if a["family"] == "inet"]
    assert addrs == [gw]
    assert ns.get_sysctl(netns, "net.ipv4.ip_forward") == "1"
    # A pod on the machine and one on node1 talk both ways over host-gw routes kept from Nodes.
    here, there = unique_name("hv"), unique_name("hn")
    cluster.create_pod(here, node=name, tolerations=[{"key": "kpx.dev/test", "operator": "Exists"}])
    cluster.create_pod(there, node="node1")
    ip_here = cluster.wait_ready(here)["status"]["podIP"]
    ip_there = cluster.wait_ready(there)["status"]["podIP"]
    assert ipaddress.ip_address(ip_here) in ipaddress.ip_network(cidr)
    sb = Sandbox.from_record(state / "sandboxes" / f"kpx-{host_lab_name(name)}-default-{here}.json")
    assert sb.ip == ip_here and ns.netns_exists(sb.netns)
    for src_netns, dst, dst_ip in ((cluster.pod_netns(there), here, ip_here), (sb.netns, there, ip_there)):
        line = ask_retry(src_netns, "tcp", dst_ip, 8080, within=10)
        assert f"pod={dst}" in line, line
    # Deleting the pod removes its sandbox from the machine.
    cluster.delete_pod(here)
    assert not ns.netns_exists(sb.netns)
    assert not (state / "sandboxes" / f"{sb.netns}.json").exists()
    assert os.path.exists(ns.netns_path(handle_name(name)))
