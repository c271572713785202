"""Synthetic proxy states for control-plane benchmarks: N Services x E endpoints, built directly
as model objects (the data-plane and end-to-end benches go through the apiserver instead)."""

from __future__ import annotations

import ipaddress

from proxy.model import Endpoint, ProxyConfig, ProxyState, ServicePort, ServicePortName

SERVICE_NET = ipaddress.ip_network("10.96.0.0/12")
POD_NET = ipaddress.ip_network("10.128.0.0/9")  # filler endpoints: addresses with no pod behind them


def service(i: int) -> ServicePort:
    return ServicePort(
        name=ServicePortName("bench", f"svc-{i}", "http"),
        cluster_ip=str(SERVICE_NET[16 + i]),
        port=80,
        node_port=30000 + i if i < 2768 else 0,
    )


def endpoints(i: int, n: int, gen: int = 0) -> tuple[Endpoint, ...]:
    base = (i * n + gen) % (POD_NET.num_addresses - n - 2)
    return tuple(Endpoint(str(POD_NET[base + 1 + k]), 8080, node_name=f"node{1 + k % 2}") for k in range(n))


def make_state(services: int, eps_per_service: int, node_name: str = "node1") -> ProxyState:
    cfg = ProxyConfig(node_name=node_name, node_ips=("192.168.56.11",), cluster_cidr="10.244.0.0/16")
    svcs = {}
    eps = {}
    for i in range(services):
        s = service(i)
        svcs[s.name] = s
        eps[s.name] = endpoints(i, eps_per_service)
    return ProxyState(config=cfg, services=svcs, endpoints=eps, changed=None)
