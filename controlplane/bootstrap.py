"""The objects kube-apiserver creates on its first start, as plain dicts (H2a writes them through
the registry, so they get defaulted, validated, allocated and stored like any other write).

Call signatures for the REST layer (H2a):

    for kind, obj in bootstrap.bootstrap_objects(service_ip="10.96.0.1", advertise_address="192.168.56.1",
                                                 secure_port=6443):
        create `obj` (kind is "Namespace" | "Service" | "EndpointSlice") if it does not exist yet
    want = bootstrap.kubernetes_endpointslice(advertise_address, secure_port)
    if bootstrap.endpointslice_differs(current_slice, want): update it   # the apiserver's reconciler

What upstream does (k/k pkg/controlplane/controller/{kubernetesservice,systemnamespaces},
pkg/controlplane/reconcilers): namespaces default, kube-system, kube-public, kube-node-lease;
Service default/kubernetes (labels component=apiserver, provider=kubernetes, no selector,
ClusterIP = first address of the service CIDR, port https 443/TCP -> the secure port); and its
EndpointSlice default/kubernetes, labelled only kubernetes.io/service-name=kubernetes (no
managed-by label: it is the apiserver's own, the EndpointSlice controller leaves it alone),
one ready endpoint = the advertise address, port https = the secure port.
EndpointSlice validation rejects loopback addresses (as upstream): advertise a routable address
(the lab's 192.168.56.1), not 127.0.0.1.
"""

from __future__ import annotations

import ipaddress
from typing import Any

Obj = dict[str, Any]

SYSTEM_NAMESPACES = ("default", "kube-system", "kube-public", "kube-node-lease")


def namespace(name: str) -> Obj:
    return {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": name}}


def kubernetes_service(service_ip: str, secure_port: int = 6443) -> Obj:
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": "kubernetes", "namespace": "default",
                     "labels": {"component": "apiserver", "provider": "kubernetes"}},
        "spec": {
            "type": "ClusterIP",
            "clusterIP": service_ip,
            "clusterIPs": [service_ip],
            "sessionAffinity": "None",
            "ports": [{"name": "https", "protocol": "TCP", "port": 443, "targetPort": secure_port}],
        },
    }


def kubernetes_endpointslice(advertise_address: str, secure_port: int = 6443) -> Obj:
    family = "IPv6" if ipaddress.ip_address(advertise_address).version == 6 else "IPv4"
    return {
        "apiVersion": "discovery.k8s.io/v1",
        "kind": "EndpointSlice",
        "metadata": {"name": "kubernetes", "namespace": "default",
                     "labels": {"kubernetes.io/service-name": "kubernetes"}},
        "addressType": family,
        "endpoints": [{"addresses": [advertise_address], "conditions": {"ready": True}}],
        "ports": [{"name": "https", "port": secure_port, "protocol": "TCP"}],
    }


def bootstrap_objects(service_ip: str, advertise_address: str, secure_port: int = 6443) -> list[tuple[str, Obj]]:
    """In creation order: namespaces first (the Service and slice live in `default`)."""
    out: list[tuple[str, Obj]] = [("Namespace", namespace(n)) for n in SYSTEM_NAMESPACES]
    out.append(("Service", kubernetes_service(service_ip, secure_port)))
    out.append(("EndpointSlice", kubernetes_endpointslice(advertise_address, secure_port)))
    return out


def endpointslice_differs(current: Obj | None, want: Obj) -> bool:
    """True when the reconciler must write `want` (addresses, ports, type or the label changed)."""
    if current is None:
        return True
    labels = (current.get("metadata") or {}).get("labels") or {}
    if labels.get("kubernetes.io/service-name") != "kubernetes":
        return True
    return any(current.get(k) != want[k] for k in ("addressType", "endpoints", "ports"))
