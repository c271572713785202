"""Per-kind validation for create and update, worded as kube-apiserver words it
(k/k pkg/apis/core/validation, pkg/apis/discovery/validation, apimachinery validation).

Call signatures for the REST layer (H2a), after defaulting:

    errs = validation.validate_create(kind, obj, ip_families=("IPv4",))
    errs = validation.validate_update(kind, new, old, ip_families=("IPv4",), subresource="")  # or "status"
    if errs: raise errors.invalid(kind, name, [e.cause() for e in errs], group)

Each returns a list of `fielderrors.FieldError` (empty = valid). Metadata rules (names per kind,
generateName, labels, annotations, finalizers, ownerReferences; immutable name/namespace/uid/
creationTimestamp on update) are included. `ip_families` are the families the cluster serves
(the service CIDRs'); dual-stack is rejected when only one is configured.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Callable
from functools import lru_cache
from typing import Any, TypeGuard

from controlplane import fielderrors as fe
from controlplane.fielderrors import FieldError

Obj = dict[str, Any]


def _map(v: Any) -> dict[str, Any]:
    return v if isinstance(v, dict) else {}


def _list(v: Any) -> list[Any]:
    return v if isinstance(v, list) else []

# ---------------------------------------------------------------- name / label syntax (apimachinery)

_DNS1123_LABEL = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?\Z")
_DNS1123_SUBDOMAIN = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*\Z")
_DNS1035_LABEL = re.compile(r"[a-z]([-a-z0-9]*[a-z0-9])?\Z")
_QUALIFIED_NAME = re.compile(r"([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9]\Z")
_LABEL_VALUE = re.compile(r"(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?\Z")
_PORT_NAME_CHARS = re.compile(r"[-a-z0-9]+\Z")
_HAS_LETTER = re.compile(r"[a-z]")

MSG_DNS1123_LABEL = (
    "a lowercase RFC 1123 label must consist of lower case alphanumeric characters or '-', and must start"
    " and end with an alphanumeric character (e.g. 'my-name',  or '123-abc', regex used for validation is"
    " '[a-z0-9]([-a-z0-9]*[a-z0-9])?')"
)
MSG_DNS1123_SUBDOMAIN = (
    "a lowercase RFC 1123 subdomain must consist of lower case alphanumeric characters, '-' or '.', and must"
    " start and end with an alphanumeric character (e.g. 'example.com', regex used for validation is"
    " '[a-z0-9]([-a-z0-9]*[a-z0-9])?(\\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*')"
)
MSG_DNS1035_LABEL = (
    "a DNS-1035 label must consist of lower case alphanumeric characters or '-', start with an alphabetic"
    " character, and end with an alphanumeric character (e.g. 'my-name',  or 'abc-123', regex used for"
    " validation is '[a-z]([-a-z0-9]*[a-z0-9])?')"
)
MSG_QUALIFIED_NAME = (
    "name part must consist of alphanumeric characters, '-', '_' or '.', and must start and end with an"
    " alphanumeric character (e.g. 'MyName',  or 'my.name',  or '123-abc', regex used for validation is"
    " '([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9]')"
)
MSG_LABEL_VALUE = (
    "a valid label must be an empty string or consist of alphanumeric characters, '-', '_' or '.', and must"
    " start and end with an alphanumeric character (e.g. 'MyValue',  or 'my_value',  or '12345', regex used"
    " for validation is '(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?')"
)
MSG_PORT_RANGE = "must be between 1 and 65535, inclusive"
MSG_IMMUTABLE = "field is immutable"
PROTOCOLS = ("SCTP", "TCP", "UDP")


def dns1123_label(v: str) -> list[str]:
    out = []
    if len(v) > 63:
        out.append("must be no more than 63 characters")
    if not _DNS1123_LABEL.match(v):
        out.append(MSG_DNS1123_LABEL)
    return out


def dns1123_subdomain(v: str) -> list[str]:
    out = []
    if len(v) > 253:
        out.append("must be no more than 253 characters")
    if not _DNS1123_SUBDOMAIN.match(v):
        out.append(MSG_DNS1123_SUBDOMAIN)
    return out


def dns1035_label(v: str) -> list[str]:
    out = []
    if len(v) > 63:
        out.append("must be no more than 63 characters")
    if not _DNS1035_LABEL.match(v):
        out.append(MSG_DNS1035_LABEL)
    return out


def qualified_name(v: str) -> list[str]:
    parts = v.split("/")
    if len(parts) == 1:
        name = parts[0]
    elif len(parts) == 2:
        prefix, name = parts
        if not prefix:
            return ["prefix part must be non-empty"]
        out = ["prefix part " + m for m in dns1123_subdomain(prefix)]
        if out:
            return out
    else:
        return [
            "a qualified name must consist of alphanumeric characters, '-', '_' or '.', and must start and end"
            " with an alphanumeric character (e.g. 'MyName',  or 'my.name',  or '123-abc', regex used for"
            " validation is '([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9]') with an optional DNS subdomain prefix"
            " and '/' (e.g. 'example.com/MyName')"
        ]
    if not name:
        return ["name part must be non-empty"]
    out = []
    if len(name) > 63:
        out.append("name part must be no more than 63 characters")
    if not _QUALIFIED_NAME.match(name):
        out.append(MSG_QUALIFIED_NAME)
    return out


def label_value(v: str) -> list[str]:
    out = []
    if len(v) > 63:
        out.append("must be no more than 63 characters")
    if not _LABEL_VALUE.match(v):
        out.append(MSG_LABEL_VALUE)
    return out


def port_name(v: str) -> list[str]:
    """IANA_SVC_NAME (container port names, named targetPorts)."""
    out = []
    if len(v) > 15:
        out.append("must be no more than 15 characters")
    if not _PORT_NAME_CHARS.match(v):
        out.append("must contain only alpha-numeric characters (a-z, 0-9), and hyphens (-)")
    if v.startswith("-") or v.endswith("-"):
        out.append("must not begin or end with a hyphen")
    if "--" in v:
        out.append("must not contain consecutive hyphens")
    if v and not _HAS_LETTER.search(v):
        out.append("must contain at least one letter (a-z)")
    return out


def _is_int(v: Any) -> TypeGuard[int]:
    return isinstance(v, int) and not isinstance(v, bool)


def _dicts(v: Any) -> list[Obj]:
    return [x for x in v if isinstance(x, dict)] if isinstance(v, list) else []


def _strs(errs: list[str], path: str, value: Any) -> list[FieldError]:
    return [fe.invalid(path, value, m) for m in errs]


def validate_labels(labels: Any, path: str) -> list[FieldError]:
    out: list[FieldError] = []
    if labels is None:
        return out
    if not isinstance(labels, dict):
        return [fe.invalid(path, labels, "must be a map of string keys to string values")]
    for k, v in labels.items():
        out += _strs(qualified_name(k), path, k)
        if not isinstance(v, str):
            out.append(fe.invalid(path, v, "must be a string"))
        else:
            out += _strs(label_value(v), path, v)
    return out


def validate_annotations(ann: Any, path: str) -> list[FieldError]:
    out: list[FieldError] = []
    if ann is None:
        return out
    if not isinstance(ann, dict):
        return [fe.invalid(path, ann, "must be a map of string keys to string values")]
    total = 0
    for k, v in ann.items():
        out += _strs(qualified_name(k.lower()), path, k)
        total += len(k) + (len(v) if isinstance(v, str) else 0)
    if total > 256 * 1024:
        out.append(fe.too_long(path, 256 * 1024))
    return out


# ---------------------------------------------------------------- ObjectMeta

NameCheck = Callable[[str], list[str]]


def validate_object_meta(obj: Obj, namespaced: bool, name_check: NameCheck) -> list[FieldError]:
    meta = obj.get("metadata")
    if not isinstance(meta, dict):
        return [fe.required("metadata.name", "name or generateName is required")]
    out: list[FieldError] = []
    name = meta.get("name") or ""
    gen = meta.get("generateName") or ""
    if gen:
        masked = gen[:-1] + "a" if gen.endswith("-") else gen
        out += _strs(name_check(masked), "metadata.generateName", gen)
    if not name:
        if not gen:
            out.append(fe.required("metadata.name", "name or generateName is required"))
    elif not isinstance(name, str):
        out.append(fe.invalid("metadata.name", name, "must be a string"))
    else:
        out += _strs(name_check(name), "metadata.name", name)
    ns = meta.get("namespace") or ""
    if namespaced:
        if not ns:
            out.append(fe.required("metadata.namespace", ""))
        else:
            out += _strs(dns1123_label(ns), "metadata.namespace", ns)
    elif ns:
        out.append(fe.forbidden("metadata.namespace", "not allowed on this type"))
    out += validate_labels(meta.get("labels"), "metadata.labels")
    out += validate_annotations(meta.get("annotations"), "metadata.annotations")
    fins = meta.get("finalizers")
    if isinstance(fins, list):
        seen: set[str] = set()
        for i, f in enumerate(fins):
            p = f"metadata.finalizers[{i}]"
            if not isinstance(f, str):
                out.append(fe.invalid(p, f, "must be a string"))
                continue
            out += _strs(qualified_name(f), p, f)
            if f in seen:
                out.append(fe.duplicate(p, f))
            seen.add(f)
    for i, ref in enumerate(_dicts(meta.get("ownerReferences"))):
        p = f"metadata.ownerReferences[{i}]"
        for k in ("apiVersion", "kind", "name", "uid"):
            if not ref.get(k):
                out.append(fe.invalid(f"{p}.{k}", ref.get(k, ""), f"{k} must not be empty"))
    return out


def validate_object_meta_update(new: Obj, old: Obj) -> list[FieldError]:
    nm, om = _map(new.get("metadata")), _map(old.get("metadata"))
    out: list[FieldError] = []
    for k in ("name", "namespace", "uid", "creationTimestamp"):
        if om.get(k) and nm.get(k) != om.get(k):
            out.append(fe.invalid(f"metadata.{k}", nm.get(k, ""), MSG_IMMUTABLE))
    if om.get("deletionTimestamp") and nm.get("deletionTimestamp") != om.get("deletionTimestamp"):
        out.append(fe.invalid("metadata.deletionTimestamp", nm.get("deletionTimestamp"), MSG_IMMUTABLE))
    if om.get("deletionTimestamp"):
        added = {f for f in _list(nm.get("finalizers")) if isinstance(f, str)} - {
            f for f in _list(om.get("finalizers")) if isinstance(f, str)}
        if added:
            out.append(fe.forbidden("metadata.finalizers", f"no new finalizers can be added if the object is being deleted, found new finalizers {sorted(added)}"))
    return out


# ---------------------------------------------------------------- IPs


def _ip(v: Any, version: int | None = None) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    if not isinstance(v, str) or "%" in v:
        return None
    try:
        a = ipaddress.ip_address(v)
    except ValueError:
        return None
    if version and a.version != version:
        return None
    if isinstance(a, ipaddress.IPv4Address) and v != str(a):
        return None  # leading zeros etc.
    return a


def _family(ip: str) -> str:
    return "IPv6" if ":" in ip else "IPv4"


# ---------------------------------------------------------------- Service

SERVICE_TYPES = ("ClusterIP", "ExternalName", "LoadBalancer", "NodePort")


def _validate_service_port(p: Obj, i: int, require_name: bool, names: set[str]) -> list[FieldError]:
    path = f"spec.ports[{i}]"
    out: list[FieldError] = []
    name = p.get("name") or ""
    if require_name and not name:
        out.append(fe.required(f"{path}.name", ""))
    elif name:
        out += _strs(dns1123_label(name), f"{path}.name", name)
        if name in names:
            out.append(fe.duplicate(f"{path}.name", name))
        names.add(name)
    port = p.get("port")
    if not _is_int(port) or not 1 <= port <= 65535:
        out.append(fe.invalid(f"{path}.port", port, MSG_PORT_RANGE))
    proto = p.get("protocol")
    if not proto:
        out.append(fe.required(f"{path}.protocol", ""))
    elif proto not in PROTOCOLS:
        out.append(fe.not_supported(f"{path}.protocol", proto, PROTOCOLS))
    tp = p.get("targetPort")
    if _is_int(tp):
        if not 1 <= tp <= 65535:
            out.append(fe.invalid(f"{path}.targetPort", tp, MSG_PORT_RANGE))
    elif isinstance(tp, str):
        if tp.isdigit():
            out.append(fe.invalid(f"{path}.targetPort", tp, "must contain at least one letter (a-z)"))
        else:
            out += _strs(port_name(tp), f"{path}.targetPort", tp)
    elif tp is not None:
        out.append(fe.invalid(f"{path}.targetPort", tp, "must be an integer or a port name"))
    np_ = p.get("nodePort")
    if np_ not in (None, 0) and (not _is_int(np_) or not 1 <= np_ <= 65535):
        out.append(fe.invalid(f"{path}.nodePort", np_, MSG_PORT_RANGE))
    ap = p.get("appProtocol")
    if isinstance(ap, str) and ap:
        out += _strs(qualified_name(ap), f"{path}.appProtocol", ap)
    return out


def validate_service(svc: Obj, ip_families: tuple[str, ...] = ("IPv4",)) -> list[FieldError]:
    out = validate_object_meta(svc, True, dns1035_label)
    spec = svc.get("spec")
    if not isinstance(spec, dict):
        return out + [fe.required("spec", "")]
    stype = spec.get("type")
    if stype not in SERVICE_TYPES:
        if not stype:
            out.append(fe.required("spec.type", ""))
        else:
            out.append(fe.not_supported("spec.type", stype, SERVICE_TYPES))
    cip = spec.get("clusterIP") or ""
    cips = _list(spec.get("clusterIPs"))
    headless = cip == "None"
    ports = _dicts(spec.get("ports"))
    if not isinstance(spec.get("ports", []), list):
        out.append(fe.invalid("spec.ports", spec.get("ports"), "must be a list"))
    if not ports and not headless and stype != "ExternalName":
        out.append(fe.required("spec.ports", ""))
    names: set[str] = set()
    for i, p in enumerate(ports):
        out += _validate_service_port(p, i, len(ports) > 1, names)
    seen_pp: set[tuple[Any, Any]] = set()
    seen_np: set[tuple[Any, Any]] = set()
    for i, p in enumerate(ports):
        key = (p.get("port"), p.get("protocol"))
        if key in seen_pp:
            out.append(fe.duplicate(f"spec.ports[{i}]", {"port": key[0], "protocol": key[1]}))
        seen_pp.add(key)
        np_ = p.get("nodePort")
        if np_:
            nkey = (np_, p.get("protocol"))
            if nkey in seen_np:
                out.append(fe.duplicate(f"spec.ports[{i}].nodePort", np_))
            seen_np.add(nkey)
            if stype == "ClusterIP":
                out.append(fe.forbidden(f"spec.ports[{i}].nodePort", "may not be used when `type` is 'ClusterIP'"))
    # cluster IPs
    if cips and cip and cips[0] != cip:
        out.append(fe.invalid("spec.clusterIPs", cips, "first value must match `clusterIP`"))
    if stype == "ExternalName":
        if cips or cip:
            out.append(fe.forbidden("spec.clusterIPs", "may not be set for ExternalName services"))
        ext = spec.get("externalName") or ""
        cname = ext[:-1] if isinstance(ext, str) and ext.endswith(".") else ext
        if not cname:
            out.append(fe.required("spec.externalName", ""))
        else:
            out += _strs(dns1123_subdomain(cname), "spec.externalName", cname)
    else:
        out += _validate_cluster_ips(spec, cips, stype, ip_families)
    # session affinity
    sa = spec.get("sessionAffinity")
    if sa not in ("ClientIP", "None"):
        out.append(fe.required("spec.sessionAffinity", "") if not sa else
                   fe.not_supported("spec.sessionAffinity", sa, ("ClientIP", "None")))
    cfg = spec.get("sessionAffinityConfig")
    if sa == "ClientIP":
        t = _map(_map(cfg).get("clientIP")).get("timeoutSeconds")
        if not _is_int(t) or not 0 < t <= 86400:
            out.append(fe.invalid("spec.sessionAffinityConfig.clientIP.timeoutSeconds", t,
                                  "must be greater than 0 and less than 86400"))
    elif sa == "None" and cfg:
        out.append(fe.forbidden("spec.sessionAffinityConfig", "must not be set when session affinity is None"))
    if stype == "ExternalName" and sa == "ClientIP":
        out.append(fe.invalid("spec.sessionAffinity", sa, "may not be set to 'ClientIP' when `type` is 'ExternalName'"))
    # traffic policies
    external = stype in ("NodePort", "LoadBalancer") or (stype == "ClusterIP" and bool(spec.get("externalIPs")))
    etp = spec.get("externalTrafficPolicy")
    if etp:
        if not external:
            out.append(fe.invalid("spec.externalTrafficPolicy", etp, "may only be set for externally-accessible services"))
        elif etp not in ("Cluster", "Local"):
            out.append(fe.not_supported("spec.externalTrafficPolicy", etp, ("Cluster", "Local")))
    elif stype in ("NodePort", "LoadBalancer"):
        out.append(fe.required("spec.externalTrafficPolicy", ""))
    itp = spec.get("internalTrafficPolicy")
    if itp:
        if itp not in ("Cluster", "Local"):
            out.append(fe.not_supported("spec.internalTrafficPolicy", itp, ("Cluster", "Local")))
    elif stype != "ExternalName":
        out.append(fe.required("spec.internalTrafficPolicy", ""))
    hc = spec.get("healthCheckNodePort")
    if hc:
        if not (stype == "LoadBalancer" and etp == "Local"):
            out.append(fe.invalid("spec.healthCheckNodePort", hc,
                                  "may only be set when `type` is 'LoadBalancer' and `externalTrafficPolicy` is 'Local'"))
        elif not _is_int(hc) or not 1 <= hc <= 65535:
            out.append(fe.invalid("spec.healthCheckNodePort", hc, MSG_PORT_RANGE))
    albnp = spec.get("allocateLoadBalancerNodePorts")
    if stype == "LoadBalancer":
        if albnp is None:
            out.append(fe.required("spec.allocateLoadBalancerNodePorts", ""))
    elif albnp is not None:
        out.append(fe.forbidden("spec.allocateLoadBalancerNodePorts", "may only be used when `type` is 'LoadBalancer'"))
    if spec.get("loadBalancerSourceRanges") and stype != "LoadBalancer":
        out.append(fe.forbidden("spec.loadBalancerSourceRanges", "may only be used when `type` is 'LoadBalancer'"))
    for i, r in enumerate(_list(spec.get("loadBalancerSourceRanges"))):
        try:
            ipaddress.ip_network(str(r).strip(), strict=False)
        except ValueError:
            out.append(fe.invalid(f"spec.loadBalancerSourceRanges[{i}]", r,
                                  "must be a list of IP ranges. For example, 10.240.0.0/24,10.250.0.0/24 "))
    if spec.get("loadBalancerClass") is not None and stype != "LoadBalancer":
        out.append(fe.forbidden("spec.loadBalancerClass", "may only be used when service type is 'LoadBalancer'"))
    for i, ip in enumerate(_list(spec.get("externalIPs"))):
        if _ip(ip) is None:
            out.append(fe.invalid(f"spec.externalIPs[{i}]", ip, "must be a valid IP address, (e.g. 10.9.8.7 or 2001:db8::ffff)"))
    out += validate_labels(spec.get("selector"), "spec.selector")
    return out


def _validate_cluster_ips(spec: Obj, cips: list[Any], stype: Any, ip_families: tuple[str, ...]) -> list[FieldError]:
    out: list[FieldError] = []
    headless = bool(cips) and cips[0] == "None"
    if len(cips) > 2:
        out.append(fe.invalid("spec.clusterIPs", cips, "may only hold up to 2 values"))
    for i, ip in enumerate(cips):
        p = f"spec.clusterIPs[{i}]"
        if ip == "None":
            if i > 0:
                out.append(fe.invalid(p, ip, "may only be set to 'None' in the first entry"))
            elif stype in ("NodePort", "LoadBalancer"):
                out.append(fe.invalid(p, ip, f"may not be set to 'None' for {stype} services"))
        elif _ip(ip) is None:
            out.append(fe.invalid(p, ip, "must be empty, 'None', or a valid IP address"))
    real = [ip for ip in cips if isinstance(ip, str) and _ip(ip) is not None]
    if len(real) == 2 and _family(real[0]) == _family(real[1]):
        out.append(fe.invalid("spec.clusterIPs", cips, "may specify no more than one IP for each IP family"))
    policy = spec.get("ipFamilyPolicy")
    if policy not in ("SingleStack", "PreferDualStack", "RequireDualStack"):
        if not policy:
            out.append(fe.required("spec.ipFamilyPolicy", ""))
        else:
            out.append(fe.not_supported("spec.ipFamilyPolicy", policy, ("PreferDualStack", "RequireDualStack", "SingleStack")))
    fams = _list(spec.get("ipFamilies"))
    seen: set[str] = set()
    for i, f in enumerate(fams):
        p = f"spec.ipFamilies[{i}]"
        if f not in ("IPv4", "IPv6"):
            out.append(fe.not_supported(p, f, ("IPv4", "IPv6")))
        elif f in seen:
            out.append(fe.duplicate(p, f))
        elif not headless and f not in ip_families:
            out.append(fe.invalid(p, f, "not configured on this cluster"))
        seen.add(f)
    if len(fams) > 2:
        out.append(fe.invalid("spec.ipFamilies", fams, "may only hold up to 2 values"))
    if policy == "SingleStack" and len(fams) > 1:
        out.append(fe.invalid("spec.ipFamilies", fams, "when ipFamilyPolicy is SingleStack, only one ipFamily may be specified"))
    if policy == "SingleStack" and len(real) > 1:
        out.append(fe.invalid("spec.clusterIPs", cips, "when ipFamilyPolicy is SingleStack, only one clusterIP may be specified"))
    if policy == "RequireDualStack" and not headless and len(ip_families) < 2:
        out.append(fe.invalid("spec.ipFamilyPolicy", policy, "this cluster is not configured for dual-stack services"))
    for i, ip in enumerate(cips):
        if isinstance(ip, str) and _ip(ip) is not None and i < len(fams) and fams[i] in ("IPv4", "IPv6") and _family(ip) != fams[i]:
            out.append(fe.invalid(f"spec.clusterIPs[{i}]", cips,
                                  f"expected an {fams[i]} value as indicated by `ipFamilies[{i}]`"))
    return out


def validate_service_update(new: Obj, old: Obj, ip_families: tuple[str, ...] = ("IPv4",)) -> list[FieldError]:
    out = validate_object_meta_update(new, old)
    ns, os_ = _map(new.get("spec")), _map(old.get("spec"))
    if "ExternalName" not in (ns.get("type"), os_.get("type")):
        old_ips = os_.get("clusterIPs") or ([os_["clusterIP"]] if os_.get("clusterIP") else [])
        new_ips = ns.get("clusterIPs") or ([ns["clusterIP"]] if ns.get("clusterIP") else [])
        for i, ip in enumerate(old_ips[: min(len(old_ips), len(new_ips)) or 1]):
            if i >= len(new_ips) or new_ips[i] != ip:
                out.append(fe.invalid(f"spec.clusterIPs[{i}]", new_ips, "may not change once set"))
        old_f, new_f = _list(os_.get("ipFamilies")), _list(ns.get("ipFamilies"))
        for i in range(min(len(old_f), len(new_f))):
            if old_f[i] != new_f[i]:
                out.append(fe.invalid(f"spec.ipFamilies[{i}]", new_f, "may not change once set"))
    if os_.get("type") == "LoadBalancer" and ns.get("type") == "LoadBalancer" and os_.get("loadBalancerClass") != ns.get("loadBalancerClass"):
        out.append(fe.invalid("spec.loadBalancerClass", ns.get("loadBalancerClass"), "may not change once set"))
    return out + validate_service(new, ip_families)


# ---------------------------------------------------------------- EndpointSlice

ADDRESS_TYPES = ("FQDN", "IPv4", "IPv6")


_LL_MCAST = (ipaddress.ip_network("224.0.0.0/24"), ipaddress.ip_network("ff02::/16"))


@lru_cache(maxsize=65536)
def _endpoint_ip_problem(addr: Any, version: int) -> str:
    """'' when fine; cached because controllers rewrite the same addresses over and over."""
    a = _ip(addr, version)
    if a is None:
        return f"must be a valid IPv{version} address"
    if a.is_unspecified:
        return f"may not be unspecified ({addr})"
    if a.is_loopback:
        return "may not be in the loopback range (127.0.0.0/8, ::1/128)"
    if a.is_link_local:
        return "may not be in the link-local range (169.254.0.0/16, fe80::/10)"
    if any(a in n for n in _LL_MCAST if n.version == a.version):
        return "may not be in the link-local multicast range (224.0.0.0/24, ff02::/10)"
    return ""


def _endpoint_ip(addr: Any, path: str, version: int) -> list[FieldError]:
    try:
        msg = _endpoint_ip_problem(addr, version)
    except TypeError:  # unhashable: not an address at all
        msg = f"must be a valid IPv{version} address"
    return [fe.invalid(path, addr, msg)] if msg else []


def validate_endpointslice(es: Obj, ip_families: tuple[str, ...] = ("IPv4",)) -> list[FieldError]:
    out = validate_object_meta(es, True, dns1123_subdomain)
    at = es.get("addressType")
    if not at:
        out.append(fe.required("addressType", ""))
    elif at not in ADDRESS_TYPES:
        out.append(fe.not_supported("addressType", at, ADDRESS_TYPES))
    eps = es.get("endpoints")
    if eps is not None and not isinstance(eps, list):
        out.append(fe.invalid("endpoints", eps, "must be a list"))
    eps_l = _dicts(eps)
    if len(eps_l) > 1000:
        out.append(fe.too_many("endpoints", len(eps_l), 1000))
    for i, ep in enumerate(eps_l):
        p = f"endpoints[{i}]"
        addrs = _list(ep.get("addresses"))
        if not addrs:
            out.append(fe.required(f"{p}.addresses", "must contain at least 1 address"))
        elif len(addrs) > 100:
            out.append(fe.too_many(f"{p}.addresses", len(addrs), 100))
        for j, a in enumerate(addrs):
            ap = f"{p}.addresses[{j}]"
            if at == "IPv4":
                out += _endpoint_ip(a, ap, 4)
            elif at == "IPv6":
                out += _endpoint_ip(a, ap, 6)
            elif at == "FQDN":
                out += _strs(dns1123_subdomain(a if isinstance(a, str) else ""), ap, a)
        cond = ep.get("conditions")
        if cond is not None:
            if not isinstance(cond, dict):
                out.append(fe.invalid(f"{p}.conditions", cond, "must be an object"))
            else:
                for k in ("ready", "serving", "terminating"):
                    if cond.get(k) is not None and not isinstance(cond[k], bool):
                        out.append(fe.invalid(f"{p}.conditions.{k}", cond[k], "must be a boolean"))
        if ep.get("hostname"):
            out += _strs(dns1123_label(ep["hostname"]), f"{p}.hostname", ep["hostname"])
        if ep.get("nodeName"):
            out += _strs(dns1123_subdomain(ep["nodeName"]), f"{p}.nodeName", ep["nodeName"])
        topo = ep.get("deprecatedTopology")
        if topo is not None:
            out += validate_labels(topo, f"{p}.deprecatedTopology")
        hints = ep.get("hints")
        if isinstance(hints, dict) and len(_list(hints.get("forZones"))) > 8:
            out.append(fe.too_many(f"{p}.hints.forZones", len(hints["forZones"]), 8))
    ports = _dicts(es.get("ports"))
    if len(ports) > 100:
        out.append(fe.too_many("ports", len(ports), 100))
    names: set[str] = set()
    for i, pt in enumerate(ports):
        p = f"ports[{i}]"
        name = pt.get("name") or ""
        if name:
            out += _strs(dns1123_label(name), f"{p}.name", name)
        if name in names:
            out.append(fe.duplicate(f"{p}.name", name))
        names.add(name)
        proto = pt.get("protocol")
        if not proto:
            out.append(fe.required(f"{p}.protocol", ""))
        elif proto not in PROTOCOLS:
            out.append(fe.not_supported(f"{p}.protocol", proto, PROTOCOLS))
        port = pt.get("port")
        if port is not None and (not _is_int(port) or not 1 <= port <= 65535):
            out.append(fe.invalid(f"{p}.port", port, MSG_PORT_RANGE))
        eap = pt.get("appProtocol")
        if isinstance(eap, str) and eap:
            out += _strs(qualified_name(eap), f"{p}.appProtocol", eap)
    return out


def validate_endpointslice_update(new: Obj, old: Obj, ip_families: tuple[str, ...] = ("IPv4",)) -> list[FieldError]:
    out = validate_object_meta_update(new, old)
    if new.get("addressType") != old.get("addressType"):
        out.append(fe.invalid("addressType", new.get("addressType"), MSG_IMMUTABLE))
    return out + validate_endpointslice(new, ip_families)


# ---------------------------------------------------------------- Pod

RESTART_POLICIES = ("Always", "Never", "OnFailure")
DNS_POLICIES = ("ClusterFirst", "ClusterFirstWithHostNet", "Default", "None")
PULL_POLICIES = ("Always", "IfNotPresent", "Never")


def _validate_containers(cs: list[Obj], key: str, names: set[str]) -> list[FieldError]:
    out: list[FieldError] = []
    for i, c in enumerate(cs):
        p = f"spec.{key}[{i}]"
        name = c.get("name") or ""
        if not name:
            out.append(fe.required(f"{p}.name", ""))
        else:
            out += _strs(dns1123_label(name), f"{p}.name", name)
            if name in names:
                out.append(fe.duplicate(f"{p}.name", name))
            names.add(name)
        img = c.get("image")
        if not isinstance(img, str) or not img.strip():
            out.append(fe.required(f"{p}.image", ""))
        elif img != img.strip():
            out.append(fe.invalid(f"{p}.image", img, "must not have leading or trailing whitespace"))
        ipp = c.get("imagePullPolicy")
        if not ipp:
            out.append(fe.required(f"{p}.imagePullPolicy", ""))
        elif ipp not in PULL_POLICIES:
            out.append(fe.not_supported(f"{p}.imagePullPolicy", ipp, PULL_POLICIES))
        tmp = c.get("terminationMessagePolicy")
        if tmp not in ("File", "FallbackToLogsOnError"):
            out.append(fe.required(f"{p}.terminationMessagePolicy", "") if not tmp else
                       fe.not_supported(f"{p}.terminationMessagePolicy", tmp, ("FallbackToLogsOnError", "File")))
        pnames: set[str] = set()
        for j, port in enumerate(_dicts(c.get("ports"))):
            pp = f"{p}.ports[{j}]"
            cp = port.get("containerPort")
            if not _is_int(cp) or not 1 <= cp <= 65535:
                out.append(fe.invalid(f"{pp}.containerPort", cp, MSG_PORT_RANGE))
            hp = port.get("hostPort")
            if hp not in (None, 0) and (not _is_int(hp) or not 1 <= hp <= 65535):
                out.append(fe.invalid(f"{pp}.hostPort", hp, MSG_PORT_RANGE))
            proto = port.get("protocol")
            if not proto:
                out.append(fe.required(f"{pp}.protocol", ""))
            elif proto not in PROTOCOLS:
                out.append(fe.not_supported(f"{pp}.protocol", proto, PROTOCOLS))
            pn = port.get("name")
            if pn:
                out += _strs(port_name(pn), f"{pp}.name", pn)
                if pn in pnames:
                    out.append(fe.duplicate(f"{pp}.name", pn))
                pnames.add(pn)
        for j, e in enumerate(_dicts(c.get("env"))):
            if not e.get("name"):
                out.append(fe.required(f"{p}.env[{j}].name", ""))
        for probe in ("readinessProbe", "livenessProbe", "startupProbe"):
            if c.get(probe) is not None:
                out += _validate_probe(c[probe], f"{p}.{probe}", probe != "readinessProbe")
    return out


_HANDLERS = ("exec", "httpGet", "tcpSocket", "grpc")


def _port_num_or_name(v: Any, path: str) -> list[FieldError]:
    if _is_int(v):
        return [] if 1 <= v <= 65535 else [fe.invalid(path, v, MSG_PORT_RANGE)]
    if isinstance(v, str) and v:
        return _strs(port_name(v), path, v)
    return [fe.required(path, "")] if v in (None, "") else [fe.invalid(path, v, "must be an integer or a port name")]


def _validate_probe(pr: Any, path: str, success_must_be_one: bool) -> list[FieldError]:
    """validateProbe: one handler, non-negative timings, successThreshold 1 for liveness/startup."""
    if not isinstance(pr, dict):
        return [fe.invalid(path, pr, "must be an object")]
    out: list[FieldError] = []
    handlers = [h for h in _HANDLERS if pr.get(h) is not None]
    if not handlers:
        out.append(fe.required(path, "must specify a handler type"))
    elif len(handlers) > 1:
        out.append(fe.forbidden(f"{path}.{handlers[1]}", "may not specify more than 1 handler type"))
    for k in ("initialDelaySeconds", "timeoutSeconds", "periodSeconds", "successThreshold", "failureThreshold"):
        v = pr.get(k)
        if v is not None and (not _is_int(v) or v < 0):
            out.append(fe.invalid(f"{path}.{k}", v, "must be greater than or equal to 0"))
    st = pr.get("successThreshold")
    if success_must_be_one and _is_int(st) and st != 1:
        out.append(fe.invalid(f"{path}.successThreshold", st, "must be 1"))
    hg, ts, grpc = _map(pr.get("httpGet")), _map(pr.get("tcpSocket")), _map(pr.get("grpc"))
    if pr.get("httpGet") is not None:
        out += _port_num_or_name(hg.get("port"), f"{path}.httpGet.port")
        if hg.get("scheme") not in (None, "HTTP", "HTTPS"):
            out.append(fe.not_supported(f"{path}.httpGet.scheme", hg.get("scheme"), ("HTTP", "HTTPS")))
    if pr.get("tcpSocket") is not None:
        out += _port_num_or_name(ts.get("port"), f"{path}.tcpSocket.port")
    if pr.get("grpc") is not None and not (_is_int(grpc.get("port")) and 1 <= grpc["port"] <= 65535):
        out.append(fe.invalid(f"{path}.grpc.port", grpc.get("port"), MSG_PORT_RANGE))
    if pr.get("exec") is not None and not _list(_map(pr.get("exec")).get("command")):
        out.append(fe.required(f"{path}.exec.command", ""))
    return out


def validate_pod(pod: Obj, ip_families: tuple[str, ...] = ("IPv4",)) -> list[FieldError]:
    out = validate_object_meta(pod, True, dns1123_subdomain)
    spec = pod.get("spec")
    if not isinstance(spec, dict):
        return out + [fe.required("spec", "")]
    cs = _dicts(spec.get("containers"))
    if not cs:
        out.append(fe.required("spec.containers", ""))
    names: set[str] = set()
    out += _validate_containers(_dicts(spec.get("initContainers")), "initContainers", names)
    out += _validate_containers(cs, "containers", names)
    rp = spec.get("restartPolicy")
    if rp not in RESTART_POLICIES:
        out.append(fe.required("spec.restartPolicy", "") if not rp else fe.not_supported("spec.restartPolicy", rp, RESTART_POLICIES))
    dp = spec.get("dnsPolicy")
    if dp not in DNS_POLICIES:
        out.append(fe.required("spec.dnsPolicy", "") if not dp else fe.not_supported("spec.dnsPolicy", dp, DNS_POLICIES))
    tg = spec.get("terminationGracePeriodSeconds")
    if tg is not None and not _is_int(tg):
        out.append(fe.invalid("spec.terminationGracePeriodSeconds", tg, "must be an integer"))
    ads = spec.get("activeDeadlineSeconds")
    if ads is not None and (not _is_int(ads) or ads <= 0):
        out.append(fe.invalid("spec.activeDeadlineSeconds", ads, "must be greater than or equal to 1"))
    if spec.get("nodeName"):
        out += _strs(dns1123_subdomain(spec["nodeName"]), "spec.nodeName", spec["nodeName"])
    if spec.get("hostname"):
        out += _strs(dns1123_label(spec["hostname"]), "spec.hostname", spec["hostname"])
    out += validate_labels(spec.get("nodeSelector"), "spec.nodeSelector")
    vnames: set[str] = set()
    for i, v in enumerate(_dicts(spec.get("volumes"))):
        n = v.get("name") or ""
        if not n:
            out.append(fe.required(f"spec.volumes[{i}].name", ""))
        else:
            out += _strs(dns1123_label(n), f"spec.volumes[{i}].name", n)
            if n in vnames:
                out.append(fe.duplicate(f"spec.volumes[{i}].name", n))
            vnames.add(n)
    for i, t in enumerate(_dicts(spec.get("tolerations"))):
        op = t.get("operator")
        if op not in (None, "", "Equal", "Exists"):
            out.append(fe.not_supported(f"spec.tolerations[{i}].operator", op, ("Equal", "Exists")))
        if op == "Exists" and t.get("value"):
            out.append(fe.invalid(f"spec.tolerations[{i}].operator", t["value"], "value must be empty when `operator` is 'Exists'"))
        eff = t.get("effect")
        if eff not in (None, "", "NoSchedule", "PreferNoSchedule", "NoExecute"):
            out.append(fe.not_supported(f"spec.tolerations[{i}].effect", eff, ("NoExecute", "NoSchedule", "PreferNoSchedule")))
    return out


_POD_UPDATE_MSG = (
    "pod updates may not change fields other than `spec.containers[*].image`,`spec.initContainers[*].image`,"
    "`spec.activeDeadlineSeconds`,`spec.tolerations` (only additions to existing tolerations),"
    "`spec.terminationGracePeriodSeconds` (allow it to be set to 1 if it was previously negative)"
)


def _pod_spec_mutable_masked(spec: Obj, other: Obj) -> Obj:
    s = {**spec}
    for key in ("containers", "initContainers"):
        cs = _dicts(s.get(key))
        if cs:
            s[key] = [{k: v for k, v in c.items() if k != "image"} for c in cs]
    s.pop("activeDeadlineSeconds", None)
    s.pop("tolerations", None)
    s.pop("schedulingGates", None)
    tg_old = other.get("terminationGracePeriodSeconds")
    if isinstance(tg_old, int) and tg_old < 0:
        s.pop("terminationGracePeriodSeconds", None)
    return s


def validate_pod_update(new: Obj, old: Obj, ip_families: tuple[str, ...] = ("IPv4",)) -> list[FieldError]:
    out = validate_object_meta_update(new, old)
    ns, os_ = _map(new.get("spec")), _map(old.get("spec"))
    if _pod_spec_mutable_masked(ns, os_) != _pod_spec_mutable_masked(os_, os_):
        changed = sorted(k for k in set(ns) | set(os_) if ns.get(k) != os_.get(k))
        out.append(fe.forbidden("spec", _POD_UPDATE_MSG + "\n  changed: " + ", ".join(changed)))
    old_tol = _dicts(os_.get("tolerations"))
    new_tol = _dicts(ns.get("tolerations"))
    if any(t not in new_tol for t in old_tol):
        out.append(fe.forbidden("spec.tolerations", "existing toleration can not be modified except its tolerationSeconds"))
    oad, nad = os_.get("activeDeadlineSeconds"), ns.get("activeDeadlineSeconds")
    if oad is not None and (nad is None or (_is_int(nad) and nad > oad)):
        out.append(fe.invalid("spec.activeDeadlineSeconds", nad, "must be less than or equal to previous value"))
    return out + validate_pod(new, ip_families)


# ---------------------------------------------------------------- Node / Namespace

TAINT_EFFECTS = ("NoExecute", "NoSchedule", "PreferNoSchedule")


def validate_node(node: Obj, ip_families: tuple[str, ...] = ("IPv4",)) -> list[FieldError]:
    out = validate_object_meta(node, False, dns1123_subdomain)
    spec = _map(node.get("spec"))
    cidrs = _list(spec.get("podCIDRs"))
    if spec.get("podCIDR") and cidrs and cidrs[0] != spec["podCIDR"]:
        out.append(fe.invalid("spec.podCIDRs", cidrs, "first value must match spec.podCIDR"))
    for i, c in enumerate(cidrs or ([spec["podCIDR"]] if spec.get("podCIDR") else [])):
        try:
            ipaddress.ip_network(c, strict=True)
        except (ValueError, TypeError):
            out.append(fe.invalid(f"spec.podCIDRs[{i}]", c, "must be a valid CIDR value, (e.g. 10.9.8.0/24 or 2001:db8::/64)"))
    if len(cidrs) > 2:
        out.append(fe.invalid("spec.podCIDRs", cidrs, "may specify no more than one CIDR for each IP family"))
    seen: set[tuple[Any, Any]] = set()
    for i, t in enumerate(_dicts(spec.get("taints"))):
        p = f"spec.taints[{i}]"
        key = t.get("key") or ""
        if not key:
            out.append(fe.required(f"{p}.key", ""))
        else:
            out += _strs(qualified_name(key), f"{p}.key", key)
        if t.get("value"):
            out += _strs(label_value(t["value"]), f"{p}.value", t["value"])
        eff = t.get("effect")
        if not eff:
            out.append(fe.required(f"{p}.effect", ""))
        elif eff not in TAINT_EFFECTS:
            out.append(fe.not_supported(f"{p}.effect", eff, TAINT_EFFECTS))
        if (key, eff) in seen:
            out.append(fe.duplicate(p, {"effect": eff, "key": key}))
        seen.add((key, eff))
    return out


def validate_node_update(new: Obj, old: Obj, ip_families: tuple[str, ...] = ("IPv4",)) -> list[FieldError]:
    out = validate_object_meta_update(new, old)
    ns, os_ = _map(new.get("spec")), _map(old.get("spec"))
    if os_.get("podCIDRs") and ns.get("podCIDRs") != os_.get("podCIDRs"):
        out.append(fe.forbidden("spec.podCIDRs", "node updates may not change podCIDR except from \"\" to valid"))
    if os_.get("providerID") and ns.get("providerID") != os_.get("providerID"):
        out.append(fe.forbidden("spec.providerID", "node updates may not change providerID except from \"\" to valid"))
    return out + validate_node(new, ip_families)


def validate_namespace(ns: Obj, ip_families: tuple[str, ...] = ("IPv4",)) -> list[FieldError]:
    out = validate_object_meta(ns, False, dns1123_label)
    spec = _map(ns.get("spec"))
    for i, f in enumerate(_list(spec.get("finalizers"))):
        if f != "kubernetes":
            out += _strs(qualified_name(f) if isinstance(f, str) else ["must be a string"], f"spec.finalizers[{i}]", f)
            if isinstance(f, str) and "/" not in f:
                out.append(fe.invalid(f"spec.finalizers[{i}]", f, "name is neither a standard finalizer name nor is it fully qualified"))
    return out


def validate_namespace_update(new: Obj, old: Obj, ip_families: tuple[str, ...] = ("IPv4",)) -> list[FieldError]:
    return validate_object_meta_update(new, old) + validate_namespace(new, ip_families)


# ---------------------------------------------------------------- dispatch

_CREATE: dict[str, Callable[..., list[FieldError]]] = {
    "Service": validate_service,
    "EndpointSlice": validate_endpointslice,
    "Pod": validate_pod,
    "Node": validate_node,
    "Namespace": validate_namespace,
}
_UPDATE: dict[str, Callable[..., list[FieldError]]] = {
    "Service": validate_service_update,
    "EndpointSlice": validate_endpointslice_update,
    "Pod": validate_pod_update,
    "Node": validate_node_update,
    "Namespace": validate_namespace_update,
}
_NAMESPACED = {"Service": True, "EndpointSlice": True, "Pod": True, "Node": False, "Namespace": False}


def validate_create(kind: str, obj: Obj, *, ip_families: tuple[str, ...] = ("IPv4",)) -> list[FieldError]:
    fn = _CREATE.get(kind)
    return fn(obj, ip_families) if fn else []


def validate_update(
    kind: str, new: Obj, old: Obj, *, ip_families: tuple[str, ...] = ("IPv4",), subresource: str = ""
) -> list[FieldError]:
    """`subresource="status"` validates a /status write (spec is the stored one there)."""
    if subresource == "status":
        return validate_status_update(kind, new, old)
    if subresource:
        return validate_object_meta_update(new, old)
    fn = _UPDATE.get(kind)
    return fn(new, old, ip_families) if fn else validate_object_meta_update(new, old)


POD_PHASES = ("Failed", "Pending", "Running", "Succeeded", "Unknown")


def validate_status_update(kind: str, new: Obj, old: Obj) -> list[FieldError]:
    """`/status` writes: metadata rules plus the few status constraints clients can break."""
    out = validate_object_meta_update(new, old)
    st = _map(new.get("status"))
    if kind == "Pod":
        ph = st.get("phase")
        if ph and ph not in POD_PHASES:
            out.append(fe.not_supported("status.phase", ph, POD_PHASES))
        for i, ip in enumerate(_dicts(st.get("podIPs"))):
            if _ip(ip.get("ip")) is None:
                out.append(fe.invalid(f"status.podIPs[{i}].ip", ip.get("ip"), "must be a valid IP address"))
        if st.get("podIP") and _ip(st["podIP"]) is None:
            out.append(fe.invalid("status.podIP", st["podIP"], "must be a valid IP address"))
    elif kind == "Service":
        for i, ing in enumerate(_dicts((_map(st.get("loadBalancer"))).get("ingress"))):
            if ing.get("ip") and _ip(ing["ip"]) is None:
                out.append(fe.invalid(f"status.loadBalancer.ingress[{i}].ip", ing["ip"], "must be a valid IP address"))
    elif kind == "Node":
        for i, a in enumerate(_dicts(st.get("addresses"))):
            if not a.get("type"):
                out.append(fe.required(f"status.addresses[{i}].type", ""))
    elif kind == "Namespace":
        ph = st.get("phase")
        if ph and ph not in ("Active", "Terminating"):
            out.append(fe.not_supported("status.phase", ph, ("Active", "Terminating")))
    return out
