"""Golden tests pinning the nftables mode's rendered transactions, and its partial-sync logic."""

import os
from dataclasses import replace
from pathlib import Path

import pytest

from proxy.model import Endpoint
from proxy.modes.nftables import NftablesMode, hash_and_truncate, nft_hash
from tests.nft_states import CFG, CLUSTERIP, NODEPORT, STATES, eps, state

pytestmark = pytest.mark.unit
GOLDEN = Path(__file__).parent / "golden" / "nftables"


def test_upstream_name_hashes():
    assert nft_hash("ns1/svc1/tcp/p80") == "ULMVA6XW"
    assert nft_hash("ns1/svc1/tcp/p80__10.180.0.1/80") == "5OJB2KTY"
    assert hash_and_truncate("ns1/svc1/tcp/p80") == "ULMVA6XW-ns1/svc1/tcp/p80"
    long = "ns/" + "x" * 300
    assert len(hash_and_truncate(long)) == 240 and hash_and_truncate(long).endswith("...")


@pytest.mark.parametrize("name", sorted(STATES))
def test_full_render_matches_golden(name):
    plan = NftablesMode(CFG).render(STATES[name], None)
    path = GOLDEN / f"{name}.nft"
    if os.environ.get("KPX_UPDATE_GOLDEN") == "1":
        path.write_text(plan.payload)
    assert plan.full
    assert plan.payload == path.read_text(), f"render changed; review and regenerate with KPX_UPDATE_GOLDEN=1 ({path})"


def test_clusterip_dispatch_shape():
    p = NftablesMode(CFG).render(STATES["clusterip"], None).payload
    assert "add element ip kube-proxy service-ips { 172.30.0.41 . tcp . 80 : goto service-ULMVA6XW-ns1/svc1/tcp/p80 }" in p
    assert "add rule ip kube-proxy service-ULMVA6XW-ns1/svc1/tcp/p80 numgen random mod 3 vmap @service-ULMVA6XW-ns1/svc1/tcp/p80" in p
    assert "add element ip kube-proxy service-ULMVA6XW-ns1/svc1/tcp/p80 { 0 : goto endpoint-5OJB2KTY-ns1/svc1/tcp/p80__10.180.0.1/80, 1 : goto endpoint-" in p
    assert "add rule ip kube-proxy endpoint-5OJB2KTY-ns1/svc1/tcp/p80__10.180.0.1/80 meta l4proto tcp dnat to 10.180.0.1:80" in p
    # pod CIDR traffic is not masqueraded; hairpin is
    assert "ip saddr != 10.244.0.0/16 jump mark-for-masquerade" in p
    assert "ip saddr 10.180.0.1 jump mark-for-masquerade" in p


def test_no_endpoints_reject_and_local_drop():
    p = NftablesMode(CFG).render(STATES["no-endpoints"], None).payload
    assert "no-endpoint-services { 172.30.0.41 . tcp . 80 : goto reject-chain, 172.30.0.42 . tcp . 80 : goto reject-chain }" in p
    assert "no-endpoint-nodeports { tcp . 30080 : goto reject-chain }" in p
    p = NftablesMode(CFG).render(STATES["etp-local-none-here"], None).payload
    assert "no-endpoint-nodeports { tcp . 30081 : drop }" in p
    p = NftablesMode(CFG).render(STATES["itp-local"], None).payload
    assert "no-endpoint-services { 172.30.0.45 . tcp . 80 : drop }" in p


def test_partial_sync_touches_only_the_changed_service():
    mode = NftablesMode(CFG)
    s0 = state((CLUSTERIP, eps("10.180.0.1", "10.180.0.2")), (NODEPORT, eps("10.180.0.3")))
    prior = mode.render(s0, None).prior
    s1 = state((CLUSTERIP, eps("10.180.0.1")), (NODEPORT, eps("10.180.0.3")), changed=frozenset({CLUSTERIP.name}))
    plan = mode.render(s1, prior)
    assert not plan.full
    assert "delete table" not in plan.payload
    assert "svc2" not in plan.payload  # the unchanged service is not mentioned at all
    assert "flush chain ip kube-proxy service-ULMVA6XW-ns1/svc1/tcp/p80" in plan.payload
    stale = "endpoint-" + hash_and_truncate("ns1/svc1/tcp/p80__10.180.0.2/80")
    assert f"flush chain ip kube-proxy {stale}" in plan.payload
    assert f"delete chain ip kube-proxy {stale}" not in plan.payload
    # the next sync deletes the chain it flushed
    s2 = replace(s1, changed=frozenset())
    plan2 = mode.render(s2, plan.prior)
    assert f"delete chain ip kube-proxy {stale}" in plan2.payload


def test_partial_sync_moves_elements_between_maps():
    mode = NftablesMode(CFG)
    prior = mode.render(state((CLUSTERIP, ())), None).prior
    plan = mode.render(state((CLUSTERIP, eps("10.180.0.9")), changed=frozenset({CLUSTERIP.name})), prior)
    lines = plan.payload.splitlines()
    d = lines.index("delete element ip kube-proxy no-endpoint-services { 172.30.0.41 . tcp . 80 }")
    a = lines.index("add element ip kube-proxy service-ips { 172.30.0.41 . tcp . 80 : goto service-ULMVA6XW-ns1/svc1/tcp/p80 }")
    assert d < a


def test_removed_service_is_cleaned_up():
    mode = NftablesMode(CFG)
    prior = mode.render(state((CLUSTERIP, eps("10.180.0.1")), (NODEPORT, eps("10.180.0.3"))), None).prior
    plan = mode.render(state((NODEPORT, eps("10.180.0.3")), changed=frozenset({CLUSTERIP.name})), prior)
    assert "delete element ip kube-proxy service-ips { 172.30.0.41 . tcp . 80 }" in plan.payload
    assert "delete element ip kube-proxy cluster-ips { 172.30.0.41 }" in plan.payload
    assert CLUSTERIP.name not in plan.prior.chains


def test_terminating_fallback_is_rendered():
    term = (Endpoint("10.180.0.7", 80, ready=False, serving=True, terminating=True, node_name="node1"),)
    p = NftablesMode(CFG).render(state((CLUSTERIP, term)), None).payload
    assert "dnat to 10.180.0.7:80" in p
