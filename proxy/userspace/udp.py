"""UDP: one socket on the proxy port; per client address a flow (a connected socket to the
endpoint the balancer chose) that ends after `idle_timeout` without traffic either way
(upstream's --udp-timeout, 250 ms by default). Replies go back from the proxy-port socket, so
conntrack turns them back into the Service address the client sent to."""

from __future__ import annotations

import errno
import socket

from proxy.userspace.loadbalancer import RoundRobin
from proxy.userspace.reactor import IN, Reactor, Timer
from proxy.userspace.tcp import listen_socket

DEFAULT_UDP_IDLE_TIMEOUT = 0.25
MAX_DATAGRAM = 65535
BATCH = 64


class _Flow:
    __slots__ = ("ln", "client", "sock", "fd", "last")

    def __init__(self, ln: UdpListener, client: tuple[str, int], ep: tuple[str, int]) -> None:
        self.ln = ln
        self.client = client
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.setblocking(False)
        self.sock.connect(ep)
        self.fd = self.sock.fileno()
        self.last = ln.reactor.now
        ln.reactor.register(self.fd, IN, self._on_reply)

    def _on_reply(self, ev: int) -> None:
        ln = self.ln
        for _ in range(BATCH):
            try:
                data = self.sock.recv(MAX_DATAGRAM)
            except BlockingIOError:
                break
            except OSError:  # ECONNREFUSED: the endpoint's port is closed; the flow ends
                self.close()
                return
            self.last = ln.reactor.now
            try:
                ln.sock.sendto(data, self.client)
            except OSError:
                pass

    def close(self) -> None:
        self.ln.reactor.unregister(self.fd)
        self.sock.close()
        self.ln.flows.pop(self.client, None)


class UdpListener:
    def __init__(self, reactor: Reactor, port: int, lb: RoundRobin, bind_ip: str = "0.0.0.0",
                 idle_timeout: float = DEFAULT_UDP_IDLE_TIMEOUT) -> None:
        self.reactor = reactor
        self.lb = lb
        self.port = port
        self.idle_timeout = idle_timeout
        self.flows: dict[tuple[str, int], _Flow] = {}
        self.sock = listen_socket(socket.SOCK_DGRAM, bind_ip, port)
        self.fd = self.sock.fileno()
        self.timer: Timer | None = None
        reactor.register(self.fd, IN, self._on_read)

    def _on_read(self, ev: int) -> None:
        recvfrom = self.sock.recvfrom
        flows = self.flows
        for _ in range(BATCH):
            try:
                data, client = recvfrom(MAX_DATAGRAM)
            except BlockingIOError:
                return
            except OSError:
                continue
            flow = flows.get(client)
            if flow is None:
                ep = self.lb.next(client[0])
                if ep is None:
                    continue
                try:
                    flow = flows[client] = _Flow(self, client, ep)
                except OSError:
                    continue
                if self.timer is None:
                    self.timer = self.reactor.call_later(self.idle_timeout, self._sweep)
            flow.last = self.reactor.now
            try:
                flow.sock.send(data)
            except OSError as e:
                if e.errno != errno.EAGAIN:
                    flow.close()

    def _sweep(self) -> None:
        self.timer = None
        limit = self.reactor.now - self.idle_timeout
        for f in [f for f in self.flows.values() if f.last <= limit]:
            f.close()
        if self.flows:
            oldest = min(f.last for f in self.flows.values())
            self.timer = self.reactor.call_later(max(0.01, oldest + self.idle_timeout - self.reactor.now), self._sweep)

    def close(self) -> None:
        """The port stops; flows in progress end with it (their replies need this socket)."""
        if self.timer is not None:
            self.timer.cancel()
        for f in list(self.flows.values()):
            f.close()
        self.reactor.unregister(self.fd)
        self.sock.close()
