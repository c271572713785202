"""Golden tests pinning the userspace mode's render (listener table + restore text), and the
pure pieces around it: port allocation (sticky, lowest free), recovery of a previous
instance's ports from iptables-save, round robin and ClientIP affinity.

Regenerate after an intended change: KPX_UPDATE_GOLDEN=1 pytest tests/unit/test_userspace_render.py
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from proxy.model import Endpoint, ProxyConfig, ProxyState, ServicePort, ServicePortName
from proxy.userspace.loadbalancer import RoundRobin
from proxy.userspace.portals import (
    PortRangeExhausted,
    UserspacePayload,
    UserspacePrior,
    allocate_ports,
    recover_ports,
    render,
)

pytestmark = pytest.mark.unit

GOLDEN = Path(__file__).parent / "golden" / "userspace"
NODE = "node1"
CFG = ProxyConfig(node_name=NODE, node_ips=("192.168.56.11",), cluster_cidr="10.244.0.0/16")
WEB = ServicePortName("default", "web", "http")
DNS = ServicePortName("kube-system", "kube-dns", "dns", "UDP")
NP = ServicePortName("ns1", "np")
EMPTY = ServicePortName("ns1", "empty")


def ep(ip: str, node: str = NODE, port: int = 8080, **kw: object) -> Endpoint:
    return Endpoint(ip, port, node_name=node, **kw)  # type: ignore[arg-type]


def svc(name: ServicePortName, cip: str, port: int = 80, **kw: object) -> ServicePort:
    return ServicePort(name=name, cluster_ip=cip, port=port, protocol=name.protocol, **kw)  # type: ignore[arg-type]


def state(ports: list[tuple[ServicePort, tuple[Endpoint, ...]]]) -> ProxyState:
    return ProxyState(config=CFG, services={p.name: p for p, _ in ports}, endpoints={p.name: e for p, e in ports})


MIXED = state([
    (svc(WEB, "10.96.0.10", external_ips=("192.168.56.100",), affinity_timeout=10800),
     (ep("10.244.1.2"), ep("10.244.2.2", "node2"))),
    (svc(DNS, "10.96.0.53", 53), (ep("10.244.1.3", port=53),)),
    (svc(NP, "10.96.0.20", service_type="NodePort", node_port=30080, load_balancer_ips=("198.51.100.7",)),
     (ep("10.244.2.5", "node2", ready=False, serving=True, terminating=True),
      ep("10.244.2.6", "node2", ready=False, serving=False, terminating=True))),
    (svc(EMPTY, "10.96.0.30"), ()),
])


def dump(payload: UserspacePayload) -> str:
    rows = [f"# {ln.name} {ln.protocol} proxy_port={ln.proxy_port} open={ln.open} "
            f"affinity={ln.affinity_timeout} endpoints={','.join(f'{i}:{p}' for i, p in ln.endpoints)}"
            for ln in payload.listeners.values()]
    return "\n".join(rows) + "\n" + payload.restore()


def check_golden(name: str, text: str) -> None:
    path = GOLDEN / f"{name}.txt"
    if os.environ.get("KPX_UPDATE_GOLDEN"):
        path.write_text(text)
    assert text == path.read_text()


def test_mixed_golden() -> None:
    payload, prior, stats = render(MIXED, None)
    check_golden("mixed", dump(payload))
    assert stats["listeners"] == 3 and stats["service_ports"] == 4
    assert stats["rules_nat"] == 2 * (2 + 1 + 2 + 1) + 2 and stats["rules_filter"] == 1


def test_terminating_fallback_and_not_serving() -> None:
    payload, _, _ = render(MIXED, None)
    assert payload.listeners[NP].endpoints == (("10.244.2.5", 8080),)  # serving+terminating only
    assert not payload.listeners[EMPTY].open  # no endpoints: no listener -> kernel refuses


def test_internal_traffic_policy_local_uses_node_endpoints() -> None:
    st = state([(svc(WEB, "10.96.0.10", internal_policy_local=True), (ep("10.244.1.2"), ep("10.244.2.2", "node2")))])
    payload, _, _ = render(st, None)
    assert payload.listeners[WEB].endpoints == (("10.244.1.2", 8080),)


def test_ports_are_sticky_across_syncs_and_restarts() -> None:
    payload, prior, _ = render(MIXED, None)
    before = {n: ln.proxy_port for n, ln in payload.listeners.items()}
    # a new Service sorting first does not move anyone
    first = ServicePortName("aaa", "first")
    st = state([(svc(first, "10.96.0.99"), (ep("10.244.1.9"),)),
                *((MIXED.services[n], MIXED.endpoints[n]) for n in MIXED.services)])
    again, _, _ = render(st, prior)
    assert {n: again.listeners[n].proxy_port for n in before} == before
    assert again.listeners[first].proxy_port == max(before.values()) + 1
    # a restarted proxy reads the ports back from the rules a previous instance left
    save = payload.restore().replace("-A ", "-A ")
    assert recover_ports(save) == before
    fresh, _, _ = render(st, UserspacePrior(recover_ports(save)))
    assert {n: fresh.listeners[n].proxy_port for n in before} == before


def test_allocation_reuses_freed_ports_and_reports_exhaustion() -> None:
    a, b, c = (ServicePortName("ns", n) for n in "abc")
    assert allocate_ports([a, c], {a: 100, b: 101}, (100, 102)) == {a: 100, c: 101}
    with pytest.raises(PortRangeExhausted, match="widen --proxy-port-range"):
        allocate_ports([a, b, c], {}, (100, 101))


def test_recover_ports_reads_iptables_save_format() -> None:
    # as iptables-save prints it: -d before -p, quotes kept
    line = ('-A KUBE-PORTALS-CONTAINER -d 10.96.0.10/32 -p tcp -m comment --comment "default/web:http" '
            '-m tcp --dport 80 -j REDIRECT --to-ports 20001')
    assert recover_ports(line + "\n-A KUBE-PORTALS-HOST -j DNAT --to-destination 1.2.3.4:5\n") == {WEB: 20001}
    assert recover_ports(line, (30000, 30010)) == {}


def test_round_robin_and_affinity() -> None:
    now = [0.0]
    eps = (("10.0.0.1", 80), ("10.0.0.2", 80), ("10.0.0.3", 80))
    rr = RoundRobin(eps, 0, clock=lambda: now[0])
    assert [rr.next("c")[0] for _ in range(6)] == ["10.0.0.1", "10.0.0.2", "10.0.0.3"] * 2  # type: ignore[index]
    sticky = RoundRobin(eps, 10, clock=lambda: now[0])
    first = sticky.next("c1")
    assert all(sticky.next("c1") == first for _ in range(5))
    assert sticky.next("c2") != first
    assert sticky.next("c1", reset=True) != first  # a failed dial moves the client on
    moved = sticky.next("c1")
    now[0] = 11.0  # the timeout ends the affinity
    assert sticky.next("c1") != moved
    sticky.update(eps[:1], 10)  # endpoint removed: its clients are re-balanced
    assert sticky.next("c2") == eps[0]
    sticky.update((), 10)
    assert sticky.next("c1") is None


def test_host_portals_dnat_to_the_node_ip_not_the_bridge() -> None:
    import dataclasses

    cfg = dataclasses.replace(CFG, node_ips=("10.244.1.1", "192.168.56.11"))
    st = ProxyState(config=cfg, services=dict(MIXED.services), endpoints=dict(MIXED.endpoints))
    payload, _, _ = render(st, None)
    host = [r for r in payload.tables["nat"] if r.startswith("-A KUBE-PORTALS-HOST ")]
    assert host and all(r.endswith(("192.168.56.11:20000", "192.168.56.11:20001", "192.168.56.11:20002",
                                    "192.168.56.11:20003")) for r in host)
