"""Upstream's LoadBalancerRR for one Service port: round robin, optional ClientIP affinity."""

from __future__ import annotations

import time
from collections.abc import Callable

Addr = tuple[str, int]


class RoundRobin:
    __slots__ = ("endpoints", "_set", "index", "affinity_timeout", "affinity", "clock")

    def __init__(self, endpoints: tuple[Addr, ...], affinity_timeout: int = 0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.endpoints: tuple[Addr, ...] = ()
        self._set: frozenset[Addr] = frozenset()
        self.index = 0
        self.affinity_timeout = 0
        self.affinity: dict[str, list[object]] = {}  # client IP -> [endpoint, last used]
        self.clock = clock
        self.update(endpoints, affinity_timeout)

    def update(self, endpoints: tuple[Addr, ...], affinity_timeout: int) -> None:
        """New endpoint set: new connections use it at once; affinity to a removed endpoint ends."""
        if endpoints != self.endpoints:
            self.endpoints = endpoints
            self._set = frozenset(endpoints)
            self.index = self.index % len(endpoints) if endpoints else 0
            self.affinity = {k: v for k, v in self.affinity.items() if v[0] in self._set}
        if affinity_timeout != self.affinity_timeout:
            self.affinity_timeout = affinity_timeout
            if not affinity_timeout:
                self.affinity.clear()

    def next(self, client_ip: str, reset: bool = False) -> Addr | None:
        """The endpoint for a new connection from client_ip; `reset` (a retry after a failed
        dial) drops the client's affinity, as upstream's sessionAffinityReset."""
        eps = self.endpoints
        if not eps:
            return None
        timeout = self.affinity_timeout
        if timeout:
            now = self.clock()
            a = self.affinity.get(client_ip)
            if a is not None and not reset and now - a[1] < timeout:  # type: ignore[operator]
                a[1] = now
                return a[0]  # type: ignore[return-value]
        ep = eps[self.index % len(eps)]
        self.index = (self.index + 1) % len(eps)
        if timeout:
            self.affinity[client_ip] = [ep, now]
        return ep

    def sweep(self) -> None:
        """Forget expired affinity entries (upstream cleans stale sticky sessions each sync)."""
        if self.affinity:
            limit = self.clock() - self.affinity_timeout
            self.affinity = {k: v for k, v in self.affinity.items() if v[1] > limit}  # type: ignore[operator]
