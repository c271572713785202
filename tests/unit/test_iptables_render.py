"""Golden tests pinning the iptables render for representative states.

Regenerate after an intended change: KPX_UPDATE_GOLDEN=1 pytest tests/unit/test_iptables_render.py
(then read the diff: the golden files are the review surface). `CASES` is reused by
tests/integration/test_iptables_restore.py, which feeds every payload to `iptables-restore --test`.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import pytest

from proxy.model import Endpoint, ProxyConfig, ProxyState, ServicePort, ServicePortName
from proxy.modes.base import Plan
from proxy.modes.iptables_render import IptablesPrior, IptablesRenderer

pytestmark = pytest.mark.unit

GOLDEN = Path(__file__).parent / "golden" / "iptables"
NODE = "node1"
CFG = ProxyConfig(node_name=NODE, node_ips=("192.168.56.11",), cluster_cidr="10.244.0.0/16")


def spn(ns: str, name: str, port: str = "p80", proto: str = "TCP") -> ServicePortName:
    return ServicePortName(ns, name, port, proto)


def ep(ip: str, node: str = NODE, port: int = 8080, **kw) -> Endpoint:
    return Endpoint(ip, port, node_name=node, **kw)


def svc(name: ServicePortName, cip: str, port: int = 80, **kw) -> ServicePort:
    return ServicePort(name=name, cluster_ip=cip, port=port, protocol=name.protocol, **kw)


def state(ports: list[tuple[ServicePort, tuple[Endpoint, ...]]], cfg: ProxyConfig = CFG, changed=None) -> ProxyState:
    return ProxyState(
        config=cfg,
        services={p.name: p for p, _ in ports},
        endpoints={p.name: e for p, e in ports if e},
        changed=changed,
    )


S4 = spn("ns4", "svc4")
WEB = spn("default", "web", "http")
DNS = spn("kube-system", "kube-dns", "dns", "UDP")


def _full(st: ProxyState, **kw) -> Plan[IptablesPrior]:
    return IptablesRenderer(st.config, **kw).render(st, None)


def case_clusterip() -> Plan[IptablesPrior]:
    return _full(state([(svc(S4, "10.96.0.40"), (ep("10.244.1.2"),))]))


def case_multi_endpoints() -> Plan[IptablesPrior]:
    eps = (ep("10.244.1.2"), ep("10.244.2.2", "node2"), ep("10.244.2.3", "node2"))
    udp = (ep("10.244.1.5", port=53), ep("10.244.2.5", "node2", port=53))
    return _full(state([(svc(WEB, "10.96.0.50"), eps), (svc(DNS, "10.96.0.10", 53), udp)]))


def case_affinity() -> Plan[IptablesPrior]:
    eps = (ep("10.244.1.2"), ep("10.244.2.2", "node2"))
    return _full(state([(svc(WEB, "10.96.0.50", affinity_timeout=10800), eps)]))


def case_nodeport() -> Plan[IptablesPrior]:
    eps = (ep("10.244.1.2"), ep("10.244.2.2", "node2"))
    return _full(state([(svc(WEB, "10.96.0.50", node_port=30080), eps)]))


def case_etp_local_with_local() -> Plan[IptablesPrior]:
    eps = (ep("10.244.1.2"), ep("10.244.2.2", "node2"))
    p = svc(WEB, "10.96.0.50", node_port=30080, external_policy_local=True, health_check_node_port=31000)
    return _full(state([(p, eps)]))


def case_etp_local_without_local() -> Plan[IptablesPrior]:
    eps = (ep("10.244.2.2", "node2"),)
    p = svc(WEB, "10.96.0.50", node_port=30080, external_policy_local=True, health_check_node_port=31000)
    return _full(state([(p, eps)]))


def case_itp_local() -> Plan[IptablesPrior]:
    here = svc(spn("default", "here"), "10.96.0.60", internal_policy_local=True)
    away = svc(spn("default", "away"), "10.96.0.61", internal_policy_local=True)
    return _full(state([(here, (ep("10.244.1.2"), ep("10.244.2.2", "node2"))), (away, (ep("10.244.2.3", "node2"),))]))


def case_no_endpoints() -> Plan[IptablesPrior]:
    p = svc(WEB, "10.96.0.50", node_port=30080, external_ips=("192.168.56.100",))
    unready = svc(spn("default", "unready"), "10.96.0.51")
    return _full(state([(p, ()), (unready, (ep("10.244.1.9", ready=False, serving=False),))]))


def case_external_ips() -> Plan[IptablesPrior]:
    p = svc(WEB, "10.96.0.50", external_ips=("192.168.56.100", "192.168.56.101"))
    return _full(state([(p, (ep("10.244.1.2"),))]))


def case_lb_source_ranges() -> Plan[IptablesPrior]:
    p = svc(
        WEB,
        "10.96.0.50",
        node_port=30080,
        load_balancer_ips=("192.168.56.150",),
        load_balancer_source_ranges=("192.168.56.0/24", "203.0.113.0/24"),
    )
    return _full(state([(p, (ep("10.244.1.2"),))]))


def case_terminating_fallback() -> Plan[IptablesPrior]:
    eps = (ep("10.244.1.2", ready=False, serving=True, terminating=True), ep("10.244.1.3", ready=False, serving=False))
    return _full(state([(svc(WEB, "10.96.0.50"), eps)]))


def case_options() -> Plan[IptablesPrior]:
    """--nodeport-addresses, --masquerade-all, tcp_be_liberal, no --random-fully, masquerade bit 12,
    localhostNodePorts false (no KUBE-FIREWALL; loopback not a NodePort address)."""
    cfg = ProxyConfig(
        node_name=NODE,
        node_ips=("192.168.56.11", "10.0.2.15"),
        cluster_cidr=None,
        masquerade_all=True,
        masquerade_bit=12,
        nodeport_addresses=("192.168.56.0/24", "127.0.0.0/8"),
        tcp_be_liberal=True,
        localhost_nodeports=False,
    )
    p = svc(WEB, "10.96.0.50", node_port=30080, external_policy_local=True)
    return _full(state([(p, (ep("10.244.1.2"),))], cfg), random_fully=False)


def case_large_cluster() -> Plan[IptablesPrior]:
    eps = tuple(ep(f"10.244.1.{i}") for i in range(2, 6))
    return _full(state([(svc(WEB, "10.96.0.50", affinity_timeout=60), eps)]), large_cluster_threshold=3)


def _two_services(web_eps: tuple[Endpoint, ...]) -> list[tuple[ServicePort, tuple[Endpoint, ...]]]:
    return [(svc(S4, "10.96.0.40"), (ep("10.244.1.2"),)), (svc(WEB, "10.96.0.50", node_port=30080), web_eps)]


def partial_sync_steps() -> tuple[Plan[IptablesPrior], Plan[IptablesPrior]]:
    r = IptablesRenderer(CFG)
    first = r.render(state(_two_services((ep("10.244.1.3"),))), None)
    nxt = state(_two_services((ep("10.244.1.3"), ep("10.244.2.3", "node2"))), changed=frozenset({WEB}))
    return first, r.render(nxt, first.prior)


def stale_chain_steps() -> tuple[Plan[IptablesPrior], Plan[IptablesPrior]]:
    r = IptablesRenderer(CFG)
    first = r.render(state(_two_services((ep("10.244.1.3"), ep("10.244.2.3", "node2")))), None)
    nxt = state([(svc(WEB, "10.96.0.50", node_port=30080), (ep("10.244.1.3"),))], changed=frozenset({WEB, S4}))
    return first, r.render(nxt, first.prior)


# partial cases: the full plan that must be in the kernel before the partial one applies
SETUP = {"partial_sync": partial_sync_steps, "stale_chains": stale_chain_steps}


def case_partial_sync() -> Plan[IptablesPrior]:
    """Only the changed Service's chains are written; KUBE-SERVICES/NODEPORTS are whole."""
    return partial_sync_steps()[1]


def case_stale_chains() -> Plan[IptablesPrior]:
    """An endpoint goes away (its KUBE-SEP is deleted) and a Service is deleted (all its chains)."""
    return stale_chain_steps()[1]


CASES: dict[str, Callable[[], Plan[IptablesPrior]]] = {
    name[len("case_") :]: fn for name, fn in globals().items() if name.startswith("case_") and callable(fn)
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_golden(name: str) -> None:
    text = CASES[name]().payload.text()
    path = GOLDEN / f"{name}.txt"
    if os.environ.get("KPX_UPDATE_GOLDEN"):
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    assert path.exists(), f"missing golden {path}: run with KPX_UPDATE_GOLDEN=1"
    assert text == path.read_text()


# -- properties the golden files show, asserted directly ------------------------------------


def _lines(plan: Plan[IptablesPrior], table: str) -> list[str]:
    chains, rules = plan.payload.tables[table]
    return (chains + rules).splitlines()


def test_upstream_hash_vector() -> None:
    assert ":KUBE-SVC-4SW47YFZTEDKD3PK - [0:0]" in _lines(case_clusterip(), "nat")


def test_probabilities_are_one_over_remaining() -> None:
    nat = _lines(case_multi_endpoints(), "nat")
    web = [line for line in nat if "-A KUBE-SVC-" in line and "default/web:http ->" in line]
    assert [w.split("--probability ")[1].split()[0] for w in web[:2]] == ["0.3333333333", "0.5000000000"]
    assert "statistic" not in web[2]


def test_no_endpoints_reject_in_filter_and_no_nat_chains() -> None:
    plan = case_no_endpoints()
    f = _lines(plan, "filter")
    assert any("KUBE-SERVICES" in x and "has no endpoints" in x and "-j REJECT" in x and "10.96.0.50" in x for x in f)
    assert any("KUBE-EXTERNAL-SERVICES" in x and "--dport 30080" in x and "-j REJECT" in x for x in f)
    assert any("KUBE-EXTERNAL-SERVICES" in x and "192.168.56.100" in x for x in f)
    # an endpoint that is neither ready nor serving counts as none
    assert any("default/unready:p80 has no endpoints" in x for x in f)
    assert not [x for x in _lines(plan, "nat") if x.startswith(":KUBE-SVC-")]


def test_etp_local_without_local_endpoints_drops_external_only() -> None:
    plan = case_etp_local_without_local()
    f = _lines(plan, "filter")
    assert any("KUBE-EXTERNAL-SERVICES" in x and "has no local endpoints" in x and "-j DROP" in x for x in f)
    nat = _lines(plan, "nat")
    # ClusterIP still works through the cluster chain; EXT has no fall-through to KUBE-SVL
    assert any(x.startswith("-A KUBE-SERVICES") and "cluster IP" in x and "KUBE-SVC-" in x for x in nat)
    assert not any(x.startswith(":KUBE-SVL-") for x in nat)
    assert plan.stats["no_local_endpoints_external"] == 1


def test_itp_local_drops_clusterip_without_local_endpoint() -> None:
    plan = case_itp_local()
    f = _lines(plan, "filter")
    assert any("default/away:p80 has no local endpoints" in x and "-j DROP" in x and "10.96.0.61" in x for x in f)
    nat = _lines(plan, "nat")
    here = [x for x in nat if x.startswith("-A KUBE-SERVICES") and "10.96.0.60" in x]
    assert len(here) == 1 and "KUBE-SVL-" in here[0]
    assert plan.stats["no_local_endpoints_internal"] == 1


def test_partial_sync_writes_only_changed_service_chains() -> None:
    plan = case_partial_sync()
    assert not plan.full
    nat = _lines(plan, "nat")
    assert not any(x.startswith("-A KUBE-SVC-4SW47YFZTEDKD3PK") or x.startswith(":KUBE-SVC-4SW47YFZTEDKD3PK") for x in nat)
    assert any("10.96.0.40" in x and x.startswith("-A KUBE-SERVICES") for x in nat)  # top chains are whole
    assert plan.stats["chains_skipped"] == 2 and plan.stats["chains_written"] == 4
    assert "mangle" not in plan.payload.tables  # canary only on full syncs


def test_stale_chains_are_flushed_then_deleted() -> None:
    plan = case_stale_chains()
    nat = _lines(plan, "nat")
    deleted = [x.split()[1] for x in nat if x.startswith("-X ")]
    assert "KUBE-SVC-4SW47YFZTEDKD3PK" in deleted and len(deleted) == 3  # svc4's SVC+SEP, web's removed SEP
    for c in deleted:
        assert f":{c} - [0:0]" in nat
        assert nat.index(f"-X {c}") > max(i for i, x in enumerate(nat) if x.startswith("-A "))


def test_localhost_nodeports() -> None:
    on = case_nodeport()  # v1alpha1 default: localhostNodePorts true
    assert any(x.startswith("-A KUBE-FIREWALL") and "-d 127.0.0.0/8 ! -s 127.0.0.0/8" in x for x in _lines(on, "filter"))
    tail = [x for x in _lines(on, "nat") if "NOTE: this must be the last rule" in x]
    assert tail and "127.0.0.0/8" not in tail[0]
    off = case_options()
    assert not any("KUBE-FIREWALL" in x for x in _lines(off, "filter"))
    tails = [x for x in _lines(off, "nat") if "NOTE: this must be the last rule" in x]
    assert [t.split(" -d ")[1].split()[0] for t in tails] == ["192.168.56.11"]  # 10.0.2.15 outside, no loopback


def test_large_cluster_mode_drops_endpoint_comments() -> None:
    plan = case_large_cluster()
    nat = _lines(plan, "nat")
    assert plan.stats["large_cluster_mode"] == 1
    assert not any("--comment" in x for x in nat if x.startswith(("-A KUBE-SEP-", "-A KUBE-SVC-")) and "cluster IP" not in x)


def test_unchanged_render_reuses_cache_and_is_identical() -> None:
    r = IptablesRenderer(CFG)
    st = state(_two_services((ep("10.244.1.3"),)))
    a = r.render(st, None)
    b = r.render(st, a.prior)
    assert b.stats["services_rendered"] == 0 and a.stats["services_rendered"] == 2
    assert a.payload.text() == b.payload.text()


def test_endpoint_change_on_full_sync_rerenders_only_that_port() -> None:
    r = IptablesRenderer(CFG)
    r.render(state(_two_services((ep("10.244.1.3"),))), None)
    plan = r.render(state(_two_services((ep("10.244.1.4"),))), None)
    assert plan.stats["services_rendered"] == 1
    assert "10.244.1.4:8080" in plan.payload.text() and "10.244.1.3:8080" not in plan.payload.text()


def test_renderer_matches_fresh_renderer_after_changes() -> None:
    """Cached, incremental renders produce exactly what a cold render of the same state does."""
    r = IptablesRenderer(CFG)
    r.render(state(_two_services((ep("10.244.1.3"),))), None)
    st = state(_two_services((ep("10.244.1.3"), ep("10.244.2.3", "node2"))))
    assert r.render(st, None).payload.text() == IptablesRenderer(CFG).render(st, None).payload.text()


def test_config_change_makes_the_next_sync_full() -> None:
    import dataclasses

    r = IptablesRenderer(CFG)
    first = r.render(state(_two_services((ep("10.244.1.3"),))), None)
    cfg2 = dataclasses.replace(CFG, masquerade_all=True)
    plan = r.render(state(_two_services((ep("10.244.1.3"),)), cfg2, changed=frozenset()), first.prior)
    assert plan.full and plan.stats["chains_skipped"] == 0
    assert "-A KUBE-SVC-4SW47YFZTEDKD3PK" in plan.payload.text()


def test_topology_hints_follow_node_labels_and_force_full_sync() -> None:
    from proxy.model import LABEL_TOPOLOGY_ZONE

    eps = (
        Endpoint("10.244.1.2", 8080, node_name=NODE, zone_hints=("zone-a",)),
        Endpoint("10.244.2.2", 8080, node_name="node2", zone_hints=("zone-b",)),
    )
    ports = [(svc(WEB, "10.96.0.50"), eps)]
    r = IptablesRenderer(CFG)
    st = state(ports)
    first = r.render(ProxyState(CFG, st.services, st.endpoints, node_labels={LABEL_TOPOLOGY_ZONE: "zone-b"}), None)
    assert "10.244.2.2:8080" in first.payload.text() and "10.244.1.2:8080" not in first.payload.text()
    moved = r.render(
        ProxyState(CFG, st.services, st.endpoints, changed=frozenset(), node_labels={LABEL_TOPOLOGY_ZONE: "zone-a"}),
        first.prior,
    )
    assert moved.full  # upstream: a node label change forces a full sync
    assert "10.244.1.2:8080" in moved.payload.text() and "10.244.2.2:8080" not in moved.payload.text()
    assert moved.stats["chains_deleted"] == 1  # the zone-b endpoint's KUBE-SEP is stale now
