"""meta.k8s.io/v1 Table responses with kube-apiserver's columns (k/k pkg/printers/internalversion).

Namespace, Node, Pod, Service and EndpointSlice get their upstream columns (priority 1 = shown by
`-o wide`); other kinds get the default Name / Created At. Ages are rendered like apimachinery's
duration.HumanDuration.
"""

from __future__ import annotations

import datetime as dt
import functools
import time
from collections.abc import Callable
from typing import Any

from controlplane.resources import Resource

Obj = dict[str, Any]
Col = tuple[str, str, str, int]  # name, type, format, priority


def human_duration(seconds: float) -> str:
    s = int(seconds)
    if s < -1:
        return "<invalid>"
    if s < 0:
        return "0s"
    if s < 120:
        return f"{s}s"
    m = s // 60
    if m < 10:
        return f"{m}m" if s % 60 == 0 else f"{m}m{s % 60}s"
    if m < 180:
        return f"{m}m"
    h = s // 3600
    if h < 8:
        return f"{h}h" if m % 60 == 0 else f"{h}h{m % 60}m"
    if h < 48:
        return f"{h}h"
    if h < 24 * 8:
        return f"{h // 24}d" if h % 24 == 0 else f"{h // 24}d{h % 24}h"
    if h < 24 * 365 * 2:
        return f"{h // 24}d"
    if h < 24 * 365 * 8:
        dy = (h // 24) % 365
        return f"{h // 24 // 365}y" if dy == 0 else f"{h // 24 // 365}y{dy}d"
    return f"{h // 24 // 365}y"


def _ts(v: Any) -> dt.datetime | None:
    if not isinstance(v, str) or not v:
        return None
    try:
        t = dt.datetime.fromisoformat(v.replace("Z", "+00:00"))
    except ValueError:
        return None
    return t if t.tzinfo else t.replace(tzinfo=dt.UTC)


@functools.lru_cache(maxsize=4096)
def _epoch(v: str) -> float | None:
    t = _ts(v)
    return t.timestamp() if t is not None else None


def age(obj: Obj) -> str:
    v = (obj.get("metadata") or {}).get("creationTimestamp")
    e = _epoch(v) if isinstance(v, str) else None
    if e is None:
        return "<unknown>"
    return human_duration(time.time() - e)


def _d(o: Any, *path: str) -> Any:
    for p in path:
        if not isinstance(o, dict):
            return None
        o = o.get(p)
    return o


def _list(o: Any) -> list[Any]:
    return o if isinstance(o, list) else []


def _selector(sel: Any) -> str:
    if not isinstance(sel, dict) or not sel:
        return "<none>"
    return ",".join(f"{k}={v}" for k, v in sorted(sel.items()))


# ---- Service

def _svc_external_ip(svc: Obj) -> str:
    spec = svc.get("spec") or {}
    t = spec.get("type") or "ClusterIP"
    ext = [x for x in _list(spec.get("externalIPs")) if isinstance(x, str)]
    if t in ("ClusterIP", "NodePort"):
        return ",".join(ext) if ext else "<none>"
    if t == "ExternalName":
        return str(spec.get("externalName") or "<none>")
    if t == "LoadBalancer":
        ing = []
        for i in _list(_d(svc, "status", "loadBalancer", "ingress")):
            if isinstance(i, dict):
                ing.append(i.get("ip") or i.get("hostname") or "")
        ips = [x for x in ing if x] + ext
        return ",".join(ips) if ips else "<pending>"
    return "<unknown>"


def _svc_ports(svc: Obj) -> str:
    out = []
    for p in _list(_d(svc, "spec", "ports")):
        if not isinstance(p, dict):
            continue
        proto = p.get("protocol") or "TCP"
        if p.get("nodePort"):
            out.append(f"{p.get('port')}:{p.get('nodePort')}/{proto}")
        else:
            out.append(f"{p.get('port')}/{proto}")
    return ",".join(out) if out else "<none>"


def _svc_row(o: Obj) -> list[Any]:
    spec = o.get("spec") or {}
    return [_d(o, "metadata", "name") or "", spec.get("type") or "ClusterIP", spec.get("clusterIP") or "<none>",
            _svc_external_ip(o), _svc_ports(o), age(o), _selector(spec.get("selector"))]


# ---- Pod

def _pod_row(o: Obj) -> list[Any]:
    spec, st = o.get("spec") or {}, o.get("status") or {}
    containers = _list(spec.get("containers"))
    cstats = [c for c in _list(st.get("containerStatuses")) if isinstance(c, dict)]
    ready = sum(1 for c in cstats if c.get("ready"))
    restarts = sum(int(c.get("restartCount") or 0) for c in cstats if isinstance(c.get("restartCount"), int))
    reason = st.get("reason") or st.get("phase") or "Pending"
    for c in cstats:
        state = c.get("state") or {}
        w = state.get("waiting") or {}
        term = state.get("terminated") or {}
        if isinstance(w, dict) and w.get("reason"):
            reason = w["reason"]
        elif isinstance(term, dict) and term.get("reason"):
            reason = term["reason"]
    if _d(o, "metadata", "deletionTimestamp"):
        reason = "Terminating"
    ips = [i.get("ip") for i in _list(st.get("podIPs")) if isinstance(i, dict) and i.get("ip")]
    ip = ips[0] if ips else (st.get("podIP") or "<none>")
    gates = [g for g in _list(spec.get("readinessGates")) if isinstance(g, dict)]
    if gates:
        conds = {c.get("type"): c.get("status") for c in _list(st.get("conditions")) if isinstance(c, dict)}
        ok = sum(1 for g in gates if conds.get(g.get("conditionType")) == "True")
        gate_s = f"{ok}/{len(gates)}"
    else:
        gate_s = "<none>"
    return [_d(o, "metadata", "name") or "", f"{ready}/{len(containers)}", reason, restarts, age(o), ip,
            spec.get("nodeName") or "<none>", st.get("nominatedNodeName") or "<none>", gate_s]


# ---- Node

def _node_row(o: Obj) -> list[Any]:
    st = o.get("status") or {}
    conds = [c for c in _list(st.get("conditions")) if isinstance(c, dict)]
    ready = next((c for c in conds if c.get("type") == "Ready"), None)
    status = ["Unknown" if ready is None else ("Ready" if ready.get("status") == "True" else "NotReady")]
    if _d(o, "spec", "unschedulable"):
        status.append("SchedulingDisabled")
    labels = _d(o, "metadata", "labels") or {}
    roles = sorted(k.split("/", 1)[1] for k in labels if k.startswith("node-role.kubernetes.io/"))
    if labels.get("kubernetes.io/role"):
        roles.append(str(labels["kubernetes.io/role"]))
    roles = [r for r in roles if r]
    addrs = {a.get("type"): a.get("address") for a in _list(st.get("addresses")) if isinstance(a, dict)}
    info = st.get("nodeInfo") or {}
    return [_d(o, "metadata", "name") or "", ",".join(status), ",".join(roles) if roles else "<none>", age(o),
            info.get("kubeletVersion") or "", addrs.get("InternalIP") or "<none>",
            addrs.get("ExternalIP") or "<none>", info.get("osImage") or "<unknown>",
            info.get("kernelVersion") or "<unknown>", info.get("containerRuntimeVersion") or "<unknown>"]


# ---- Namespace

def _ns_row(o: Obj) -> list[Any]:
    return [_d(o, "metadata", "name") or "", _d(o, "status", "phase") or "", age(o)]


# ---- EndpointSlice

def _es_ports(o: Obj) -> str:
    ports = [p for p in _list(o.get("ports")) if isinstance(p, dict)]
    if not ports:
        return "<unset>"
    return ",".join(str(p.get("port")) if p.get("port") is not None else "<unset>" for p in ports)


def _es_endpoints(o: Obj) -> str:
    addrs: list[str] = []
    for ep in _list(o.get("endpoints")):
        if isinstance(ep, dict):
            addrs.extend(str(a) for a in _list(ep.get("addresses")))
    if not addrs:
        return "<unset>"
    if len(addrs) > 3:
        return ",".join(addrs[:3]) + f" + {len(addrs) - 3} more..."
    return ",".join(addrs)


def _es_row(o: Obj) -> list[Any]:
    return [_d(o, "metadata", "name") or "", o.get("addressType") or "", _es_ports(o), _es_endpoints(o), age(o)]


# ---- Event (core v1 shape; events.k8s.io objects are converted back before printing)

def _since(v: Any) -> str:
    e = _epoch(v) if isinstance(v, str) and v else None
    return human_duration(time.time() - e) if e is not None else "<unknown>"


def _ev_row(o: Obj) -> list[Any]:
    if o.get("apiVersion") == "events.k8s.io/v1":
        from controlplane import eventconv

        o = eventconv.to_core(o) | {"metadata": o.get("metadata") or {}}
    series: Obj = o["series"] if isinstance(o.get("series"), dict) else {}
    first = o.get("firstTimestamp") or o.get("eventTime")
    last = series.get("lastObservedTime") or o.get("lastTimestamp") or o.get("eventTime") or first
    count = series.get("count") or o.get("count") or 1
    inv: Obj = o["involvedObject"] if isinstance(o.get("involvedObject"), dict) else {}
    obj = f"{str(inv.get('kind') or '').lower()}/{inv.get('name') or ''}"
    src: Obj = o["source"] if isinstance(o.get("source"), dict) else {}
    source = ", ".join(x for x in (src.get("component"), src.get("host")) if x) or o.get("reportingComponent") or ""
    return [_since(last), o.get("type") or "", o.get("reason") or "", obj, inv.get("fieldPath") or "",
            source, str(o.get("message") or "").strip(), _since(first), count, _d(o, "metadata", "name") or ""]


# ---- default

def _default_row(o: Obj) -> list[Any]:
    return [_d(o, "metadata", "name") or "", _d(o, "metadata", "creationTimestamp") or ""]


_NAME: Col = ("Name", "string", "name", 0)
_AGE: Col = ("Age", "string", "", 0)

PRINTERS: dict[str, tuple[list[Col], Callable[[Obj], list[Any]]]] = {
    "Service": ([_NAME, ("Type", "string", "", 0), ("Cluster-IP", "string", "", 0),
                 ("External-IP", "string", "", 0), ("Port(s)", "string", "", 0), _AGE,
                 ("Selector", "string", "", 1)], _svc_row),
    "Pod": ([_NAME, ("Ready", "string", "", 0), ("Status", "string", "", 0), ("Restarts", "string", "", 0),
             _AGE, ("IP", "string", "", 1), ("Node", "string", "", 1), ("Nominated Node", "string", "", 1),
             ("Readiness Gates", "string", "", 1)], _pod_row),
    "Node": ([_NAME, ("Status", "string", "", 0), ("Roles", "string", "", 0), _AGE,
              ("Version", "string", "", 0), ("Internal-IP", "string", "", 1), ("External-IP", "string", "", 1),
              ("OS-Image", "string", "", 1), ("Kernel-Version", "string", "", 1),
              ("Container-Runtime", "string", "", 1)], _node_row),
    "Namespace": ([_NAME, ("Status", "string", "", 0), _AGE], _ns_row),
    "EndpointSlice": ([_NAME, ("AddressType", "string", "", 0), ("Ports", "string", "", 0),
                       ("Endpoints", "string", "", 0), _AGE], _es_row),
    "Event": ([("Last Seen", "string", "", 0), ("Type", "string", "", 0), ("Reason", "string", "", 0),
               ("Object", "string", "", 0), ("Subobject", "string", "", 1), ("Source", "string", "", 1),
               ("Message", "string", "", 0), ("First Seen", "string", "", 1), ("Count", "integer", "", 1),
               ("Name", "string", "name", 1)], _ev_row),
}
_DEFAULT: tuple[list[Col], Callable[[Obj], list[Any]]] = (
    [_NAME, ("Created At", "date", "", 0)], _default_row)


def _printer(res: Resource) -> tuple[list[Col], Callable[[Obj], list[Any]]]:
    if res.group in ("", "discovery.k8s.io", "events.k8s.io"):
        return PRINTERS.get(res.kind, _DEFAULT)
    return _DEFAULT


def table(res: Resource, objs: list[Obj], *, include: str = "Metadata", headers: bool = True) -> Obj:
    cols, row = _printer(res)
    rows = []
    for o in objs:
        r: Obj = {"cells": row(o)}
        if include == "Object":
            r["object"] = o
        elif include == "Metadata":
            r["object"] = {"kind": "PartialObjectMetadata", "apiVersion": "meta.k8s.io/v1",
                           "metadata": o.get("metadata") or {}}
        rows.append(r)
    out: Obj = {"kind": "Table", "apiVersion": "meta.k8s.io/v1", "metadata": {}}
    out["columnDefinitions"] = (
        [{"name": n, "type": t, "format": f, "description": "", "priority": p} for n, t, f, p in cols]
        if headers else []
    )
    out["rows"] = rows
    return out
