"""The data path of one proxy: a listener per open Service port on one reactor thread.

`sync(listeners)` (called from the proxy core's sync worker) opens listeners that are new,
updates the balancers of existing ones (new connections use the new endpoints at once;
established relays are untouched), and `close_stale` closes the ones no longer wanted, which
ends only the listening socket (and UDP flows), never established TCP connections.
"""

from __future__ import annotations

import logging
import resource
from collections.abc import Mapping

from proxy.model import TCP, ServicePortName
from proxy.userspace.loadbalancer import RoundRobin
from proxy.userspace.portals import Listener
from proxy.userspace.reactor import Reactor
from proxy.userspace.tcp import DIAL_TIMEOUTS, DataPath, TcpListener
from proxy.userspace.udp import DEFAULT_UDP_IDLE_TIMEOUT, UdpListener

log = logging.getLogger("kpx.proxy.userspace")


def raise_fd_limit() -> int:
    """Soft RLIMIT_NOFILE up to the hard limit (never beyond: that needs CAP_SYS_RESOURCE and
    the machine's policy). Upstream asked for 64000."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        return hard
    return soft


class _Open:
    __slots__ = ("spec", "lb", "sock")

    def __init__(self, spec: Listener, lb: RoundRobin, sock: TcpListener | UdpListener) -> None:
        self.spec, self.lb, self.sock = spec, lb, sock


class Proxier:
    def __init__(self, netns: str | None = None, *, relay: str = "splice", bind_ip: str = "0.0.0.0",
                 udp_idle_timeout: float = DEFAULT_UDP_IDLE_TIMEOUT, pipe_size: int = 1 << 20,
                 dial_timeouts: tuple[float, ...] = DIAL_TIMEOUTS) -> None:
        self.fd_limit = raise_fd_limit()
        self.bind_ip = bind_ip
        self.udp_idle_timeout = udp_idle_timeout
        self.dial_timeouts = dial_timeouts
        self.reactor = Reactor(netns)
        self.reactor.start()
        self.dp = DataPath(self.reactor, relay, pipe_size)
        self.open: dict[ServicePortName, _Open] = {}
        self.closed = False

    def sync(self, listeners: Mapping[ServicePortName, Listener]) -> list[str]:
        """Open/update the listeners that should be open; returns errors (bind failures)."""
        return self.reactor.run_sync(lambda: self._sync(listeners))

    def _sync(self, listeners: Mapping[ServicePortName, Listener]) -> list[str]:
        errors: list[str] = []
        for name, spec in listeners.items():
            cur = self.open.get(name)
            if cur is not None and (not spec.open or cur.spec.proxy_port != spec.proxy_port
                                    or cur.spec.protocol != spec.protocol):
                cur.sock.close()
                del self.open[name]
                cur = None
            if not spec.open:
                continue
            if cur is not None:
                cur.lb.update(spec.endpoints, spec.affinity_timeout)
                cur.lb.sweep()
                cur.spec = spec
                continue
            lb = RoundRobin(spec.endpoints, spec.affinity_timeout)
            try:
                sock: TcpListener | UdpListener
                if spec.protocol == TCP:
                    sock = TcpListener(self.dp, spec.proxy_port, lb, self.bind_ip, self.dial_timeouts)
                else:
                    sock = UdpListener(self.reactor, spec.proxy_port, lb, self.bind_ip, self.udp_idle_timeout)
            except OSError as e:
                errors.append(f"{name} {spec.protocol.lower()} proxy port {spec.proxy_port}: {e.strerror or e}")
                continue
            self.open[name] = _Open(spec, lb, sock)
        return errors

    def close_stale(self, listeners: Mapping[ServicePortName, Listener]) -> None:
        def run() -> None:
            for name in [n for n in self.open if n not in listeners]:
                self.open.pop(name).sock.close()

        self.reactor.run_sync(run)

    def stats(self) -> dict[str, int]:
        dp = self.dp
        return {"listeners_open": len(self.open), "connections": len(dp.relays), "dialing": dp.dialing,
                "accepted_total": dp.accepted, "dial_failures_total": dp.dial_failures,
                "pipes_open": dp.pipes.open}

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True

        def run() -> None:
            for o in self.open.values():
                o.sock.close()
            self.open.clear()
            self.dp.close()

        try:
            self.reactor.run_sync(run)
        finally:
            self.reactor.stop()
