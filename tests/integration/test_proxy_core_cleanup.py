"""`kpx proxy --cleanup` in a throwaway netns: rules programmed by the iptables and nftables
modes (through their real apply) are all removed; other rules are left alone; exit 0."""

from __future__ import annotations

import subprocess
import sys
import uuid
from collections.abc import Iterator

import pytest

pytestmark = pytest.mark.netns

PROGRAM = r"""
from proxy.model import Endpoint, ProxyConfig, ProxyState, ServicePort, ServicePortName
from proxy.server import build_mode
from proxy.config import ProxyOptions
spn = ServicePortName("default", "web", "http", "TCP")
cfg = ProxyConfig("n1", node_ips=("192.0.2.1",), cluster_cidr="10.244.0.0/16")
state = ProxyState(cfg, {spn: ServicePort(spn, "10.96.0.10", 80, node_port=30080)},
                   {spn: (Endpoint("10.244.1.2", 8080),)})
for name in ("iptables", "nftables"):
    m = build_mode(name, cfg, ProxyOptions(mode=name))
    m.apply(m.render(state, None))
"""


def sh(ns: str, *cmd: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["ip", "netns", "exec", ns, *cmd], capture_output=True, text=True, timeout=60)


@pytest.fixture
def netns() -> Iterator[str]:
    name = f"kpxt-cl-{uuid.uuid4().hex[:8]}"
    subprocess.run(["ip", "netns", "add", name], check=True)
    try:
        yield name
    finally:
        subprocess.run(["ip", "netns", "del", name], check=False)


def test_cleanup_removes_what_every_mode_programmed(netns: str) -> None:
    sh(netns, "ip", "link", "set", "lo", "up")
    r = sh(netns, sys.executable, "-c", PROGRAM)
    assert r.returncode == 0, r.stderr
    sh(netns, "iptables", "-t", "nat", "-N", "SOMEONE-ELSES")  # not ours: must survive
    before = sh(netns, "iptables-save").stdout + sh(netns, "nft", "list", "ruleset").stdout
    assert "KUBE-SERVICES" in before and "table ip kube-proxy" in before
    r = sh(netns, sys.executable, "-m", "kpx", "proxy", "--cleanup", "--hostname-override", "n1")
    assert r.returncode == 0, r.stderr
    after_ipt = sh(netns, "iptables-save").stdout
    after_nft = sh(netns, "nft", "list", "ruleset").stdout
    assert "KUBE-" not in after_ipt and "SOMEONE-ELSES" in after_ipt
    assert "kube-proxy" not in after_nft
    # idempotent
    assert sh(netns, sys.executable, "-m", "kpx", "proxy", "--cleanup").returncode == 0
