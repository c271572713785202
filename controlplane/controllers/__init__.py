"""The controllers that run inside kpx's apiserver process: EndpointSlice, namespace, garbage
collector, scheduler, pod lifecycle (force-delete on lost nodes), node IPAM and node lifecycle
(Ready=Unknown when a node agent stops posting status).

The apiserver starts them after bootstrap::

    from controlplane import controllers
    cs = await controllers.start(registry, controllers.ControllerConfig(cluster_cidrs=("10.244.0.0/16",)))
    ...
    await cs.stop()

`config` may also be a mapping or any object with attributes of the same names (missing ones
take the defaults below).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Mapping
from dataclasses import dataclass, fields
from typing import Any

from controlplane.controllers.api import AsManager, Registry
from controlplane.controllers.base import Controller
from controlplane.controllers.endpointslice import MAX_ENDPOINTS_PER_SLICE
from controlplane.controllers.endpointslice_controller import EndpointSliceController
from controlplane.controllers.gc import GarbageCollector
from controlplane.controllers.informer import InformerFactory
from controlplane.controllers.namespace import NamespaceController
from controlplane.controllers.nodeipam import NodeIpamController
from controlplane.controllers.nodelifecycle import DEFAULT_GRACE, NodeLifecycleController
from controlplane.controllers.podgc import PodLifecycleController
from controlplane.controllers.scheduler import Scheduler
from kpx.errors import UserError

log = logging.getLogger("kpx.controllers")

ALL_CONTROLLERS = (
    "endpointslice", "namespace", "garbagecollector", "scheduler", "podgc", "nodeipam", "nodelifecycle",
)


@dataclass(frozen=True)
class ControllerConfig:
    cluster_cidrs: tuple[str, ...] = ("10.244.0.0/16",)  # pod network; one block per node from each
    node_cidr_mask_size_ipv4: int = 24
    node_cidr_mask_size_ipv6: int = 64
    max_endpoints_per_slice: int = MAX_ENDPOINTS_PER_SLICE
    controllers: tuple[str, ...] = ALL_CONTROLLERS  # which to run (kube-controller-manager --controllers)
    allocate_node_cidrs: bool = True  # --allocate-node-cidrs
    node_monitor_grace_period: float = DEFAULT_GRACE  # seconds without node status -> Ready Unknown

    @classmethod
    def from_any(cls, config: Any) -> ControllerConfig:
        if config is None:
            return cls()
        if isinstance(config, cls):
            return config
        get = config.get if isinstance(config, Mapping) else lambda k, d=None: getattr(config, k, d)
        kw: dict[str, Any] = {}
        for f in fields(cls):
            v = get(f.name, None)
            if v is None and f.name == "cluster_cidrs":
                v = get("cluster_cidr", None) or get("pod_cidr", None)
            if v is None:
                continue
            if f.name in ("cluster_cidrs", "controllers") and isinstance(v, str):
                v = tuple(x.strip() for x in v.split(",") if x.strip())
            elif f.name in ("cluster_cidrs", "controllers"):
                v = tuple(v)
            kw[f.name] = v
        return cls(**kw)


class ControllerSet:
    """The running controllers and their shared informers."""

    def __init__(self, registry: Registry, config: ControllerConfig) -> None:
        self.config = config
        self.informers = InformerFactory(registry)
        kcm: Registry = AsManager(registry, "kube-controller-manager")
        sched: Registry = AsManager(registry, "kube-scheduler")
        self.controllers: dict[str, Controller[Any]] = {}
        want = set(config.controllers)
        unknown = want - set(ALL_CONTROLLERS)
        if unknown:
            raise UserError(f"--controllers: unknown {', '.join(sorted(unknown))}; known: {', '.join(ALL_CONTROLLERS)}")
        if "endpointslice" in want:
            self.controllers["endpointslice"] = EndpointSliceController(
                kcm, self.informers, config.max_endpoints_per_slice)
        if "namespace" in want:
            self.controllers["namespace"] = NamespaceController(kcm, self.informers)
        if "garbagecollector" in want:
            self.controllers["garbagecollector"] = GarbageCollector(kcm, self.informers)
        if "scheduler" in want:
            self.controllers["scheduler"] = Scheduler(sched, self.informers)
        if "podgc" in want:
            self.controllers["podgc"] = PodLifecycleController(kcm, self.informers)
        if "nodeipam" in want and config.allocate_node_cidrs:
            try:
                self.controllers["nodeipam"] = NodeIpamController(
                    kcm, self.informers, config.cluster_cidrs,
                    config.node_cidr_mask_size_ipv4, config.node_cidr_mask_size_ipv6)
            except ValueError as e:
                raise UserError(f"--cluster-cidr: {e}") from None
        if "nodelifecycle" in want:
            self.controllers["nodelifecycle"] = NodeLifecycleController(
                kcm, self.informers, config.node_monitor_grace_period)
        self._tasks: list[asyncio.Task[None]] = []

    def __getitem__(self, name: str) -> Controller[Any]:
        return self.controllers[name]

    def start(self) -> None:
        self.informers.start()
        for name, c in self.controllers.items():
            self._tasks.append(asyncio.create_task(c.run(), name=f"controller-{name}"))
        self._tasks.append(asyncio.create_task(self._watchdog(), name="controllers-watchdog"))

    async def _watchdog(self) -> None:
        """Log (never swallow silently) a controller that died of a bug."""
        pending = [t for t in self._tasks if t.get_name().startswith("controller-")]
        while pending:
            done, pending_set = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
            pending = list(pending_set)
            for t in done:
                if not t.cancelled() and t.exception() is not None:
                    log.error("%s stopped: %r", t.get_name(), t.exception())

    async def wait_synced(self) -> None:
        await self.informers.wait_synced()

    def idle(self) -> bool:
        """Every queue empty and no sync in flight (delayed retries not counted)."""
        return all(c.queue.idle for c in self.controllers.values())

    async def stop(self) -> None:
        for c in self.controllers.values():
            c.stop()
        for t in self._tasks:
            t.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._tasks.clear()
        await self.informers.stop()


async def start(registry: Registry, config: Any = None) -> ControllerSet:
    """Build and start the controllers (returns at once; they sync in the background)."""
    cs = ControllerSet(registry, ControllerConfig.from_any(config))
    cs.start()
    return cs


__all__ = ["ALL_CONTROLLERS", "ControllerConfig", "ControllerSet", "start"]
