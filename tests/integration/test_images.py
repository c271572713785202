"""The built-in images (kpx/echo, kpx/http) in real pods: the answer-line contract, TCP+UDP,
HTTP keep-alive/pipelining/bodies/close, 1,000 concurrent connections, bad arguments."""

from __future__ import annotations

import subprocess
import sys

import pytest

from netns.images import image_argv
from netns.lab import Lab
from netns.sandbox import Sandbox
from tests.integration.lab_fixtures import unique_pod

pytestmark = pytest.mark.netns


def _py(sb: Sandbox, code: str, *args: str, timeout: float = 60) -> str:
    p = subprocess.run(
        sb.enter_argv([sys.executable, "-I", "-c", code, *args]),
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    assert p.returncode == 0, p.stderr[-800:]
    return p.stdout


@pytest.fixture(scope="module")
def pods(lab: Lab):  # type: ignore[no-untyped-def]
    """An echo pod and an http pod on node2, a client pod on node1."""
    echo, http, client = unique_pod("echo"), unique_pod("http"), unique_pod("cli")
    ips = {
        "echo": lab.add_pod(2, "default", echo),
        "http": lab.add_pod(2, "default", http, image="kpx/http"),
        "client": lab.add_pod(1, "default", client, image=None, command=["sleep", "3600"]),
    }
    names = {"echo": echo, "http": http, "client": client}
    try:
        yield names, ips, lab.pod("default", client)
    finally:
        for n in names.values():
            lab.delete_pod("default", n)


_TCP_LINES = """
import socket, sys
s = socket.create_connection((sys.argv[1], 8080), timeout=5)
s.sendall(b"one\\ntwo\\nthree")   # two full lines, one without newline (answered at EOF)
s.shutdown(socket.SHUT_WR)
data = b""
while True:
    d = s.recv(65536)
    if not d:
        break
    data += d
print(data.decode(), end="")
"""


def test_echo_answers_every_line_and_last_partial_line(pods) -> None:  # type: ignore[no-untyped-def]
    names, ips, client = pods
    lines = _py(client, _TCP_LINES, ips["echo"]).splitlines()
    assert len(lines) == 3
    assert len(set(lines)) == 1
    pod, ip, who = lines[0].split()
    assert pod == f"pod={names['echo']}" and ip == f"ip={ips['echo']}"
    assert who.startswith(f"client={ips['client']}:")


_UDP = """
import socket, sys
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); s.settimeout(3)
s.bind(("0.0.0.0", 40404))
for i in range(3):
    s.sendto(b"x", (sys.argv[1], int(sys.argv[2])))
    print(s.recv(1000).decode().strip())
"""


def test_echo_udp_and_custom_port(lab: Lab, pods) -> None:  # type: ignore[no-untyped-def]
    names, ips, client = pods
    out = _py(client, _UDP, ips["echo"], "8080").splitlines()
    assert out == [f"pod={names['echo']} ip={ips['echo']} client={ips['client']}:40404"] * 3
    other = unique_pod("port")
    ip = lab.add_pod(2, "default", other, args=["--port", "9090"])
    try:
        assert _py(client, _UDP, ip, "9090").splitlines()[0].startswith(f"pod={other} ip={ip} ")
    finally:
        lab.delete_pod("default", other)


_HTTP = """
import socket, sys
s = socket.create_connection((sys.argv[1], 8080), timeout=5)
# three pipelined requests: a GET, a POST with a body, then one asking to close
s.sendall(b"GET / HTTP/1.1\\r\\nHost: x\\r\\n\\r\\n"
          b"POST /p HTTP/1.1\\r\\nHost: x\\r\\nContent-Length: 5\\r\\n\\r\\nhello"
          b"GET /c HTTP/1.1\\r\\nHost: x\\r\\nConnection: close\\r\\n\\r\\n")
data = b""
while True:
    d = s.recv(65536)
    if not d:
        break
    data += d
print(data.decode().replace(chr(13), "<CR>"), end="")
"""


def test_http_keepalive_pipelining_body_and_close(pods) -> None:  # type: ignore[no-untyped-def]
    names, ips, client = pods
    raw = _py(client, _HTTP, ips["http"]).replace("<CR>", "\r")  # returns: server closed after #3
    responses = raw.split("HTTP/1.1 ")[1:]
    assert len(responses) == 3
    body = f"pod={names['http']} ip={ips['http']} client={ips['client']}:"
    for i, r in enumerate(responses):
        head, _, b = r.partition("\r\n\r\n")
        assert head.startswith("200 OK")
        assert ("Connection: close" in head) == (i == 2)
        assert b.startswith(body) and b.endswith("\n")
        assert f"Content-Length: {len(b)}" in head


_MANY = """
import selectors, socket, sys
n = int(sys.argv[2])
sel = selectors.DefaultSelector()
socks = []
for i in range(n):
    s = socket.socket(); s.setblocking(False)
    s.connect_ex((sys.argv[1], 8080))
    socks.append(s)
# every connection is open at once before any request is sent
for s in socks:
    sel.register(s, selectors.EVENT_WRITE)
ready = 0
while ready < n:
    for key, _ in sel.select(timeout=10):
        sel.unregister(key.fileobj)
        key.fileobj.send(b"hi\\n")
        sel.register(key.fileobj, selectors.EVENT_READ)
        ready += 1
answers = 0
while answers < n:
    events = sel.select(timeout=10)
    if not events:
        break
    for key, _ in events:
        d = key.fileobj.recv(1000)
        if d.startswith(b"pod="):
            answers += 1
        sel.unregister(key.fileobj)
print(answers)
"""


def test_echo_serves_1000_concurrent_connections(pods) -> None:  # type: ignore[no-untyped-def]
    _names, ips, client = pods
    assert _py(client, _MANY, ips["echo"], "1000").strip() == "1000"


def test_bad_arguments_fail_fast() -> None:
    p = subprocess.run(image_argv("kpx/echo", ["--bogus"]), capture_output=True, text=True, timeout=5)
    assert p.returncode == 2 and "unknown argument --bogus" in p.stderr
    p = subprocess.run(image_argv("kpx/http", ["--port", "0"]), capture_output=True, text=True, timeout=5)
    assert p.returncode == 2 and "--port" in p.stderr
