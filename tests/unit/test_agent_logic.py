"""Pure parts of the node agent and `kpx up`: Node object/status, host-gw route set, the agent
lock, exec targets, log tails."""

from __future__ import annotations

import platform
from pathlib import Path

import pytest

from kpx.errors import UserError
from netns.agent import AgentLock, AgentOptions, node_object, node_routes, node_status
from netns.lab import Lab
from netns.up import exec_argv, last_line

pytestmark = pytest.mark.unit


def opts(tmp_path: Path, cidr: str | None = "10.244.1.0/24") -> AgentOptions:
    return AgentOptions(node_name="node1", node_ip="192.168.56.11", state_dir=tmp_path, pod_cidr=cidr)


def node(name: str, cidr: str | None, ip: str | None) -> dict:
    n: dict = {"metadata": {"name": name}, "spec": {}, "status": {}}
    if cidr:
        n["spec"]["podCIDR"] = cidr
    if ip:
        n["status"]["addresses"] = [{"type": "Hostname", "address": name}, {"type": "InternalIP", "address": ip}]
    return n


def test_routes_go_to_every_other_complete_node() -> None:
    nodes = {"node1": node("node1", "10.244.1.0/24", "192.168.56.11"),
             "node2": node("node2", "10.244.2.0/24", "192.168.56.12"),
             "node3": node("node3", "10.244.3.0/24", None),  # no InternalIP yet
             "node4": node("node4", None, "192.168.56.14"),  # no podCIDR yet
             "node5": node("node5", "10.244.5.0/24", "192.168.56.15")}
    assert node_routes(nodes, "node1") == [("10.244.2.0/24", "192.168.56.12"), ("10.244.5.0/24", "192.168.56.15")]


def test_node_object_presets_pod_cidr_and_labels(tmp_path: Path) -> None:
    o = node_object(opts(tmp_path))
    assert o["spec"] == {"podCIDR": "10.244.1.0/24", "podCIDRs": ["10.244.1.0/24"]}
    assert o["metadata"]["labels"]["kubernetes.io/hostname"] == "node1"
    assert o["metadata"]["labels"]["kubernetes.io/os"] == "linux"
    assert node_object(opts(tmp_path, None))["spec"] == {}


def test_node_status_reports_addresses_kernel_and_ready(tmp_path: Path) -> None:
    trans: dict[str, str] = {}
    st = node_status(opts(tmp_path), False, "waiting for spec.podCIDR", trans)
    assert st["addresses"] == [{"type": "InternalIP", "address": "192.168.56.11"},
                               {"type": "Hostname", "address": "node1"}]
    assert st["nodeInfo"]["kernelVersion"] == platform.release()
    assert int(st["capacity"]["pods"]) == 250 and int(st["capacity"]["cpu"]) >= 1
    ready = next(c for c in st["conditions"] if c["type"] == "Ready")
    assert ready["status"] == "False" and ready["reason"] == "KubeletNotReady"
    t0 = ready["lastTransitionTime"]
    again = next(c for c in node_status(opts(tmp_path), False, "x", trans)["conditions"] if c["type"] == "Ready")
    assert again["lastTransitionTime"] == t0
    up = next(c for c in node_status(opts(tmp_path), True, "ok", trans)["conditions"] if c["type"] == "Ready")
    assert up["status"] == "True" and up["reason"] == "KubeletReady"


def test_agent_lock_refuses_a_second_agent_in_one_line(tmp_path: Path) -> None:
    a = AgentLock(tmp_path, "node1")
    a.acquire()
    try:
        with pytest.raises(UserError) as e:
            AgentLock(tmp_path, "node1").acquire()
        msg = str(e.value)
        assert "already running" in msg and "\n" not in msg and str(tmp_path / "agent.lock") in msg
    finally:
        a.release()
    b = AgentLock(tmp_path, "node1")  # released: the next agent may start
    b.acquire()
    b.release()


def test_exec_targets(tmp_path: Path) -> None:
    lab = Lab.plan("demo", nodes=2, state_dir=tmp_path)
    assert exec_argv(lab, "node/node2", ["ip", "r"]) == ["nsenter", "--net=/run/netns/kpx-demo-node2", "--", "ip", "r"]
    assert exec_argv(lab, "ext", ["true"])[1] == "--net=/run/netns/kpx-demo-ext"
    with pytest.raises(UserError, match="no node"):
        exec_argv(lab, "node/node9", ["true"])
    with pytest.raises(UserError, match="no pod default/web"):
        exec_argv(lab, "pod/default/web", ["true"])
    with pytest.raises(UserError, match="use node/NAME"):
        exec_argv(lab, "svc/x", ["true"])


def test_last_line_skips_traceback_noise(tmp_path: Path) -> None:
    f = tmp_path / "log"
    f.write_text("start\nTraceback (most recent call last):\n  File \"x\", line 1\nOSError: port in use\n\n")
    assert last_line(f) == "OSError: port in use"
    assert last_line(tmp_path / "missing") == ""
