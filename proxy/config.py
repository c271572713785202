"""`kpx proxy` options: kube-proxy's flag names and the KubeProxyConfiguration (v1alpha1) file.

Precedence: built-in defaults (upstream's v1alpha1 defaults) < the `--config` file < flags
given on the command line. Every mistake is a `UserError` with one line saying what to fix.
"""

from __future__ import annotations

import argparse
import ipaddress
import re
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import yaml

from kpx.errors import UserError
from proxy.modes import MODES

API_VERSION = "kubeproxy.config.k8s.io/v1alpha1"
KIND = "KubeProxyConfiguration"
IPTABLES_BACKENDS = ("auto", "legacy", "nft")


@dataclass(frozen=True, slots=True)
class ProxyOptions:
    mode: str = "iptables"
    kubeconfig: str | None = None
    master: str | None = None
    hostname_override: str | None = None
    bind_address: str | None = None  # the node IP (upstream's --bind-address)
    cluster_cidr: str | None = None
    nodeport_addresses: tuple[str, ...] = ()
    masquerade_all: bool = False
    masquerade_bit: int = 14
    sync_period: float = 30.0
    min_sync_period: float = 1.0
    metrics_bind_address: str = "127.0.0.1:10249"
    healthz_bind_address: str = "0.0.0.0:10256"
    localhost_nodeports: bool = True
    iptables_backend: str = "auto"
    ipvs_scheduler: str = "rr"
    tcp_be_liberal: bool = False
    udp_idle_timeout: float = 0.25  # userspace mode: --udp-timeout (udpIdleTimeout)
    proxy_port_range: str = ""  # userspace mode: --proxy-port-range (portRange); "" = 20000-29999
    cleanup: bool = False
    config_file: str | None = None
    verbosity: int = 0
    extra: Mapping[str, Any] = field(default_factory=dict)  # accepted config fields kpx does not act on


# --------------------------------------------------------------------------- value parsing

_DURATION = re.compile(r"(\d+(?:\.\d+)?)(ns|us|µs|ms|s|m|h)")
_UNIT = {"ns": 1e-9, "us": 1e-6, "µs": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0}


def parse_duration(value: Any, what: str) -> float:
    """Go duration ("30s", "1m0s", "250ms", "2h22m") -> seconds; a bare number means seconds."""
    if isinstance(value, int | float) and not isinstance(value, bool):
        secs = float(value)
    else:
        s = str(value).strip()
        if re.fullmatch(r"\d+(\.\d+)?", s):
            secs = float(s)
        else:
            parts = _DURATION.findall(s)
            if not parts or "".join(n + u for n, u in parts) != s:
                raise UserError(f"{what}: invalid duration {value!r} (use e.g. 30s, 1m, 250ms)")
            secs = sum(float(n) * _UNIT[u] for n, u in parts)
    if secs <= 0:
        raise UserError(f"{what}: must be greater than 0, got {value!r}")
    return secs


def parse_cidrs(value: Any, what: str) -> tuple[str, ...]:
    items = value if isinstance(value, list | tuple) else str(value or "").split(",")
    out = []
    for item in items:
        s = str(item).strip()
        if not s:
            continue
        if s == "primary":  # upstream: the node's primary IPs
            out.append(s)
            continue
        try:
            out.append(str(ipaddress.ip_network(s, strict=False)))
        except ValueError:
            raise UserError(f"{what}: {s!r} is not a CIDR (e.g. 10.244.0.0/16)") from None
    return tuple(out)


def parse_bind(value: str, default_port: int, what: str) -> tuple[str, int] | None:
    """"ip:port", "ip" or ":port" -> (ip, port); "" -> None (server disabled)."""
    s = str(value).strip()
    if not s:
        return None
    host, sep, port_s = s.rpartition(":")
    if not sep:
        host, port_s = s, str(default_port)
    host = host.strip("[]") or "0.0.0.0"
    try:
        ipaddress.ip_address(host)
        port = int(port_s)
    except ValueError:
        raise UserError(f"{what}: {value!r} must be IP:PORT (e.g. 127.0.0.1:{default_port})") from None
    if not 0 <= port <= 65535:
        raise UserError(f"{what}: port {port} out of range")
    return host, port


# --------------------------------------------------------------------------- config file

# v1alpha1 fields kpx accepts but does not act on (so real kube-proxy configs load unchanged).
_ACCEPTED = {
    "clientConnection", "configSyncPeriod", "conntrack", "detectLocal", "detectLocalMode", "enableProfiling",
    "featureGates", "logging", "oomScoreAdj", "portRange", "showHiddenMetricsForVersion", "udpIdleTimeout",
    "winkernel", "bindAddressHardFail", "windowsRunAsService", "clusterCIDR", "hostnameOverride", "mode",
    "bindAddress", "healthzBindAddress", "metricsBindAddress", "nodePortAddresses", "iptables", "ipvs",
    "nftables", "apiVersion", "kind", "syncPeriod", "minSyncPeriod",
}


def load_config_file(path: str) -> dict[str, Any]:
    """KubeProxyConfiguration YAML -> ProxyOptions field values (only what the file sets)."""
    try:
        doc = yaml.safe_load(Path(path).read_text())
    except OSError as e:
        raise UserError(f"--config {path}: {e.strerror or e}") from None
    except yaml.YAMLError as e:
        raise UserError(f"--config {path}: not valid YAML: {str(e).splitlines()[0]}") from None
    if not isinstance(doc, dict):
        raise UserError(f"--config {path}: expected a {KIND} mapping")
    if doc.get("kind") != KIND or doc.get("apiVersion") != API_VERSION:
        raise UserError(f"--config {path}: need apiVersion {API_VERSION} and kind {KIND}, "
                        f"got {doc.get('apiVersion')!r} {doc.get('kind')!r}")
    unknown = sorted(set(doc) - _ACCEPTED)
    if unknown:  # upstream decodes strictly
        raise UserError(f"--config {path}: strict decoding error: unknown field {unknown[0]!r}")
    out: dict[str, Any] = {}
    what = f"--config {path}"
    if doc.get("mode"):
        out["mode"] = str(doc["mode"])
    cc = doc.get("clientConnection") or {}
    if cc.get("kubeconfig"):
        out["kubeconfig"] = str(cc["kubeconfig"])
    for key, opt in (("hostnameOverride", "hostname_override"), ("bindAddress", "bind_address")):
        if doc.get(key):
            out[opt] = str(doc[key])
    if doc.get("clusterCIDR"):
        out["cluster_cidr"] = ",".join(parse_cidrs(doc["clusterCIDR"], f"{what}: clusterCIDR"))
    if doc.get("nodePortAddresses"):
        out["nodeport_addresses"] = parse_cidrs(doc["nodePortAddresses"], f"{what}: nodePortAddresses")
    for key, opt in (("healthzBindAddress", "healthz_bind_address"), ("metricsBindAddress", "metrics_bind_address")):
        if doc.get(key) is not None:
            out[opt] = str(doc[key])
    # mode-specific sections; the one of the selected mode wins (applied in resolve())
    for section in ("iptables", "ipvs", "nftables"):
        sec = doc.get(section) or {}
        if not isinstance(sec, dict):
            raise UserError(f"{what}: {section} must be a mapping")
        vals: dict[str, Any] = {}
        if sec.get("syncPeriod") is not None:
            vals["sync_period"] = parse_duration(sec["syncPeriod"], f"{what}: {section}.syncPeriod")
        if sec.get("minSyncPeriod") is not None:
            vals["min_sync_period"] = parse_duration(sec["minSyncPeriod"], f"{what}: {section}.minSyncPeriod")
        if sec.get("masqueradeAll") is not None:
            vals["masquerade_all"] = bool(sec["masqueradeAll"])
        if sec.get("masqueradeBit") is not None:
            vals["masquerade_bit"] = int(sec["masqueradeBit"])
        if section == "iptables" and sec.get("localhostNodePorts") is not None:
            vals["localhost_nodeports"] = bool(sec["localhostNodePorts"])
        if section == "ipvs" and sec.get("scheduler"):
            vals["ipvs_scheduler"] = str(sec["scheduler"])
        out[f"_{section}"] = vals
    for key, opt in (("syncPeriod", "sync_period"), ("minSyncPeriod", "min_sync_period")):
        if doc.get(key) is not None:  # v1alpha2-style top-level periods
            out[opt] = parse_duration(doc[key], f"{what}: {key}")
    if doc.get("udpIdleTimeout") is not None:
        out["udp_idle_timeout"] = parse_duration(doc["udpIdleTimeout"], f"{what}: udpIdleTimeout")
    if doc.get("portRange"):
        out["proxy_port_range"] = str(doc["portRange"])
    ct = doc.get("conntrack") or {}
    if ct.get("tcpBeLiberal") is not None:
        out["tcp_be_liberal"] = bool(ct["tcpBeLiberal"])
    out["extra"] = {k: doc[k] for k in ("featureGates", "detectLocalMode", "portRange") if k in doc}
    return out


# --------------------------------------------------------------------------- flags

FLAG_DESTS = {
    "proxy_mode": "mode",
    "udp_timeout": "udp_idle_timeout",
    "proxy_port_range": "proxy_port_range",
    "kubeconfig": "kubeconfig",
    "master": "master",
    "hostname_override": "hostname_override",
    "bind_address": "bind_address",
    "cluster_cidr": "cluster_cidr",
    "nodeport_addresses": "nodeport_addresses",
    "masquerade_all": "masquerade_all",
    "iptables_masquerade_bit": "masquerade_bit",
    "iptables_sync_period": "sync_period",
    "iptables_min_sync_period": "min_sync_period",
    "metrics_bind_address": "metrics_bind_address",
    "healthz_bind_address": "healthz_bind_address",
    "iptables_localhost_nodeports": "localhost_nodeports",
    "iptables_backend": "iptables_backend",
    "ipvs_scheduler": "ipvs_scheduler",
    "conntrack_tcp_be_liberal": "tcp_be_liberal",
    "cleanup": "cleanup",
    "config": "config_file",
    "v": "verbosity",
}


def _go_duration(secs: float) -> str:
    ms = round(secs * 1000)
    if ms % 1000:
        return f"{ms}ms"
    s = ms // 1000
    h, rem = divmod(s, 3600)
    m, s = divmod(rem, 60)
    return (f"{h}h" if h else "") + (f"{m}m" if h or m else "") + f"{s}s"


def to_config_doc(o: ProxyOptions) -> dict[str, Any]:
    """The resolved options as a KubeProxyConfiguration (what --write-config-to writes)."""
    section = {
        "masqueradeAll": o.masquerade_all,
        "masqueradeBit": o.masquerade_bit,
        "syncPeriod": _go_duration(o.sync_period),
        "minSyncPeriod": _go_duration(o.min_sync_period),
    }
    doc: dict[str, Any] = {
        "apiVersion": API_VERSION,
        "kind": KIND,
        "mode": o.mode,
        "bindAddress": o.bind_address or "0.0.0.0",
        "clientConnection": {"kubeconfig": o.kubeconfig or ""},
        "clusterCIDR": o.cluster_cidr or "",
        "hostnameOverride": o.hostname_override or "",
        "healthzBindAddress": o.healthz_bind_address,
        "metricsBindAddress": o.metrics_bind_address,
        "nodePortAddresses": list(o.nodeport_addresses) or None,
        "iptables": {**section, "localhostNodePorts": o.localhost_nodeports},
        "ipvs": {"scheduler": o.ipvs_scheduler, "syncPeriod": section["syncPeriod"],
                 "minSyncPeriod": section["minSyncPeriod"]},
        "nftables": dict(section),
        "conntrack": {"tcpBeLiberal": o.tcp_be_liberal},
    }
    return doc


def _bool(s: str) -> bool:
    v = s.strip().lower()
    if v in ("true", "1", "yes"):
        return True
    if v in ("false", "0", "no"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {s!r}")


def add_flags(p: argparse.ArgumentParser) -> None:
    """kube-proxy's flag names. Defaults are None so that only given flags override --config."""
    a = p.add_argument
    a("--proxy-mode", metavar="MODE", help=f"which proxy mode to use: {', '.join(MODES)} (default iptables)")
    a("--kubeconfig", metavar="PATH", help="kubeconfig file with the apiserver's address and credentials")
    a("--master", metavar="URL", help="apiserver address (overrides the kubeconfig's server)")
    a("--hostname-override", metavar="NAME", help="this node's name, if not the hostname")
    a("--bind-address", metavar="IP", help="this node's IP, added to the NodePort addresses")
    a("--cluster-cidr", metavar="CIDR", help="the pod network; ClusterIP traffic from outside it is masqueraded")
    a("--nodeport-addresses", metavar="CIDRS",
      help="comma-separated CIDRs (or 'primary') whose local IPs accept NodePorts (default: all local IPs)")
    a("--masquerade-all", nargs="?", const=True, type=_bool, metavar="BOOL",
      help="SNAT all traffic sent via Service cluster IPs")
    a("--iptables-masquerade-bit", type=int, metavar="BIT", help="fwmark bit for packets to SNAT (default 14)")
    a("--iptables-sync-period", metavar="DURATION", help="canary/resync interval, e.g. 30s (default 30s)")
    a("--iptables-min-sync-period", metavar="DURATION", help="minimum interval between syncs, e.g. 1s (default 1s)")
    a("--ipvs-sync-period", dest="iptables_sync_period", metavar="DURATION", help=argparse.SUPPRESS)
    a("--ipvs-min-sync-period", dest="iptables_min_sync_period", metavar="DURATION", help=argparse.SUPPRESS)
    a("--sync-period", dest="iptables_sync_period", metavar="DURATION", help="same as --iptables-sync-period")
    a("--min-sync-period", dest="iptables_min_sync_period", metavar="DURATION",
      help="same as --iptables-min-sync-period")
    a("--metrics-bind-address", metavar="IP:PORT", help="/metrics address (default 127.0.0.1:10249; '' disables)")
    a("--healthz-bind-address", metavar="IP:PORT", help="/healthz address (default 0.0.0.0:10256; '' disables)")
    a("--iptables-localhost-nodeports", type=_bool, metavar="BOOL",
      help="accept NodePort connections on 127.0.0.1 (default true)")
    a("--iptables-backend", choices=IPTABLES_BACKENDS, help="iptables flavour: auto (default), legacy or nft")
    a("--ipvs-scheduler", metavar="NAME", help="IPVS scheduler (default rr)")
    a("--conntrack-tcp-be-liberal", nargs="?", const=True, type=_bool, metavar="BOOL",
      help="the node uses nf_conntrack_tcp_be_liberal: no INVALID-drop rule")
    a("--udp-timeout", metavar="DURATION", help="userspace mode: idle time after which a UDP flow ends (default 250ms)")
    a("--proxy-port-range", metavar="BEGIN-END", help="userspace mode: proxy ports (BEGIN-END or BEGIN+SIZE; "
      "default 20000-29999)")
    a("--cleanup", action="store_true", default=None,
      help="remove everything kpx programmed, in every mode, then exit")
    a("--config", metavar="PATH", help="a KubeProxyConfiguration (kubeproxy.config.k8s.io/v1alpha1) YAML file")
    a("--write-config-to", metavar="PATH", help="write the resolved configuration to PATH as a "
      "KubeProxyConfiguration file, then exit")
    a("--v", "-v", type=int, metavar="N", help="log verbosity (0 info, 4+ debug)")


def resolve(args: argparse.Namespace) -> ProxyOptions:
    """Defaults < --config file < explicit flags; then validation."""
    values: dict[str, Any] = {}
    section_vals: dict[str, dict[str, Any]] = {}
    if getattr(args, "config", None):
        for k, v in load_config_file(args.config).items():
            if k.startswith("_"):
                section_vals[k[1:]] = v
            else:
                values[k] = v
    flags: dict[str, Any] = {}
    for dest, opt in FLAG_DESTS.items():
        v = getattr(args, dest, None)
        if v is not None:
            flags[opt] = v
    mode = str(flags.get("mode") or values.get("mode") or "iptables")
    if mode not in MODES:
        raise UserError(f"--proxy-mode {mode!r}: unknown mode; choose one of {', '.join(MODES)}")
    # the selected mode's section of the config file (iptables for userspace, like upstream)
    values.update(section_vals.get({"ipvs": "ipvs", "nftables": "nftables"}.get(mode, "iptables")) or {})
    values.update(flags)
    values["mode"] = mode
    if isinstance(values.get("sync_period"), str):
        values["sync_period"] = parse_duration(values["sync_period"], "--iptables-sync-period")
    if isinstance(values.get("udp_idle_timeout"), str):
        values["udp_idle_timeout"] = parse_duration(values["udp_idle_timeout"], "--udp-timeout")
    if isinstance(values.get("min_sync_period"), str):
        values["min_sync_period"] = parse_duration(values["min_sync_period"], "--iptables-min-sync-period")
    if isinstance(values.get("nodeport_addresses"), str):
        values["nodeport_addresses"] = parse_cidrs(values["nodeport_addresses"], "--nodeport-addresses")
    if values.get("cluster_cidr"):
        cidrs = parse_cidrs(values["cluster_cidr"], "--cluster-cidr")
        v4 = [c for c in cidrs if ipaddress.ip_network(c).version == 4]
        values["cluster_cidr"] = v4[0] if v4 else None
    if values.get("bind_address"):
        try:
            ipaddress.ip_address(values["bind_address"])
        except ValueError:
            raise UserError(f"--bind-address {values['bind_address']!r}: not an IP address") from None
    known = {f.name for f in fields(ProxyOptions)}
    opts = ProxyOptions(**{k: v for k, v in values.items() if k in known})
    if not 0 <= opts.masquerade_bit <= 31:
        raise UserError(f"--iptables-masquerade-bit {opts.masquerade_bit}: must be within 0-31")
    if opts.min_sync_period > opts.sync_period:
        raise UserError(f"--iptables-min-sync-period ({opts.min_sync_period:g}s) must not exceed "
                        f"--iptables-sync-period ({opts.sync_period:g}s)")
    if opts.iptables_backend not in IPTABLES_BACKENDS:
        raise UserError(f"--iptables-backend {opts.iptables_backend!r}: use auto, legacy or nft")
    parse_bind(opts.metrics_bind_address, 10249, "--metrics-bind-address")
    parse_bind(opts.healthz_bind_address, 10256, "--healthz-bind-address")
    return opts
