"""The data path's one event loop: a thread around `select.epoll`, with timers and calls from
other threads (the proxy core's sync worker hands listener changes over with `run_sync`).

Why a thread of its own and not the proxy core's asyncio (uv)loop: render/apply, informers and
/healthz never delay a byte; the thread can join the node's netns (setns is per thread) when a
test or bench drives the mode from outside that netns; and `epoll.poll` releases the GIL while
it waits. Per readiness event the two dispatchers cost about the same (bench/userspace_bench.py
`loop`: ~6.3-6.9 us raw epoll vs ~5.7-6.2 us uvloop add_reader for a 1-byte ping-pong, CPU time,
load ~9), so uvloop would buy at most ~10% of the dispatch cost, which is small next to the
splice syscalls of a bulk transfer.
"""

from __future__ import annotations

import concurrent.futures
import heapq
import itertools
import logging
import os
import select
import threading
import time
from collections import deque
from collections.abc import Callable
from typing import Any, TypeVar

log = logging.getLogger("kpx.proxy.userspace")
T = TypeVar("T")

IN, OUT, ERR, HUP, RDHUP = select.EPOLLIN, select.EPOLLOUT, select.EPOLLERR, select.EPOLLHUP, select.EPOLLRDHUP


class Timer:
    __slots__ = ("when", "fn", "cancelled")

    def __init__(self, when: float, fn: Callable[[], None]) -> None:
        self.when = when
        self.fn = fn
        self.cancelled = False

    def cancel(self) -> None:
        self.cancelled = True


class Reactor:
    def __init__(self, netns: str | None = None, name: str = "userspace-proxy") -> None:
        self.netns = netns
        self.ep = select.epoll()
        self.handlers: dict[int, Callable[[int], None]] = {}
        self._timers: list[tuple[float, int, Timer]] = []
        self._seq = itertools.count()
        self._calls: deque[Callable[[], None]] = deque()
        self._wake = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        self.ep.register(self._wake, IN)
        self._stop = False
        self._started = threading.Event()
        self._start_error: BaseException | None = None
        self.thread = threading.Thread(target=self._main, name=name, daemon=True)
        self.now = time.monotonic()

    # -- lifecycle -------------------------------------------------------------------------

    def start(self) -> None:
        self.thread.start()
        self._started.wait()
        if self._start_error is not None:
            raise self._start_error

    def stop(self) -> None:
        if not self.thread.is_alive():
            return
        self._stop = True
        os.eventfd_write(self._wake, 1)
        if threading.current_thread() is not self.thread:
            self.thread.join(timeout=10)

    def _main(self) -> None:
        if self.netns:
            try:
                from netns.ns import CLONE_NEWNET, _setns, netns_path

                fd = os.open(netns_path(self.netns), os.O_RDONLY | os.O_CLOEXEC)
                try:
                    _setns(fd, CLONE_NEWNET)
                finally:
                    os.close(fd)
            except BaseException as e:  # reported by start()
                self._start_error = e
                self._started.set()
                return
        self._started.set()
        try:
            self._loop()
        finally:
            self.ep.close()
            os.close(self._wake)

    def _loop(self) -> None:
        poll = self.ep.poll
        handlers = self.handlers
        timers = self._timers
        wake = self._wake
        while not self._stop:
            timeout = -1.0
            if timers:
                timeout = max(0.0, timers[0][0] - time.monotonic())
            events = poll(timeout, 1024)
            self.now = time.monotonic()
            for fd, ev in events:
                if fd == wake:
                    try:
                        os.eventfd_read(wake)
                    except BlockingIOError:
                        pass
                    continue
                h = handlers.get(fd)
                if h is not None:
                    try:
                        h(ev)
                    except Exception:
                        log.exception("userspace proxy: handler for fd %d failed", fd)
            while self._calls:
                fn = self._calls.popleft()
                try:
                    fn()
                except Exception:
                    log.exception("userspace proxy: call failed")
            if timers:
                now = self.now = time.monotonic()
                while timers and timers[0][0] <= now:
                    t = heapq.heappop(timers)[2]
                    if not t.cancelled:
                        try:
                            t.fn()
                        except Exception:
                            log.exception("userspace proxy: timer failed")

    # -- registration (reactor thread only) ------------------------------------------------

    def register(self, fd: int, mask: int, handler: Callable[[int], None]) -> None:
        self.handlers[fd] = handler
        self.ep.register(fd, mask)

    def modify(self, fd: int, mask: int) -> None:
        self.ep.modify(fd, mask)

    def unregister(self, fd: int) -> None:
        if self.handlers.pop(fd, None) is not None:
            try:
                self.ep.unregister(fd)
            except (OSError, ValueError):
                pass

    def call_later(self, delay: float, fn: Callable[[], None]) -> Timer:
        t = Timer(time.monotonic() + delay, fn)
        heapq.heappush(self._timers, (t.when, next(self._seq), t))
        return t

    # -- from other threads ----------------------------------------------------------------

    def call_soon_threadsafe(self, fn: Callable[[], None]) -> None:
        self._calls.append(fn)
        os.eventfd_write(self._wake, 1)

    def run_sync(self, fn: Callable[[], T], timeout: float = 30.0) -> T:
        """Run fn on the reactor thread and return its result (or raise its exception)."""
        if threading.current_thread() is self.thread or not self.thread.is_alive():
            return fn()
        fut: concurrent.futures.Future[Any] = concurrent.futures.Future()

        def call() -> None:
            try:
                fut.set_result(fn())
            except BaseException as e:
                fut.set_exception(e)

        self.call_soon_threadsafe(call)
        return fut.result(timeout)  # type: ignore[no-any-return]
