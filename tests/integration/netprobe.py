"""Tiny probes run inside a netns/pod: one TCP request line or one UDP datagram to an echo
server, printing the answer line. Used by the lab and sandbox tests (and anyone else's)."""

from __future__ import annotations

import subprocess
import sys

_TCP = (
    "import socket,sys\n"
    "s=socket.create_connection((sys.argv[1],int(sys.argv[2])),timeout=3)\n"
    "s.sendall(b'hello\\n')\n"
    "b=b''\n"
    "while not b.endswith(b'\\n'):\n"
    "    d=s.recv(4096)\n"
    "    if not d: break\n"
    "    b+=d\n"
    "print(b.decode().strip())\n"
)
_UDP = (
    "import socket,sys\n"
    "s=socket.socket(socket.AF_INET,socket.SOCK_DGRAM); s.settimeout(3)\n"
    "s.sendto(b'hello\\n',(sys.argv[1],int(sys.argv[2])))\n"
    "print(s.recv(4096).decode().strip())\n"
)


def probe_argv(proto: str, ip: str, port: int) -> list[str]:
    return [sys.executable, "-I", "-c", _TCP if proto == "tcp" else _UDP, ip, str(port)]


def probe(prefix: list[str], proto: str, ip: str, port: int = 8080) -> str:
    """Run the probe under prefix (e.g. sandbox.enter_argv-style or nsenter argv); return the line."""
    p = subprocess.run(prefix + probe_argv(proto, ip, port), capture_output=True, text=True, timeout=15)
    assert p.returncode == 0, f"{proto} probe to {ip}:{port} failed: {p.stderr.strip()[-300:]}"
    return p.stdout.strip()


def parse(line: str) -> dict[str, str]:
    """'pod=a ip=b client=c:d' -> {'pod': 'a', 'ip': 'b', 'client': 'c:d'}"""
    return dict(kv.split("=", 1) for kv in line.split())
