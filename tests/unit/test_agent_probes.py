"""Readiness probe primitives against real loopback sockets (no root): tcpSocket, httpGet, exec,
thresholds, and that a connect that never completes ends as a timeout instead of hanging."""

from __future__ import annotations

import asyncio
import socket
import sys

import pytest

from netns.probes import Prober, ProbeSpec, exec_probe, http_probe, tcp_probe

pytestmark = pytest.mark.unit


def run(coro):  # type: ignore[no-untyped-def]
    return asyncio.run(asyncio.wait_for(coro, 20))


def free_closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_tcp_probe_open_and_refused() -> None:
    with socket.socket() as srv:
        srv.bind(("127.0.0.1", 0))
        srv.listen()
        assert run(tcp_probe("127.0.0.1", srv.getsockname()[1], 1.0)) == (True, "")
    ok, msg = run(tcp_probe("127.0.0.1", free_closed_port(), 1.0))
    assert not ok and "connection refused" in msg


def test_tcp_probe_whose_syn_is_dropped_times_out() -> None:
    # A listener with a full accept queue drops new SYNs: the connect never completes.
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(0)
    port = srv.getsockname()[1]
    fillers = []
    try:
        for _ in range(4):
            c = socket.socket()
            c.setblocking(False)
            c.connect_ex(("127.0.0.1", port))
            fillers.append(c)

        async def probe_until_timeout() -> tuple[bool, str]:
            for _ in range(5):  # the first tries may still squeeze into the queue
                ok, msg = await tcp_probe("127.0.0.1", port, 0.3)
                if not ok:
                    return ok, msg
            return True, ""

        ok, msg = run(probe_until_timeout())
        assert not ok and "timeout" in msg
    finally:
        for c in fillers:
            c.close()
        srv.close()


def test_http_probe_status_codes() -> None:
    async def main() -> list[tuple[bool, str]]:
        async def handle(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
            line = (await r.readline()).decode()
            code = 200 if " /ok " in line else 302 if " /moved " in line else 503
            w.write(f"HTTP/1.1 {code} X\r\nContent-Length: 0\r\n\r\n".encode())
            await w.drain()
            w.close()

        srv = await asyncio.start_server(handle, "127.0.0.1", 0)
        port = srv.sockets[0].getsockname()[1]
        out = [await http_probe("127.0.0.1", port, p, 1.0) for p in ("/ok", "/moved", "/bad")]
        srv.close()
        out.append(await http_probe("127.0.0.1", free_closed_port(), "/", 1.0))
        return out

    (ok1, _), (ok2, _), (ok3, m3), (ok4, m4) = run(main())
    assert ok1 and ok2 and not ok3 and "statuscode: 503" in m3
    assert not ok4 and "connection refused" in m4


def test_exec_probe_exit_code_and_timeout() -> None:
    assert run(exec_probe([sys.executable, "-c", "pass"], 5)) == (True, "")
    ok, msg = run(exec_probe([sys.executable, "-c", "print('nope'); raise SystemExit(3)"], 5))
    assert not ok and "exited with 3" in msg and "nope" in msg
    ok, msg = run(exec_probe([sys.executable, "-c", "import time; time.sleep(5)"], 0.3))
    assert not ok and "timed out" in msg


def test_prober_needs_failure_threshold_to_turn_unready() -> None:
    results = iter([(True, ""), (False, "x"), (True, ""), (False, "a"), (False, "b"), (True, "")])
    changes: list[bool] = []

    class Scripted(Prober):
        async def probe_once(self) -> tuple[bool, str]:
            try:
                return next(results)
            except StopIteration:
                await asyncio.sleep(3600)
                raise

    spec = ProbeSpec("tcpSocket", port=1, period=0.01, failure_threshold=2)

    async def main() -> None:
        p = Scripted(spec, "127.0.0.1", list, lambda ok, msg: changes.append(ok))
        t = asyncio.create_task(p.run())
        await asyncio.sleep(0.5)
        t.cancel()

    asyncio.run(main())
    # ready at once; one failure is not enough; two in a row flip it; then ready again
    assert changes == [True, False, True]
