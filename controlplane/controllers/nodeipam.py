"""Node IPAM (upstream's range allocator): each Node gets `spec.podCIDR`/`spec.podCIDRs`, one
block per cluster CIDR (default 10.244.0.0/16 in /24s; a second, IPv6 CIDR makes it
dual-stack). Assignments survive restarts because the allocator is rebuilt from the Nodes'
existing podCIDRs before anything new is handed out; a deleted Node's blocks are released.
Like upstream's CidrSet, allocation continues after the last block handed out, so a released
block is not reused at once (stale routes to it have time to go)."""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from controlplane.controllers.api import Obj, Registry, is_not_found
from controlplane.controllers.base import Controller
from controlplane.controllers.events import record
from controlplane.controllers.informer import InformerFactory
from controlplane.controllers.objects import meta

IPNet = ipaddress.IPv4Network | ipaddress.IPv6Network


class CIDRSet:
    """Blocks of size /`mask` in `cluster_cidr`, by index."""

    def __init__(self, cluster_cidr: str, mask: int) -> None:
        self.net: IPNet = ipaddress.ip_network(cluster_cidr, strict=True)
        if not self.net.prefixlen <= mask <= self.net.max_prefixlen:
            raise ValueError(f"node CIDR mask /{mask} does not fit in cluster CIDR {cluster_cidr}")
        if mask - self.net.prefixlen > 24:
            raise ValueError(f"cluster CIDR {cluster_cidr} with /{mask} blocks has too many blocks")
        self.mask = mask
        self.size = 1 << (mask - self.net.prefixlen)
        self._step = 1 << (self.net.max_prefixlen - mask)
        self.used: set[int] = set()
        self._next = 0

    @property
    def family(self) -> int:
        return self.net.version

    def block(self, i: int) -> str:
        base = int(self.net.network_address) + i * self._step
        return f"{ipaddress.ip_address(base)}/{self.mask}"

    def index_of(self, cidr: str) -> int | None:
        """The block index of `cidr` if it is exactly one block of this set."""
        try:
            n = ipaddress.ip_network(cidr, strict=False)
        except ValueError:
            return None
        if n.version != self.net.version or n.prefixlen != self.mask or not n.subnet_of(self.net):  # type: ignore[arg-type]
            return None
        return (int(n.network_address) - int(self.net.network_address)) // self._step

    def occupy(self, cidr: str) -> bool:
        i = self.index_of(cidr)
        if i is None:
            return False
        self.used.add(i)
        return True

    def release(self, cidr: str) -> None:
        i = self.index_of(cidr)
        if i is not None:
            self.used.discard(i)

    def allocate(self) -> str | None:
        if len(self.used) >= self.size:
            return None
        for j in range(self.size):
            i = (self._next + j) % self.size
            if i not in self.used:
                self.used.add(i)
                self._next = (i + 1) % self.size
                return self.block(i)
        return None  # pragma: no cover


def default_mask(cidr: str, mask_v4: int = 24, mask_v6: int = 64) -> int:
    return mask_v6 if ":" in cidr else mask_v4


def node_pod_cidrs(node: Mapping[str, Any]) -> list[str]:
    spec = node.get("spec") or {}
    cidrs = list(spec.get("podCIDRs") or ())
    if not cidrs and spec.get("podCIDR"):
        cidrs = [spec["podCIDR"]]
    return cidrs


class NodeAllocator:
    """One CIDRSet per cluster CIDR; which Node owns which block."""

    def __init__(self, cluster_cidrs: Sequence[str], mask_v4: int = 24, mask_v6: int = 64) -> None:
        self.sets = [CIDRSet(c, default_mask(c, mask_v4, mask_v6)) for c in cluster_cidrs]
        if len({s.family for s in self.sets}) != len(self.sets):
            raise ValueError(f"at most one cluster CIDR per IP family: {', '.join(cluster_cidrs)}")
        self.owner: dict[str, str] = {}  # block -> node name

    def occupy_node(self, name: str, cidrs: Iterable[str]) -> list[str]:
        """Record a Node's existing blocks; returns the ones another Node holds already."""
        clashes = []
        for c in cidrs:
            holder = self.owner.get(c)
            if holder is not None and holder != name:
                clashes.append(c)
                continue
            for s in self.sets:
                if s.occupy(c):
                    self.owner[c] = name
                    break
        return clashes

    def allocate_node(self, name: str) -> list[str] | None:
        """One new block per set for `name` (all or nothing); None when a set is full."""
        got: list[tuple[CIDRSet, str]] = []
        for s in self.sets:
            c = s.allocate()
            if c is None:
                for s2, c2 in got:
                    s2.release(c2)
                return None
            got.append((s, c))
        for _, c in got:
            self.owner[c] = name
        return [c for _, c in got]

    def release_node(self, name: str, cidrs: Iterable[str]) -> None:
        for c in cidrs:
            if self.owner.get(c) == name:
                del self.owner[c]
                for s in self.sets:
                    s.release(c)


class NodeIpamController(Controller[str]):
    name = "nodeipam"
    needs = ("nodes",)
    resync_period = 60.0

    def __init__(self, registry: Registry, informers: InformerFactory, cluster_cidrs: Sequence[str],
                 mask_v4: int = 24, mask_v6: int = 64) -> None:
        super().__init__(registry, informers)
        self.alloc = NodeAllocator(cluster_cidrs, mask_v4, mask_v6)
        self.nodes = informers.informer("nodes")
        self.nodes.add_handler(self._node_event, lambda o, n: self._node_event(n), self._node_deleted,
                               origin=self.name)
        self.ready = False
        self.waiting: set[str] = set()  # nodes the range had no block for

    def _node_event(self, node: Obj) -> None:
        name = meta(node).get("name") or ""
        cidrs = node_pod_cidrs(node)
        if cidrs:
            if self.ready:
                self.alloc.occupy_node(name, cidrs)
        else:
            self.queue.add(name)

    def _node_deleted(self, node: Obj) -> None:
        name = meta(node).get("name") or ""
        self.waiting.discard(name)
        self.alloc.release_node(name, node_pod_cidrs(node))
        for n in self.waiting:  # a block came free
            self.queue.add(n)

    async def prepare(self) -> None:
        # Rebuild from every Node's existing assignment before handing out anything new.
        for node in sorted(self.nodes.items(), key=lambda n: meta(n).get("creationTimestamp") or ""):
            name = meta(node).get("name") or ""
            for c in self.alloc.occupy_node(name, node_pod_cidrs(node)):
                self.log.warning("controller=%s node=%s podCIDR %s is also assigned to %s",
                                 self.name, name, c, self.alloc.owner.get(c))
        self.ready = True

    def all_keys(self) -> Iterable[str]:
        return [meta(n).get("name") or "" for n in self.nodes.items() if not node_pod_cidrs(n)]

    async def sync(self, name: str) -> None:
        node = await self.registry.get("nodes", None, name)  # live: never allocate twice
        if node is None:
            self.waiting.discard(name)
            return
        have = node_pod_cidrs(node)
        if have:
            self.waiting.discard(name)
            self.alloc.occupy_node(name, have)
            return
        cidrs = self.alloc.allocate_node(name)
        if cidrs is None:
            if name not in self.waiting:
                self.waiting.add(name)
                await record(self.registry, node, "Node", "Normal", "CIDRNotAvailable",
                             f"Node {name} status is now: CIDRNotAvailable", "cidrAllocator")
            self.log.warning("controller=%s node=%s no pod CIDR left", self.name, name)
            self.queue.add_after(name, 30.0)
            return
        new = dict(node)
        new["spec"] = {**(node.get("spec") or {}), "podCIDR": cidrs[0], "podCIDRs": cidrs}
        try:
            await self.registry.update("nodes", new)
        except Exception as e:
            self.alloc.release_node(name, cidrs)
            if is_not_found(e):
                return
            raise
        self.waiting.discard(name)
        self.log.info("controller=%s node=%s podCIDRs=%s", self.name, name, ",".join(cidrs))
