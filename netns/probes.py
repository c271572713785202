"""Readiness probes as kubelet runs them: tcpSocket, httpGet, exec.

The agent runs in the node's netns, so tcpSocket/httpGet connect to the pod IP over cni0 just
as kubelet does from the host; exec runs the command inside the pod's namespaces.
"""

from __future__ import annotations

import asyncio
import os
import socket
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from netns.podspec import container_port


@dataclass(frozen=True)
class ProbeSpec:
    kind: str  # tcpSocket | httpGet | exec
    port: int = 0
    host: str = ""
    path: str = "/"
    scheme: str = "HTTP"
    command: tuple[str, ...] = ()
    initial_delay: float = 0.0
    period: float = 10.0
    timeout: float = 1.0
    success_threshold: int = 1
    failure_threshold: int = 3


def parse_probe(pod: Mapping[str, Any], container: Mapping[str, Any], probe: Mapping[str, Any]) -> ProbeSpec:
    """A v1 Probe -> ProbeSpec, with upstream defaults. ValueError for what kubelet would reject."""
    common: dict[str, Any] = {
        "initial_delay": float(probe.get("initialDelaySeconds") or 0),
        "period": float(probe.get("periodSeconds") or 10),
        "timeout": float(probe.get("timeoutSeconds") or 1),
        "success_threshold": int(probe.get("successThreshold") or 1),
        "failure_threshold": int(probe.get("failureThreshold") or 3),
    }
    if "tcpSocket" in probe:
        t = probe["tcpSocket"] or {}
        return ProbeSpec("tcpSocket", port=container_port(pod, container, t.get("port")), host=t.get("host") or "", **common)
    if "httpGet" in probe:
        h = probe["httpGet"] or {}
        return ProbeSpec(
            "httpGet",
            port=container_port(pod, container, h.get("port")),
            host=h.get("host") or "",
            path=h.get("path") or "/",
            scheme=(h.get("scheme") or "HTTP").upper(),
            **common,
        )
    if "exec" in probe:
        cmd = tuple(str(c) for c in (probe["exec"] or {}).get("command") or [])
        if not cmd:
            raise ValueError("exec probe without a command")
        return ProbeSpec("exec", command=cmd, **common)
    raise ValueError("probe has none of tcpSocket, httpGet, exec (grpc is not supported by kpx)")


def _quiet(fut: asyncio.Future[Any]) -> None:
    """Retrieve an abandoned future's outcome so asyncio does not warn about it."""
    if not fut.cancelled():
        fut.exception()


async def _within(aw: Awaitable[Any], deadline: float) -> Any:
    """Await aw until the loop-time deadline; TimeoutError after it. Never waits for a
    cancelled operation to unwind (a connect cancelled in uvloop can hang): it is abandoned,
    and the caller closes the socket under it."""
    fut = asyncio.ensure_future(aw)
    left = deadline - asyncio.get_running_loop().time()
    try:
        done, _ = await asyncio.wait({fut}, timeout=max(left, 0.0))
    except BaseException:
        fut.cancel()
        fut.add_done_callback(_quiet)
        raise
    if not done:
        fut.cancel()
        fut.add_done_callback(_quiet)
        raise TimeoutError
    return fut.result()


async def _connect(host: str, port: int, deadline: float) -> socket.socket:
    loop = asyncio.get_running_loop()
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
    sock.setblocking(False)
    try:
        await _within(loop.sock_connect(sock, (host, port)), deadline)
    except BaseException:
        sock.close()
        raise
    return sock


def _why(e: BaseException) -> str:
    if isinstance(e, TimeoutError):
        return "i/o timeout"
    if isinstance(e, OSError) and e.errno:
        return os.strerror(e.errno).lower()  # "connection refused", as kubelet's Go error says
    return str(e) or type(e).__name__


async def tcp_probe(host: str, port: int, timeout: float) -> tuple[bool, str]:
    """Connect and close, like kubelet's tcpSocket probe."""
    deadline = asyncio.get_running_loop().time() + timeout
    try:
        sock = await _connect(host, port, deadline)
    except (OSError, TimeoutError) as e:
        return False, f"dial tcp {host}:{port}: connect: {_why(e)}"
    sock.close()
    return True, ""


async def http_probe(host: str, port: int, path: str, timeout: float) -> tuple[bool, str]:
    """GET; 200 <= code < 400 is success, like kubelet."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    url = f"http://{host}:{port}{path}"
    try:
        sock = await _connect(host, port, deadline)
    except (OSError, TimeoutError) as e:
        return False, f'Get "{url}": dial tcp {host}:{port}: connect: {_why(e)}'
    try:
        req = f"GET {path} HTTP/1.1\r\nHost: {host}:{port}\r\nUser-Agent: kube-probe/1.33\r\nConnection: close\r\n\r\n"
        await _within(loop.sock_sendall(sock, req.encode()), deadline)
        buf = b""
        while b"\r\n" not in buf and len(buf) < 4096:
            chunk = await _within(loop.sock_recv(sock, 4096), deadline)
            if not chunk:
                break
            buf += chunk
        parts = buf.split(b"\r\n", 1)[0].decode(errors="replace").split()
        code = int(parts[1]) if len(parts) >= 2 and parts[1].isdigit() else 0
        if 200 <= code < 400:
            return True, ""
        return False, f"HTTP probe failed with statuscode: {code}"
    except (OSError, TimeoutError) as e:
        return False, f'Get "{url}": {_why(e)}'
    finally:
        sock.close()


async def exec_probe(argv: Sequence[str], timeout: float) -> tuple[bool, str]:
    try:
        p = await asyncio.create_subprocess_exec(
            *argv, stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT
        )
    except OSError as e:
        return False, str(e)
    try:
        out, _ = await asyncio.wait_for(p.communicate(), timeout)
    except TimeoutError:
        p.kill()
        await p.wait()
        return False, f"command timed out after {timeout:g}s"
    if p.returncode == 0:
        return True, ""
    return False, f"command exited with {p.returncode}: {out.decode(errors='replace').strip()[:200]}"


class Prober:
    """Runs one readiness probe periodically and reports threshold-crossing changes."""

    def __init__(
        self,
        spec: ProbeSpec,
        pod_ip: str,
        exec_argv: Callable[[list[str]], list[str]],
        on_change: Callable[[bool, str], Awaitable[None] | None],
    ) -> None:
        self.spec = spec
        self.pod_ip = pod_ip
        self.exec_argv = exec_argv
        self.on_change = on_change
        self.ready = False
        self._ok = 0
        self._fail = 0

    async def probe_once(self) -> tuple[bool, str]:
        s = self.spec
        if s.kind == "tcpSocket":
            return await tcp_probe(s.host or self.pod_ip, s.port, s.timeout)
        if s.kind == "httpGet":
            return await http_probe(s.host or self.pod_ip, s.port, s.path, s.timeout)
        return await exec_probe(self.exec_argv(list(s.command)), s.timeout)

    async def run(self) -> None:
        s = self.spec
        if s.initial_delay:
            await asyncio.sleep(s.initial_delay)
        while True:
            ok, msg = await self.probe_once()
            if ok:
                self._ok, self._fail = self._ok + 1, 0
                if not self.ready and self._ok >= s.success_threshold:
                    self.ready = True
                    await _maybe_await(self.on_change(True, ""))
            else:
                self._ok, self._fail = 0, self._fail + 1
                # Not ready yet: the first failure keeps it unready; once ready, it takes
                # failureThreshold consecutive failures to flip.
                if self.ready and self._fail >= s.failure_threshold:
                    self.ready = False
                    await _maybe_await(self.on_change(False, msg))
            # Before the first success, probe faster than the period so pods go Ready promptly
            # (kubelet probes right after start; a 10 s wait for the second try is what users see
            # as slow). Never faster than 0.2 s.
            await asyncio.sleep(s.period if self.ready or self._ok else min(s.period, max(0.2, s.period / 10)))


async def _maybe_await(x: Awaitable[None] | None) -> None:
    if x is not None:
        await x
