"""Moving bytes between a client socket and a backend socket, on the reactor thread.

`SpliceRelay` (default) is zero-copy: socket -> pipe -> socket with `os.splice`, so bytes never
enter Python. `CopyRelay` is the plain recv_into/send loop, kept selectable for comparison
(bench/userspace_bench.py). Both share the flow control:

- a direction reads only when nothing of it is still waiting to be written; when the
  destination is full, the source's EPOLLIN is dropped until EPOLLOUT says it drained. So a slow
  peer stalls its sender through TCP's own window and memory stays bounded by one pipe (or one
  buffer) per direction;
- EOF on one side is passed on as shutdown(SHUT_WR) to the other (half-close), and the relay
  ends when both directions have ended, or at the first error (reset, broken pipe).

Pipes come from a `PipePool` and are held only while bytes are in them, so an idle connection
costs its two sockets and no pipe fds (6 fds per connection would cap a 20000-fd proxy at ~3300
connections; this way it is ~10000).
"""

from __future__ import annotations

import fcntl
import os
import socket

from proxy.userspace.reactor import ERR, HUP, IN, OUT, Reactor

SPLICE_FLAGS = os.SPLICE_F_MOVE | os.SPLICE_F_NONBLOCK
F_SETPIPE_SZ = 1031
DEFAULT_PIPE_SIZE = 1 << 20
BUDGET = 16  # reads per event per direction before yielding to other connections


class PipePool:
    def __init__(self, size: int = DEFAULT_PIPE_SIZE, keep: int = 64) -> None:
        self.size = size
        self.keep = keep
        self.free: list[tuple[int, int]] = []
        self.open = 0

    def get(self) -> tuple[int, int]:
        if self.free:
            return self.free.pop()
        r, w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        try:
            fcntl.fcntl(w, F_SETPIPE_SZ, self.size)
        except OSError:  # above /proc/sys/fs/pipe-max-size: keep the default 64 KiB
            pass
        self.open += 1
        return (r, w)

    def put(self, p: tuple[int, int]) -> None:
        """Return an EMPTY pipe."""
        if len(self.free) < self.keep:
            self.free.append(p)
        else:
            self.discard(p)

    def discard(self, p: tuple[int, int]) -> None:
        os.close(p[0])
        os.close(p[1])
        self.open -= 1

    def close(self) -> None:
        while self.free:
            self.discard(self.free.pop())


class _Half:
    """One direction, src -> dst."""

    __slots__ = ("src", "dst", "fsrc", "fdst", "pending", "eof", "shut", "blocked", "full", "pipe", "buf", "view",
                 "off")

    def __init__(self, src: socket.socket, dst: socket.socket) -> None:
        self.src, self.dst = src, dst
        self.fsrc, self.fdst = src.fileno(), dst.fileno()
        self.pending = 0
        self.eof = False  # src said EOF (or can say nothing more)
        self.shut = False  # EOF passed on: dst shut down for writing
        self.blocked = False  # dst is full: wait for its EPOLLOUT before writing again
        self.full = False  # the pipe took no more: wait for a drain before reading again
        self.pipe: tuple[int, int] | None = None
        self.buf: bytearray | None = None
        self.view: memoryview | None = None
        self.off = 0


class Relay:
    """Base: flow control and lifecycle; subclasses move the bytes (_fill/_drain)."""

    __slots__ = ("reactor", "a", "b", "ab", "ba", "masks", "closed", "on_close", "bytes", "dead")

    def __init__(self, reactor: Reactor, a: socket.socket, b: socket.socket, on_close: object = None) -> None:
        self.reactor = reactor
        self.a, self.b = a, b
        self.ab = _Half(a, b)
        self.ba = _Half(b, a)
        self.closed = False
        self.on_close = on_close
        self.bytes = 0
        self.dead: set[int] = set()  # fds taken out of epoll (hung up, nothing left to do on them)
        fa, fb = a.fileno(), b.fileno()
        self.masks = {fa: IN, fb: IN}
        reactor.register(fa, IN, self._on_a)
        reactor.register(fb, IN, self._on_b)

    # bytes ------------------------------------------------------------------------------
    def _fill(self, h: _Half) -> int:  # read into the half's pipe/buffer; 0 = EOF; raises BlockingIOError
        raise NotImplementedError

    def _drain(self, h: _Half) -> bool:  # write pending bytes; True when all written
        raise NotImplementedError

    def _release(self, h: _Half) -> None:
        pass

    def _room(self, h: _Half) -> bool:  # may the half read more now?
        return not h.pending

    # events -----------------------------------------------------------------------------
    def _on_a(self, ev: int) -> None:
        self._event(ev, self.ab, self.ba)

    def _on_b(self, ev: int) -> None:
        self._event(ev, self.ba, self.ab)

    def _event(self, ev: int, out: _Half, inc: _Half) -> None:
        """`out` reads from this socket, `inc` writes to it."""
        try:
            if ev & OUT and inc.pending:
                inc.blocked = False
                if self._drain(inc):
                    self._release(inc)
                    self._finish(inc)
                else:
                    inc.blocked = True
                if not inc.eof:
                    self._pump(inc)
            if ev & (IN | HUP | ERR) and not out.eof:
                self._pump(out)
        except OSError:
            self.close()
            return
        if self.closed:
            return
        if ev & ERR:
            self.close()
            return
        if ev & HUP and not ev & IN:  # this socket is done both ways
            if inc.pending:
                self.close()  # what waits for it cannot be delivered
                return
            out.eof = True
            self._finish(out)
            self.dead.add(out.fsrc)
            self.reactor.unregister(out.fsrc)  # HUP is level-triggered: stop hearing it
        ab, ba = self.ab, self.ba
        if ab.eof and ba.eof and not ab.pending and not ba.pending:
            self.close()
            return
        self._update()

    def _finish(self, h: _Half) -> None:
        """Pass EOF on once everything before it was written."""
        if h.eof and not h.pending and not h.shut:
            h.shut = True
            try:
                h.dst.shutdown(socket.SHUT_WR)
            except OSError:
                pass

    def _pump(self, h: _Half) -> None:
        for _ in range(BUDGET):
            if not self._room(h):
                return
            try:
                n = self._fill(h)
            except BlockingIOError:
                if h.pending:  # the pipe is full, or the socket is empty while dst is blocked
                    h.full = True
                return
            if n == 0:
                h.eof = True
                self._release(h)
                self._finish(h)
                return
            h.pending += n
            self.bytes += n
            if not h.blocked:
                if self._drain(h):
                    self._release(h)
                else:
                    h.blocked = True

    def _update(self) -> None:
        ab, ba = self.ab, self.ba
        room = self._room
        ma = (IN if not ab.eof and room(ab) else 0) | (OUT if ba.pending else 0)
        mb = (IN if not ba.eof and room(ba) else 0) | (OUT if ab.pending else 0)
        masks, dead = self.masks, self.dead
        if masks[ab.fsrc] != ma and ab.fsrc not in dead:
            masks[ab.fsrc] = ma
            self.reactor.modify(ab.fsrc, ma)
        if masks[ba.fsrc] != mb and ba.fsrc not in dead:
            masks[ba.fsrc] = mb
            self.reactor.modify(ba.fsrc, mb)

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        for h in (self.ab, self.ba):
            self.reactor.unregister(h.fsrc)
            self._discard(h)
        self.a.close()
        self.b.close()
        if callable(self.on_close):
            self.on_close(self)

    def _discard(self, h: _Half) -> None:
        pass


class SpliceRelay(Relay):
    __slots__ = ("pool",)

    def __init__(self, reactor: Reactor, a: socket.socket, b: socket.socket, pool: PipePool,
                 on_close: object = None) -> None:
        self.pool = pool
        super().__init__(reactor, a, b, on_close)

    def _fill(self, h: _Half) -> int:
        p = h.pipe
        if p is None:
            p = h.pipe = self.pool.get()
        return os.splice(h.fsrc, p[1], self.pool.size, flags=SPLICE_FLAGS)

    def _drain(self, h: _Half) -> bool:
        p = h.pipe
        assert p is not None
        while h.pending:
            try:
                h.pending -= os.splice(p[0], h.fdst, h.pending, flags=SPLICE_FLAGS)
            except BlockingIOError:
                return False
            h.full = False
        return True

    def _room(self, h: _Half) -> bool:
        """Keep reading into the pipe while the destination is slow, up to the pipe's size."""
        return not h.full and h.pending < self.pool.size

    def _release(self, h: _Half) -> None:
        if h.pipe is not None and not h.pending:
            self.pool.put(h.pipe)
            h.pipe = None

    def _discard(self, h: _Half) -> None:
        if h.pipe is not None:
            if h.pending:
                self.pool.discard(h.pipe)
            else:
                self.pool.put(h.pipe)
            h.pipe = None


class CopyRelay(Relay):
    """recv_into/send through a per-direction buffer (bytes cross into Python and back)."""

    __slots__ = ("size",)

    def __init__(self, reactor: Reactor, a: socket.socket, b: socket.socket, size: int = 256 * 1024,
                 on_close: object = None) -> None:
        self.size = size
        super().__init__(reactor, a, b, on_close)

    def _fill(self, h: _Half) -> int:
        if h.buf is None:
            h.buf = bytearray(self.size)
            h.view = memoryview(h.buf)
        h.off = 0
        return h.src.recv_into(h.buf)

    def _drain(self, h: _Half) -> bool:
        view = h.view
        assert view is not None
        while h.pending:
            try:
                n = h.dst.send(view[h.off:h.off + h.pending])
            except BlockingIOError:
                return False
            h.off += n
            h.pending -= n
        return True
