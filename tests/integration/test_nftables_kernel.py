"""The nftables mode's transactions against the real kernel: accepted, applied, partial syncs
and stale-chain deletion work, cleanup leaves nothing. (Packet tests: test_nftables_packets.py.)"""

import subprocess
import uuid
from dataclasses import replace

import pytest

from netns.ns import netns_add, netns_delete
from proxy.modes.nftables import NftablesMode, hash_and_truncate
from tests.nft_states import CFG, CLUSTERIP, NODEPORT, STATES, eps, state

pytestmark = pytest.mark.netns


@pytest.fixture
def netns():
    name = f"kpx-nft{uuid.uuid4().hex[:8]}"
    netns_add([name])
    try:
        yield name
    finally:
        netns_delete(name)


def nft(ns: str, *args: str, input: str | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["ip", "netns", "exec", ns, "nft", *args], input=input, capture_output=True, text=True)


class NetnsMode(NftablesMode):
    """The real mode, with nft run inside the test's netns (the proxy itself runs in its node netns)."""

    def __init__(self, cfg, ns):
        super().__init__(cfg)
        self.ns = ns

    def apply(self, plan):
        r = nft(self.ns, "-f", "-", input=plan.payload)
        assert r.returncode == 0, r.stderr
        return plan.prior


@pytest.mark.parametrize("name", sorted(STATES))
def test_kernel_accepts_every_golden_state(netns, name):
    plan = NftablesMode(CFG).render(STATES[name], None)
    r = nft(netns, "-c", "-f", "-", input=plan.payload)
    assert r.returncode == 0, r.stderr


def test_full_then_partial_syncs_program_the_kernel(netns):
    mode = NetnsMode(CFG, netns)
    s0 = state((CLUSTERIP, eps("10.180.0.1", "10.180.0.2")), (NODEPORT, eps("10.180.0.3")))
    prior = mode.apply(mode.render(s0, None))
    listing = nft(netns, "list", "table", "ip", "kube-proxy").stdout
    assert "172.30.0.41 . tcp . 80 : goto service-ULMVA6XW-ns1/svc1/tcp/p80" in listing
    assert "tcp . 30080 : goto external-" in listing

    # one endpoint goes: its chain is flushed now and deleted on the next sync
    s1 = state((CLUSTERIP, eps("10.180.0.1")), (NODEPORT, eps("10.180.0.3")), changed=frozenset({CLUSTERIP.name}))
    prior = mode.apply(mode.render(s1, prior))
    stale = "endpoint-" + hash_and_truncate("ns1/svc1/tcp/p80__10.180.0.2/80")
    chain = nft(netns, "list", "chain", "ip", "kube-proxy", stale)
    assert chain.returncode == 0 and "dnat" not in chain.stdout
    prior = mode.apply(mode.render(replace(s1, changed=frozenset()), prior))
    assert nft(netns, "list", "chain", "ip", "kube-proxy", stale).returncode != 0

    # the service goes entirely
    s2 = state((NODEPORT, eps("10.180.0.3")), changed=frozenset({CLUSTERIP.name}))
    prior = mode.apply(mode.render(s2, prior))
    prior = mode.apply(mode.render(replace(s2, changed=frozenset()), prior))
    listing = nft(netns, "list", "table", "ip", "kube-proxy").stdout
    assert "svc1" not in listing and "172.30.0.41" not in listing
    assert "svc2" in listing

    # a full sync on top of an existing table (proxy restart) is one transaction and converges
    mode.apply(mode.render(s0, None))
    assert "svc1" in nft(netns, "list", "table", "ip", "kube-proxy").stdout


def test_drift_and_cleanup(netns):
    mode = NetnsMode(CFG, netns)
    mode.apply(mode.render(STATES["clusterip"], None))

    def in_ns(fn):
        from netns.ns import in_netns

        return in_netns(netns, fn)

    assert in_ns(mode.check_drift) is False
    nft(netns, "flush", "chain", "ip", "kube-proxy", "services")
    assert in_ns(mode.check_drift) is True
    in_ns(mode.cleanup)
    assert "kube-proxy" not in nft(netns, "list", "tables").stdout
    in_ns(mode.cleanup)  # idempotent


def test_affinity_service_comes_and_goes(netns):
    from tests.nft_states import AFFINITY

    mode = NetnsMode(CFG, netns)
    prior = mode.apply(mode.render(state((AFFINITY, eps("10.180.0.1", "10.180.0.2"))), None))
    assert "affinity-" in nft(netns, "list", "sets", "ip").stdout
    s1 = state((AFFINITY, eps("10.180.0.2")), changed=frozenset({AFFINITY.name}))
    prior = mode.apply(mode.render(s1, prior))
    prior = mode.apply(mode.render(replace(s1, changed=frozenset()), prior))
    sets = nft(netns, "list", "sets", "ip").stdout
    assert "10.180.0.1/80" not in sets and "10.180.0.2/80" in sets
    s2 = state(changed=frozenset({AFFINITY.name}))
    prior = mode.apply(mode.render(s2, prior))
    mode.apply(mode.render(replace(s2, changed=frozenset()), prior))
    listing = nft(netns, "list", "table", "ip", "kube-proxy").stdout
    assert "svc3" not in listing and "affinity-" not in listing
