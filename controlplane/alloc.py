"""ClusterIP and NodePort allocation, and the Service allocation transaction.

Call signatures for the REST layer (H2a):

    ips = ClusterIPAllocator("10.96.0.0/12")          # --service-cluster-ip-range
    ports = NodePortAllocator("30000-32767")          # --service-node-port-range
    rebuild(ips, ports, existing_services)            # once at start-up, from the stored Services

    # create:  defaults -> validation -> allocate -> write -> commit / revert
    txn = allocate_service(None, svc, ips, ports, dry_run=False)   # fills spec.clusterIP(s)/nodePorts/...
    ...store write...; txn.commit() on success, txn.revert() if the write failed
    # update:  prepare_service_update(old, new) before defaulting/validation, then
    txn = allocate_service(old, new, ips, ports); write; txn.commit() / txn.revert()
    # delete:  after the object is really gone (finalizers done)
    release_service(svc, ips, ports)

`allocate_service` raises `AllocationFailed` (`.errors` = list[FieldError] -> 422 Invalid, or
`.internal` = True -> 500, e.g. "range is full"); it has already undone its own partial allocations
when it raises, so nothing is ever half-applied. `commit()` releases what the update freed (the old
IP after a change to ExternalName, dropped NodePorts); `revert()` releases what it allocated.

The bitmap is hierarchical (64-ary summary levels), so "allocate next free" is O(log64 n) whatever
the occupancy; dynamic allocation starts at a random offset in the upper band of the range and
falls back to the lower (static) band, as upstream does (KEP-3070 / KEP-3668).
"""

from __future__ import annotations

import ipaddress
import random
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from controlplane import fielderrors as fe


def _map(v: Any) -> dict[str, Any]:
    return v if isinstance(v, dict) else {}


def _list(v: Any) -> list[Any]:
    return v if isinstance(v, list) else []


_W = 64
_MASK = (1 << _W) - 1

ERR_IP_ALLOCATED = "provided IP is already allocated"
ERR_PORT_ALLOCATED = "provided port is already allocated"
ERR_FULL = "range is full"


class RangeError(Exception):
    """A specific allocation failed: value taken, or out of range."""


class RangeFull(Exception):
    pass


class Bitmap:
    """A set of offsets in [0, size) with O(log64 size) set/clear/find-first-free-from."""

    def __init__(self, size: int) -> None:
        if size <= 0:
            raise ValueError("empty range")
        self.size = size
        self.count = 0
        self.levels: list[list[int]] = []
        n = size
        while True:
            words = (n + _W - 1) // _W
            level = [0] * words
            # padding bits past the end are "allocated" so they are never handed out
            pad = words * _W - n
            if pad:
                level[-1] = (_MASK << (_W - pad)) & _MASK
            self.levels.append(level)
            if words == 1:
                break
            n = words
        # propagate padding fullness upwards
        for lvl in range(len(self.levels) - 1):
            for i, w in enumerate(self.levels[lvl]):
                if w == _MASK:
                    self._set(lvl + 1, i)

    def _set(self, lvl: int, i: int) -> None:
        levels = self.levels
        while True:
            w, b = divmod(i, _W)
            words = levels[lvl]
            words[w] |= 1 << b
            if words[w] != _MASK or lvl + 1 == len(levels):
                return
            lvl, i = lvl + 1, w

    def _clear(self, lvl: int, i: int) -> None:
        levels = self.levels
        while True:
            w, b = divmod(i, _W)
            words = levels[lvl]
            was_full = words[w] == _MASK
            words[w] &= ~(1 << b)
            if not was_full or lvl + 1 == len(levels):
                return
            lvl, i = lvl + 1, w

    def has(self, i: int) -> bool:
        w, b = divmod(i, _W)
        return bool(self.levels[0][w] >> b & 1)

    def add(self, i: int) -> bool:
        """Mark i taken; False if it already was."""
        if self.has(i):
            return False
        self._set(0, i)
        self.count += 1
        return True

    def discard(self, i: int) -> bool:
        if not self.has(i):
            return False
        self._clear(0, i)
        self.count -= 1
        return True

    def _first_free(self, lvl: int, pos: int) -> int | None:
        words = self.levels[lvl]
        w, b = divmod(pos, _W)
        if w >= len(words):
            return None
        free = ~words[w] & _MASK & (_MASK << b)
        if free:
            return w * _W + ((free & -free).bit_length() - 1)
        if lvl + 1 == len(self.levels):
            return None
        nw = self._first_free(lvl + 1, w + 1)
        if nw is None:
            return None
        free = ~words[nw] & _MASK
        return nw * _W + ((free & -free).bit_length() - 1)

    def first_free(self, start: int, end: int) -> int | None:
        """Lowest free offset in [start, end), or None."""
        if start >= end:
            return None
        i = self._first_free(0, start)
        return i if i is not None and i < end else None


def range_offset(size: int, lo: int, hi: int, step: int) -> int:
    """Size of the static (lower) band: upstream's calculateRangeOffset."""
    if size < lo:
        return 0
    return min(max(lo, size // step), hi)


class _Allocator:
    floor = 0  # offsets below it are handed out only when asked for by value

    def __init__(self, size: int, offset: int, rng: random.Random | None) -> None:
        self.bitmap = Bitmap(size)
        self.offset = offset
        self.rng = rng or random.Random()

    def _take(self, i: int) -> None:
        if not self.bitmap.add(i):
            raise RangeError(self._allocated_msg)

    def _next(self) -> int:
        bm, size = self.bitmap, self.bitmap.size
        if bm.count >= size:
            raise RangeFull(ERR_FULL)
        # dynamic band [offset, size): random start, scan forward, wrap; then the static band
        for lo, hi in ((max(self.offset, self.floor), size), (self.floor, self.offset)):
            if lo >= hi:
                continue
            start = self.rng.randrange(lo, hi)
            i = bm.first_free(start, hi)
            if i is None:
                i = bm.first_free(lo, start)
            if i is not None:
                bm.add(i)
                return i
        raise RangeFull(ERR_FULL)

    _allocated_msg = ""

    @property
    def used(self) -> int:
        return self.bitmap.count

    @property
    def free(self) -> int:
        return self.bitmap.size - self.bitmap.count


class ClusterIPAllocator(_Allocator):
    """IPs of one service CIDR; the network address (and broadcast, IPv4) are never handed out,
    and the first address is kept for the `kubernetes` Service (only allocated by value)."""

    _allocated_msg = ERR_IP_ALLOCATED
    floor = 1

    def __init__(self, cidr: str = "10.96.0.0/12", rng: random.Random | None = None) -> None:
        try:
            self.network = ipaddress.ip_network(cidr, strict=True)
        except ValueError as e:
            raise ValueError(f"invalid service CIDR {cidr!r}: {e}") from None
        self.cidr = str(self.network)
        self.family = "IPv4" if self.network.version == 4 else "IPv6"
        n = self.network.num_addresses
        usable = n - 2 if self.network.version == 4 else n - 1
        usable = min(usable, 1 << 20)  # upstream caps huge (IPv6) ranges too
        if usable <= 0:
            raise ValueError(f"service CIDR {cidr!r} has no usable addresses")
        self._base = int(self.network.network_address) + 1
        super().__init__(usable, range_offset(usable, 16, 256, 16), rng)

    def _offset(self, ip: str) -> int:
        try:
            if not isinstance(ip, str):
                raise ValueError(ip)
            addr = ipaddress.ip_address(ip)
        except ValueError:
            raise RangeError(f"{ip} is not a valid IP address") from None
        off = int(addr) - self._base
        if addr.version != self.network.version or not 0 <= off < self.bitmap.size:
            raise RangeError(
                f"provided IP ({ip}) is not in the valid range. The range of valid IPs is {self.cidr}"
            )
        return off

    def contains(self, ip: str) -> bool:
        try:
            self._offset(ip)
        except RangeError:
            return False
        return True

    def has(self, ip: str) -> bool:
        try:
            return self.bitmap.has(self._offset(ip))
        except RangeError:
            return False

    def allocate(self, ip: str) -> None:
        self._take(self._offset(ip))

    def allocate_next(self) -> str:
        return str(ipaddress.ip_address(self._base + self._next()))

    def release(self, ip: str) -> None:
        try:
            self.bitmap.discard(self._offset(ip))
        except RangeError:
            pass

    def first_ip(self) -> str:
        """The address of the `kubernetes` Service (first usable)."""
        return str(ipaddress.ip_address(self._base))


class NodePortAllocator(_Allocator):
    _allocated_msg = ERR_PORT_ALLOCATED

    def __init__(self, port_range: str = "30000-32767", rng: random.Random | None = None) -> None:
        try:
            lo_s, _, hi_s = port_range.partition("-")
            lo, hi = int(lo_s), int(hi_s or lo_s)
        except ValueError:
            raise ValueError(f"invalid node port range {port_range!r}: want BASE-MAX, e.g. 30000-32767") from None
        if not 0 < lo <= hi <= 65535:
            raise ValueError(f"invalid node port range {port_range!r}: want BASE-MAX, e.g. 30000-32767")
        self.base, self.max = lo, hi
        self.port_range = f"{lo}-{hi}"
        size = hi - lo + 1
        super().__init__(size, range_offset(size, 16, 128, 32), rng)

    def _offset(self, port: int) -> int:
        if not self.base <= port <= self.max:
            raise RangeError(
                f"provided port is not in the valid range. The range of valid ports is {self.port_range}"
            )
        return port - self.base

    def contains(self, port: int) -> bool:
        return self.base <= port <= self.max

    def has(self, port: int) -> bool:
        return self.contains(port) and self.bitmap.has(port - self.base)

    def allocate(self, port: int) -> None:
        self._take(self._offset(port))

    def allocate_next(self) -> int:
        return self.base + self._next()

    def release(self, port: int) -> None:
        if self.contains(port):
            self.bitmap.discard(port - self.base)


# ---------------------------------------------------------------- Service logic


class AllocationFailed(Exception):
    def __init__(self, errors: list[fe.FieldError], internal: bool = False, message: str = "") -> None:
        super().__init__(message or "; ".join(str(e) for e in errors))
        self.errors = errors
        self.internal = internal
        self.message = message or "; ".join(str(e) for e in errors)


def _spec(svc: dict[str, Any] | None) -> dict[str, Any]:
    if not svc:
        return {}
    s = svc.get("spec")
    return s if isinstance(s, dict) else {}


def svc_type(svc: dict[str, Any] | None) -> str:
    return _spec(svc).get("type") or "ClusterIP"


def needs_cluster_ip(svc: dict[str, Any] | None) -> bool:
    return svc is not None and svc_type(svc) != "ExternalName"


def needs_node_ports(svc: dict[str, Any] | None) -> bool:
    t = svc_type(svc)
    if t == "NodePort":
        return True
    if t == "LoadBalancer":
        return _spec(svc).get("allocateLoadBalancerNodePorts", True) is not False
    return False


def needs_hc_node_port(svc: dict[str, Any] | None) -> bool:
    s = _spec(svc)
    return svc_type(svc) == "LoadBalancer" and s.get("externalTrafficPolicy") == "Local"


def _ports(svc: dict[str, Any] | None) -> list[dict[str, Any]]:
    p = _spec(svc).get("ports")
    return [x for x in p if isinstance(x, dict)] if isinstance(p, list) else []


def _ips_of(svc: dict[str, Any] | None) -> list[str]:
    s = _spec(svc)
    ips = s.get("clusterIPs")
    if isinstance(ips, list) and ips:
        out = [i for i in ips if isinstance(i, str)]
    else:
        ip = s.get("clusterIP")
        out = [ip] if isinstance(ip, str) and ip else []
    return [i for i in out if i and i != "None"]


def _node_ports_of(svc: dict[str, Any] | None) -> set[int]:
    out = {p["nodePort"] for p in _ports(svc) if isinstance(p.get("nodePort"), int) and p["nodePort"]}
    hc = _spec(svc).get("healthCheckNodePort")
    if isinstance(hc, int) and hc:
        out.add(hc)
    return out


def prepare_service_update(old: dict[str, Any], new: dict[str, Any]) -> None:
    """Before defaulting/validation of an update: carry allocated values a client left out
    (patchAllocatedValues, so `kubectl replace` of a stripped spec works) and drop the fields the
    type change makes meaningless, when the client left them unchanged (dropTypeDependentFields)."""
    ns = new.setdefault("spec", {})
    os_ = _spec(old)
    # patchAllocatedValues
    if needs_cluster_ip(old) and needs_cluster_ip(new):
        if not ns.get("clusterIP") and os_.get("clusterIP"):
            ns["clusterIP"] = os_["clusterIP"]
        if not ns.get("clusterIPs") and os_.get("clusterIPs"):
            ns["clusterIPs"] = list(os_["clusterIPs"])
    if needs_node_ports(old) and needs_node_ports(new):
        used = {p.get("nodePort") for p in _ports(old)} & {p.get("nodePort") for p in _ports(new)}
        by_name = {p.get("name", ""): p.get("nodePort") for p in _ports(old)}
        for p in _ports(new):
            if not p.get("nodePort"):
                v = by_name.get(p.get("name", ""))
                if v and v not in used:
                    p["nodePort"] = v
    if needs_hc_node_port(old) and needs_hc_node_port(new) and not ns.get("healthCheckNodePort"):
        hc = os_.get("healthCheckNodePort")
        if hc:
            ns["healthCheckNodePort"] = hc
    _normalize_cluster_ips(os_, ns)
    # dropTypeDependentFields
    if needs_cluster_ip(old) and not needs_cluster_ip(new):
        if ns.get("clusterIP") == os_.get("clusterIP") and ns.get("clusterIPs") == os_.get("clusterIPs"):
            ns.pop("clusterIP", None)
            ns.pop("clusterIPs", None)
        if ns.get("ipFamilies") == os_.get("ipFamilies"):
            ns.pop("ipFamilies", None)
        if ns.get("ipFamilyPolicy") == os_.get("ipFamilyPolicy"):
            ns.pop("ipFamilyPolicy", None)
    if needs_node_ports(old) and not needs_node_ports(new):
        old_np = [p.get("nodePort") for p in _ports(old)]
        new_np = [p.get("nodePort") for p in _ports(new)]
        if all(n in old_np for n in new_np if n):
            for p in _ports(new):
                p.pop("nodePort", None)
    hc_same = ns.get("healthCheckNodePort") == os_.get("healthCheckNodePort")
    if needs_hc_node_port(old) and not needs_hc_node_port(new) and hc_same:
        ns.pop("healthCheckNodePort", None)
    old_t, new_t = svc_type(old), svc_type(new)
    if old_t == "LoadBalancer" and new_t != "LoadBalancer":
        for f in ("allocateLoadBalancerNodePorts", "loadBalancerClass"):
            if f in ns and ns.get(f) == os_.get(f):
                ns.pop(f)
    external = ("NodePort", "LoadBalancer")
    etp_same = "externalTrafficPolicy" in ns and ns.get("externalTrafficPolicy") == os_.get("externalTrafficPolicy")
    if old_t in external and new_t not in external and etp_same:
        ns.pop("externalTrafficPolicy")


def _normalize_cluster_ips(os_: dict[str, Any], ns: dict[str, Any]) -> None:
    """Keep clusterIP and clusterIPs in step when a client only changed one (normalizeClusterIPs)."""
    old_ips, new_ips = _list(os_.get("clusterIPs")), _list(ns.get("clusterIPs"))
    if old_ips and not new_ips and os_.get("clusterIP") == ns.get("clusterIP"):
        ns["clusterIPs"] = list(old_ips)
        new_ips = ns["clusterIPs"]
    if os_.get("clusterIP") != ns.get("clusterIP") and new_ips == old_ips:
        if os_.get("clusterIP") and not ns.get("clusterIP"):
            ns.pop("clusterIPs", None)
        else:
            ns["clusterIPs"] = [ns["clusterIP"]]


@dataclass
class ServiceTxn:
    """Result of allocate_service: what was taken now and what to free once the write succeeded."""

    ips: ClusterIPAllocator
    ports: NodePortAllocator
    allocated_ips: list[str] = field(default_factory=list)
    allocated_ports: list[int] = field(default_factory=list)
    release_ips: list[str] = field(default_factory=list)
    release_ports: list[int] = field(default_factory=list)
    dry_run: bool = False
    done: bool = False

    def commit(self) -> None:
        if self.done:
            return
        self.done = True
        if self.dry_run:
            self._undo()
            return
        for ip in self.release_ips:
            self.ips.release(ip)
        for p in self.release_ports:
            self.ports.release(p)

    def revert(self) -> None:
        if self.done:
            return
        self.done = True
        self._undo()

    def _undo(self) -> None:
        for ip in self.allocated_ips:
            self.ips.release(ip)
        for p in self.allocated_ports:
            self.ports.release(p)


def allocate_service(
    old: dict[str, Any] | None,
    new: dict[str, Any],
    ips: ClusterIPAllocator,
    ports: NodePortAllocator,
    *,
    dry_run: bool = False,
) -> ServiceTxn:
    """Allocate what `new` needs given `old` (None on create); mutates `new`'s spec in place."""
    txn = ServiceTxn(ips, ports, dry_run=dry_run)
    try:
        _alloc_ips(old, new, txn)
        _alloc_node_ports(old, new, txn)
    except AllocationFailed:
        txn.revert()
        raise
    return txn


def _alloc_ips(old: dict[str, Any] | None, new: dict[str, Any], txn: ServiceTxn) -> None:
    spec = new.setdefault("spec", {})
    old_ips = _ips_of(old) if needs_cluster_ip(old) else []
    if not needs_cluster_ip(new):
        txn.release_ips.extend(old_ips)
        return
    ip = spec.get("clusterIP") or ""
    cips = spec.get("clusterIPs") if isinstance(spec.get("clusterIPs"), list) else []
    if not ip and cips:
        ip = cips[0]
    if ip == "None":
        spec["clusterIP"] = "None"
        spec["clusterIPs"] = ["None"]
        txn.release_ips.extend(old_ips)
        return
    if ip and ip in old_ips:
        spec["clusterIP"] = ip
        if not cips:
            spec["clusterIPs"] = [ip]
        return  # unchanged (immutability is validation's job)
    if ip:
        try:
            txn.ips.allocate(ip)
        except RangeError as e:
            raise AllocationFailed(
                [fe.invalid("spec.clusterIPs", [ip], f"failed to allocate IP {ip}: {e}")]
            ) from None
        txn.allocated_ips.append(ip)
    else:
        try:
            ip = txn.ips.allocate_next()
        except RangeFull:
            raise AllocationFailed([], internal=True, message=f"failed to allocate a serviceIP: {ERR_FULL}") from None
        txn.allocated_ips.append(ip)
    spec["clusterIP"] = ip
    spec["clusterIPs"] = [ip] + [c for c in cips[1:] if isinstance(c, str)]
    txn.release_ips.extend(i for i in old_ips if i != ip)


def _alloc_node_ports(old: dict[str, Any] | None, new: dict[str, Any], txn: ServiceTxn) -> None:
    spec = new.setdefault("spec", {})
    old_ports = _node_ports_of(old)
    keep: set[int] = set()
    if needs_node_ports(new):
        taken_here: dict[int, set[str]] = {}  # nodePort -> protocols using it in this Service
        for i, p in enumerate(_ports(new)):
            proto = p.get("protocol") or "TCP"
            np = p.get("nodePort")
            path = f"spec.ports[{i}].nodePort"
            if isinstance(np, int) and np:
                if np in taken_here:
                    # same nodePort for another protocol of this Service is fine (one allocation)
                    taken_here[np].add(proto)
                    continue
                if np not in old_ports:
                    try:
                        txn.ports.allocate(np)
                    except RangeError as e:
                        raise AllocationFailed([fe.invalid(path, np, str(e))]) from None
                    txn.allocated_ports.append(np)
            else:
                try:
                    np = txn.ports.allocate_next()
                except RangeFull:
                    raise AllocationFailed([], internal=True, message=f"failed to allocate a nodePort: {ERR_FULL}") from None
                txn.allocated_ports.append(np)
                p["nodePort"] = np
            taken_here.setdefault(np, set()).add(proto)
            keep.add(np)
    if needs_hc_node_port(new):
        hc = spec.get("healthCheckNodePort")
        if isinstance(hc, int) and hc:
            if hc not in old_ports and hc not in keep:
                try:
                    txn.ports.allocate(hc)
                except RangeError as e:
                    raise AllocationFailed([fe.invalid("spec.healthCheckNodePort", hc, str(e))]) from None
                txn.allocated_ports.append(hc)
        else:
            try:
                hc = txn.ports.allocate_next()
            except RangeFull:
                raise AllocationFailed(
                    [], internal=True, message=f"failed to allocate a nodePort: {ERR_FULL}"
                ) from None
            txn.allocated_ports.append(hc)
            spec["healthCheckNodePort"] = hc
        keep.add(hc)
    txn.release_ports.extend(sorted(old_ports - keep))


def release_service(svc: dict[str, Any], ips: ClusterIPAllocator, ports: NodePortAllocator) -> None:
    """Free everything a deleted Service held."""
    if needs_cluster_ip(svc):
        for ip in _ips_of(svc):
            ips.release(ip)
    for p in _node_ports_of(svc):
        ports.release(p)


def rebuild(ips: ClusterIPAllocator, ports: NodePortAllocator, services: Iterable[dict[str, Any]]) -> list[str]:
    """Mark the values held by stored Services as taken; returns warnings for values out of range
    or held twice (left as they are, like upstream's repair loop reports them)."""
    warnings: list[str] = []
    for svc in services:
        meta = _map(svc.get("metadata"))
        who = f"{meta.get('namespace', '')}/{meta.get('name', '')}"
        if needs_cluster_ip(svc):
            for ip in _ips_of(svc):
                if not ips.contains(ip):
                    try:
                        same_family = ipaddress.ip_address(ip).version == ips.network.version
                    except ValueError:
                        same_family = True
                    if same_family:
                        warnings.append(f"service {who}: cluster IP {ip} is not within {ips.cidr}")
                    continue
                try:
                    ips.allocate(ip)
                except RangeError:
                    warnings.append(f"service {who}: cluster IP {ip} is allocated to more than one service")
        for p in _node_ports_of(svc):
            if not ports.contains(p):
                warnings.append(f"service {who}: node port {p} is not within {ports.port_range}")
                continue
            try:
                ports.allocate(p)
            except RangeError:
                warnings.append(f"service {who}: node port {p} is allocated to more than one service")
    return warnings
