"""Representative proxy states shared by the nftables golden tests and the nft -c checks."""

from proxy.model import Endpoint, ProxyConfig, ProxyState, ServicePort, ServicePortName

CFG = ProxyConfig(node_name="node1", node_ips=("192.168.56.11",), cluster_cidr="10.244.0.0/16")


def spn(name: str, port: str = "p80", proto: str = "TCP", ns: str = "ns1") -> ServicePortName:
    return ServicePortName(ns, name, port, proto)


def eps(*ips: str, port: int = 80, node: str = "node1") -> tuple[Endpoint, ...]:
    return tuple(Endpoint(ip, port, node_name=node) for ip in ips)


def state(*pairs, changed=None, cfg: ProxyConfig = CFG) -> ProxyState:
    services = {s.name: s for s, _ in pairs}
    endpoints = {s.name: e for s, e in pairs}
    return ProxyState(config=cfg, services=services, endpoints=endpoints, changed=changed)


CLUSTERIP = ServicePort(spn("svc1"), "172.30.0.41", 80)
NODEPORT = ServicePort(spn("svc2", "", "TCP"), "172.30.0.42", 80, node_port=30080)
AFFINITY = ServicePort(spn("svc3"), "172.30.0.43", 80, affinity_timeout=10800)
LOCAL = ServicePort(spn("svc4", "p80"), "172.30.0.44", 80, node_port=30081, external_policy_local=True)
ITP_LOCAL = ServicePort(spn("svc5"), "172.30.0.45", 80, internal_policy_local=True)
UDP = ServicePort(spn("dns", "dns", "UDP"), "172.30.0.10", 53)
LB = ServicePort(spn("lb"), "172.30.0.46", 80, node_port=30082, load_balancer_ips=("5.6.7.8",),
                 load_balancer_source_ranges=("203.0.113.0/25",), external_ips=("192.168.99.1",))

STATES = {
    "clusterip": state((CLUSTERIP, eps("10.180.0.1", "10.180.0.2", "10.180.1.1"))),
    "no-endpoints": state((CLUSTERIP, ()), (NODEPORT, ())),
    "nodeport": state((NODEPORT, eps("10.180.0.1"))),
    "affinity": state((AFFINITY, eps("10.180.0.1", "10.180.0.2"))),
    "etp-local": state((LOCAL, eps("10.180.0.1") + eps("10.180.1.1", node="node2"))),
    "etp-local-none-here": state((LOCAL, eps("10.180.1.1", node="node2"))),
    "itp-local": state((ITP_LOCAL, eps("10.180.1.1", node="node2"))),
    "udp": state((UDP, eps("10.180.0.5", port=53))),
    "loadbalancer": state((LB, eps("10.180.0.1", "10.180.1.1", node="node2"))),
}
