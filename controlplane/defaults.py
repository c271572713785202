"""Per-kind defaulting, as kube-apiserver applies it (k/k pkg/apis/core/v1/defaults.go,
pkg/apis/discovery/v1/defaults.go and the registry strategies' PrepareForCreate).

Call signature for the REST layer (H2a), on every create and update body (after decoding,
before validation; on update after `alloc.prepare_service_update(old, new)`):

    defaults.apply_defaults(kind, obj, create=True|False, ip_family="IPv4")

Mutates `obj` in place. With `create=True` it also does the create-time status work of the
strategies (Pod status reset to phase Pending + qosClass, Namespace status.phase Active and the
`kubernetes` finalizer, Service status.loadBalancer {}) and what the default admission plugins add
to a new Pod (priority, preemptionPolicy, the 300 s not-ready/unreachable tolerations).
Unknown kinds are left alone.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

Obj = dict[str, Any]


def _map(v: Any) -> dict[str, Any]:
    return v if isinstance(v, dict) else {}


def _list(v: Any) -> list[Any]:
    return v if isinstance(v, list) else []


def _d(parent: Obj, key: str) -> Obj:
    v = parent.get(key)
    if not isinstance(v, dict):
        v = {}
        parent[key] = v
    return v


def _dicts(v: Any) -> list[Obj]:
    return [x for x in v if isinstance(x, dict)] if isinstance(v, list) else []


# ---------------------------------------------------------------- Service


def _family_of(ip: str) -> str | None:
    if not ip or ip == "None":
        return None
    return "IPv6" if ":" in ip else "IPv4"


def default_service(svc: Obj, *, create: bool = True, ip_family: str = "IPv4") -> None:
    spec = _d(svc, "spec")
    stype = spec.get("type") or "ClusterIP"
    spec["type"] = stype
    if not spec.get("sessionAffinity"):
        spec["sessionAffinity"] = "None"
    if spec["sessionAffinity"] == "ClientIP":
        cfg = _d(_d(spec, "sessionAffinityConfig"), "clientIP")
        if cfg.get("timeoutSeconds") is None:
            cfg["timeoutSeconds"] = 10800
    elif spec["sessionAffinity"] == "None" and spec.get("sessionAffinityConfig") in ({}, None):
        spec.pop("sessionAffinityConfig", None)
    for p in _dicts(spec.get("ports")):
        if not p.get("protocol"):
            p["protocol"] = "TCP"
        if p.get("targetPort") in (None, 0, "") and isinstance(p.get("port"), int):
            p["targetPort"] = p["port"]
    if stype in ("NodePort", "LoadBalancer") and not spec.get("externalTrafficPolicy"):
        spec["externalTrafficPolicy"] = "Cluster"
    if stype != "ExternalName" and not spec.get("internalTrafficPolicy"):
        spec["internalTrafficPolicy"] = "Cluster"
    if stype == "LoadBalancer" and spec.get("allocateLoadBalancerNodePorts") is None:
        spec["allocateLoadBalancerNodePorts"] = True
    # clusterIP <-> clusterIPs mirror (conversion upstream)
    ips = spec.get("clusterIPs")
    if spec.get("clusterIP") and not ips:
        spec["clusterIPs"] = [spec["clusterIP"]]
    elif isinstance(ips, list) and ips and not spec.get("clusterIP") and isinstance(ips[0], str):
        spec["clusterIP"] = ips[0]
    if stype != "ExternalName":
        _default_ip_families(spec, ip_family)
    if create:
        st = svc.get("status")
        svc["status"] = {"loadBalancer": {}} if not isinstance(st, dict) else {**st}
        _d(svc["status"], "loadBalancer")


def _default_ip_families(spec: Obj, cluster_family: str) -> None:
    other = "IPv6" if cluster_family == "IPv4" else "IPv4"
    ips = [i for i in (_list(spec.get("clusterIPs"))) if isinstance(i, str)]
    fams = spec.get("ipFamilies")
    if not isinstance(fams, list) or not fams:
        fams = [f for f in (_family_of(i) for i in ips) if f]
    fams = [f for f in fams if isinstance(f, str)]
    policy = spec.get("ipFamilyPolicy")
    if not policy and (len(fams) == 2 or len(ips) == 2):
        policy = "RequireDualStack"
    if spec.get("clusterIP") == "None" and not spec.get("selector"):
        policy = policy or "RequireDualStack"
        fams = fams or [cluster_family]
        if len(fams) < 2 and policy != "SingleStack":
            fams = fams + [other if fams[0] == cluster_family else cluster_family]
    spec["ipFamilyPolicy"] = policy or "SingleStack"
    spec["ipFamilies"] = fams or [cluster_family]


# ---------------------------------------------------------------- Pod

_PROBE_DEFAULTS = {"timeoutSeconds": 1, "periodSeconds": 10, "successThreshold": 1, "failureThreshold": 3}


def _image_pull_policy(image: str) -> str:
    if "@" in image:
        return "IfNotPresent"
    last = image.rsplit("/", 1)[-1]
    tag = last.rsplit(":", 1)[1] if ":" in last else ""
    return "Always" if tag in ("", "latest") else "IfNotPresent"


def _default_probe(probe: Any) -> None:
    if not isinstance(probe, dict):
        return
    for k, v in _PROBE_DEFAULTS.items():
        probe.setdefault(k, v)
    hg = probe.get("httpGet")
    if isinstance(hg, dict):
        hg.setdefault("scheme", "HTTP")
        hg.setdefault("path", "/")


def _default_container(c: Obj, host_network: bool) -> None:
    c.setdefault("terminationMessagePath", "/dev/termination-log")
    c.setdefault("terminationMessagePolicy", "File")
    if not c.get("imagePullPolicy") and isinstance(c.get("image"), str):
        c["imagePullPolicy"] = _image_pull_policy(c["image"])
    if not isinstance(c.get("resources"), dict):
        c["resources"] = {}
    res = c["resources"]
    if isinstance(res.get("limits"), dict) and res["limits"]:
        req = _d(res, "requests")
        for k, v in res["limits"].items():
            req.setdefault(k, v)
    for p in _dicts(c.get("ports")):
        if not p.get("protocol"):
            p["protocol"] = "TCP"
        if host_network and not p.get("hostPort") and isinstance(p.get("containerPort"), int):
            p["hostPort"] = p["containerPort"]
    for e in _dicts(c.get("env")):
        vf = e.get("valueFrom")
        if isinstance(vf, dict) and isinstance(vf.get("fieldRef"), dict):
            vf["fieldRef"].setdefault("apiVersion", "v1")
    for k in ("livenessProbe", "readinessProbe", "startupProbe"):
        _default_probe(c.get(k))


def _qos_class(spec: Obj) -> str:
    containers = _dicts(spec.get("containers")) + _dicts(spec.get("initContainers"))
    any_set = False
    guaranteed = True
    for c in containers:
        res = _map(c.get("resources"))
        req = _map(res.get("requests"))
        lim = _map(res.get("limits"))
        if req or lim:
            any_set = True
        for r in ("cpu", "memory"):
            if r not in lim or req.get(r, lim.get(r)) != lim.get(r):
                guaranteed = False
    if not any_set:
        return "BestEffort"
    return "Guaranteed" if guaranteed else "Burstable"


def default_pod(pod: Obj, *, create: bool = True, ip_family: str = "IPv4") -> None:
    spec = _d(pod, "spec")
    spec.setdefault("restartPolicy", "Always")
    spec.setdefault("dnsPolicy", "ClusterFirst")
    spec.setdefault("terminationGracePeriodSeconds", 30)
    spec.setdefault("schedulerName", "default-scheduler")
    if not isinstance(spec.get("securityContext"), dict):
        spec["securityContext"] = {}
    spec.setdefault("enableServiceLinks", True)
    host_net = spec.get("hostNetwork") is True
    for key in ("initContainers", "containers", "ephemeralContainers"):
        for c in _dicts(spec.get(key)):
            _default_container(c, host_net)
    for v in _dicts(spec.get("volumes")):
        for src in ("secret", "configMap", "downwardAPI", "projected"):
            if isinstance(v.get(src), dict):
                v[src].setdefault("defaultMode", 420)
        if isinstance(v.get("hostPath"), dict):
            v["hostPath"].setdefault("type", "")
    for t in _dicts(spec.get("tolerations")):
        if t.get("operator") is None and "key" in t and "value" not in t:
            t["operator"] = "Exists"
    if create:
        _admission_defaults(spec)
        pod["status"] = {"phase": "Pending", "qosClass": _qos_class(spec)}


def _admission_defaults(spec: Obj) -> None:
    """What kube-apiserver's default-on admission plugins add to every new Pod: Priority
    (priority 0, preemptionPolicy) and DefaultTolerationSeconds (300 s for not-ready/unreachable)."""
    if not spec.get("priorityClassName"):
        spec.setdefault("priority", 0)
        spec.setdefault("preemptionPolicy", "PreemptLowerPriority")
    tols = _list(spec.get("tolerations"))
    for key in ("node.kubernetes.io/not-ready", "node.kubernetes.io/unreachable"):
        if not any(isinstance(t, dict) and t.get("key") in (key, None, "") and t.get("effect") in (None, "", "NoExecute")
                   and (t.get("key") or t.get("operator") == "Exists") for t in tols):
            tols = [*tols, {"key": key, "operator": "Exists", "effect": "NoExecute", "tolerationSeconds": 300}]
    spec["tolerations"] = tols


# ---------------------------------------------------------------- EndpointSlice / Node / Namespace


def default_endpointslice(es: Obj, *, create: bool = True, ip_family: str = "IPv4") -> None:
    for p in _dicts(es.get("ports")):
        if p.get("protocol") is None:
            p["protocol"] = "TCP"
        if p.get("name") is None:
            p["name"] = ""
    es.setdefault("endpoints", None)  # not omitempty upstream: an empty slice reads `endpoints: null`


def default_node(node: Obj, *, create: bool = True, ip_family: str = "IPv4") -> None:
    _d(node, "spec")
    st = node.get("status")
    if isinstance(st, dict) and isinstance(st.get("capacity"), dict) and not st.get("allocatable"):
        st["allocatable"] = dict(st["capacity"])


def default_namespace(ns: Obj, *, create: bool = True, ip_family: str = "IPv4") -> None:
    meta = _d(ns, "metadata")
    name = meta.get("name")
    if isinstance(name, str) and name:
        _d(meta, "labels")["kubernetes.io/metadata.name"] = name
    if create:
        spec = _d(ns, "spec")
        fins = _list(spec.get("finalizers"))
        if "kubernetes" not in fins:
            fins = [*fins, "kubernetes"]
        spec["finalizers"] = fins
        ns["status"] = {"phase": "Active"}


_DEFAULTERS: dict[str, Callable[..., None]] = {
    "Service": default_service,
    "Pod": default_pod,
    "EndpointSlice": default_endpointslice,
    "Node": default_node,
    "Namespace": default_namespace,
}


def apply_defaults(kind: str, obj: Obj, *, create: bool = True, ip_family: str = "IPv4") -> None:
    fn = _DEFAULTERS.get(kind)
    if fn is not None:
        fn(obj, create=create, ip_family=ip_family)
