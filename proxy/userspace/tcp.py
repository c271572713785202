"""TCP: the listener on a proxy port, the dialer with upstream's retry ladder, then a relay."""

from __future__ import annotations

import errno
import logging
import socket
from collections.abc import Callable

from proxy.userspace.loadbalancer import RoundRobin
from proxy.userspace.reactor import IN, OUT, Reactor, Timer
from proxy.userspace.relay import CopyRelay, PipePool, Relay, SpliceRelay

log = logging.getLogger("kpx.proxy.userspace")

# upstream's EndpointDialTimeouts: each try goes to the next endpoint, with a longer timeout
DIAL_TIMEOUTS = (0.25, 0.5, 1.0, 2.0)
ACCEPT_BATCH = 128
BACKLOG = 4096


def listen_socket(kind: int, ip: str, port: int) -> socket.socket:
    s = socket.socket(socket.AF_INET, kind)
    try:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        # a restarted proxy binds next to the old one until it has gone (no refusal window)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        s.bind((ip, port))
        if kind == socket.SOCK_STREAM:
            s.listen(BACKLOG)
        s.setblocking(False)
    except OSError:
        s.close()
        raise
    return s


class DataPath:
    """What the listeners share: the reactor, the relay kind, the live connections."""

    def __init__(self, reactor: Reactor, relay: str = "splice", pipe_size: int = 1 << 20) -> None:
        if relay not in ("splice", "copy"):
            raise ValueError(f"relay must be splice or copy, not {relay!r}")
        self.reactor = reactor
        self.relay = relay
        self.pipes = PipePool(pipe_size)
        self.relays: set[Relay] = set()
        self.dials: set[_Dial] = set()
        self.dialing = 0
        self.accepted = 0
        self.dial_failures = 0
        self.bytes_closed = 0  # bytes relayed by connections that have ended

    def _ended(self, r: Relay) -> None:
        self.relays.discard(r)
        self.bytes_closed += r.bytes

    @property
    def bytes_total(self) -> int:
        return self.bytes_closed + sum(r.bytes for r in self.relays)

    def start_relay(self, client: socket.socket, backend: socket.socket) -> None:
        r: Relay
        if self.relay == "splice":
            r = SpliceRelay(self.reactor, client, backend, self.pipes, on_close=self._ended)
        else:
            r = CopyRelay(self.reactor, client, backend, on_close=self._ended)
        self.relays.add(r)

    def close(self) -> None:
        for d in list(self.dials):
            d.abort()
        for r in list(self.relays):
            r.close()
        self.pipes.close()


class TcpListener:
    def __init__(self, dp: DataPath, port: int, lb: RoundRobin, bind_ip: str = "0.0.0.0",
                 dial_timeouts: tuple[float, ...] = DIAL_TIMEOUTS) -> None:
        self.dp = dp
        self.lb = lb
        self.dial_timeouts = dial_timeouts
        self.sock = listen_socket(socket.SOCK_STREAM, bind_ip, port)
        self.port = self.sock.getsockname()[1]  # port 0: the kernel's choice (tests, bench)
        self.fd = self.sock.fileno()
        dp.reactor.register(self.fd, IN, self._on_accept)

    def _on_accept(self, ev: int) -> None:
        accept = self.sock.accept
        for _ in range(ACCEPT_BATCH):
            try:
                conn, addr = accept()
            except BlockingIOError:
                return
            except OSError as e:
                if e.errno in (errno.EMFILE, errno.ENFILE):
                    log.warning("userspace proxy: out of file descriptors (%s); shedding new connections", e)
                return
            conn.setblocking(False)
            self.dp.accepted += 1
            d = _Dial(self, conn, addr[0])
            self.dp.dials.add(d)
            d.next()

    def close(self) -> None:
        self.dp.reactor.unregister(self.fd)
        self.sock.close()


class _Dial:
    """Upstream's TryConnectEndpoints: up to len(DIAL_TIMEOUTS) tries, each to the next endpoint."""

    __slots__ = ("ln", "client", "client_ip", "attempt", "sock", "timer")

    def __init__(self, ln: TcpListener, client: socket.socket, client_ip: str) -> None:
        self.ln = ln
        self.client = client
        self.client_ip = client_ip
        self.attempt = 0
        self.sock: socket.socket | None = None
        self.timer: Timer | None = None

    def next(self) -> None:
        dp = self.ln.dp
        while self.attempt < len(self.ln.dial_timeouts):
            ep = self.ln.lb.next(self.client_ip, reset=self.attempt > 0)
            if ep is None:
                break
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.setblocking(False)
            err = s.connect_ex(ep)
            if err in (0, errno.EINPROGRESS):
                self.sock = s
                dp.dialing += 1
                dp.reactor.register(s.fileno(), OUT, self._on_connect)
                self.timer = dp.reactor.call_later(self.ln.dial_timeouts[self.attempt], self._on_timeout)
                return
            s.close()
            dp.dial_failures += 1
            self.attempt += 1
        self.client.close()  # no endpoint answered: the client sees the connection end
        dp.dials.discard(self)

    def abort(self) -> None:
        if self.sock is not None:
            self._done().close()
        self.client.close()
        self.ln.dp.dials.discard(self)

    def _done(self) -> socket.socket:
        s = self.sock
        assert s is not None
        self.ln.dp.reactor.unregister(s.fileno())
        self.ln.dp.dialing -= 1
        if self.timer is not None:
            self.timer.cancel()
        self.sock = None
        return s

    def _fail(self, s: socket.socket) -> None:
        s.close()
        self.ln.dp.dial_failures += 1
        self.attempt += 1
        self.next()

    def _on_connect(self, ev: int) -> None:
        s = self._done()
        err = s.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
        if err:
            self._fail(s)
            return
        self.ln.dp.dials.discard(self)
        self.ln.dp.start_relay(self.client, s)

    def _on_timeout(self) -> None:
        if self.sock is not None:
            self._fail(self._done())


OnClose = Callable[[], None]
