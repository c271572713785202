"""The userspace data path on loopback (no lab): both relays (splice, recv/send) carry large
transfers intact both ways, and a reader that stops reading stalls its sender instead of
growing the proxy's memory (back-pressure through the pipe/buffer and TCP's window)."""

from __future__ import annotations

import hashlib
import socket
import threading
import time
from collections.abc import Iterator

import pytest

from proxy.userspace.loadbalancer import RoundRobin
from proxy.userspace.reactor import Reactor
from proxy.userspace.tcp import DataPath, TcpListener

pytestmark = pytest.mark.netns
MIB = 1 << 20
DOWN = 96  # MiB the backend sends
BLOCK = hashlib.sha512(b"relay").digest() * (MIB // 64)


def stream(n_mib: int) -> Iterator[bytes]:
    for i in range(n_mib):
        yield bytes([i % 251]) + BLOCK[1:]


class Backend:
    """127.0.0.1:<free port>: reads `up` MiB (hashing them), then sends `down` MiB."""

    def __init__(self, down: int) -> None:
        self.ls = socket.create_server(("127.0.0.1", 0))
        self.addr = self.ls.getsockname()
        self.down = down
        self.got = hashlib.sha256()
        self.sent = 0
        self.t = threading.Thread(target=self.serve, daemon=True)
        self.t.start()

    def serve(self) -> None:
        c, _ = self.ls.accept()
        with c:
            while d := c.recv(MIB):
                self.got.update(d)
                if d.endswith(b"\nEND\n"):
                    break
            for chunk in stream(self.down):
                c.sendall(chunk)
                self.sent += len(chunk)
        self.ls.close()


@pytest.fixture(params=["splice", "copy"])
def proxy(request: pytest.FixtureRequest) -> Iterator[tuple[DataPath, int, Backend]]:
    r = Reactor()
    r.start()
    dp = DataPath(r, request.param)
    backend = Backend(down=DOWN)
    ln = r.run_sync(lambda: TcpListener(dp, 0, RoundRobin((backend.addr,)), "127.0.0.1"))
    try:
        yield dp, ln.port, backend
    finally:
        def shut() -> None:
            ln.close()
            dp.close()

        r.run_sync(shut)
        r.stop()


def test_large_transfer_both_ways_intact(proxy: tuple[DataPath, int, Backend]) -> None:
    dp, port, backend = proxy
    c = socket.create_connection(("127.0.0.1", port), timeout=30)
    sent = hashlib.sha256()
    for chunk in stream(48):
        c.sendall(chunk)
        sent.update(chunk)
    c.sendall(b"\nEND\n")
    sent.update(b"\nEND\n")
    got = hashlib.sha256()
    n = 0
    while d := c.recv(MIB):
        got.update(d)
        n += len(d)
    c.close()
    exp = hashlib.sha256()
    for chunk in stream(DOWN):
        exp.update(chunk)
    assert n == DOWN * MIB and got.hexdigest() == exp.hexdigest()
    backend.t.join(10)
    assert backend.got.hexdigest() == sent.hexdigest()
    deadline = time.monotonic() + 5
    while dp.relays and time.monotonic() < deadline:  # the relay ends once both sides closed
        time.sleep(0.01)
    assert not dp.relays


def test_slow_reader_stalls_the_sender(proxy: tuple[DataPath, int, Backend]) -> None:
    dp, port, backend = proxy
    c = socket.create_connection(("127.0.0.1", port), timeout=30)
    c.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 * 1024)
    c.sendall(b"\nEND\n")
    # the client reads nothing: the backend's sends must stall well short of DOWN MiB
    last, stable_since = -1, time.monotonic()
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        if backend.sent != last:
            last, stable_since = backend.sent, time.monotonic()
        elif time.monotonic() - stable_since > 0.5:
            break
        time.sleep(0.05)
    assert backend.sent < 40 * MIB, backend.sent  # socket buffers + one pipe/buffer, not all of it
    assert dp.pipes.open <= 2
    n = 0
    while d := c.recv(MIB):  # reading again drains everything, intact
        n += len(d)
    assert n == DOWN * MIB
