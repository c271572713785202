"""Shared by the built-in images: who am I (pod name, pod IP) and the answer line."""

from __future__ import annotations

import argparse
import fcntl
import os
import socket
import struct

SIOCGIFADDR = 0x8915


def pod_ip(ifname: str = "eth0") -> str:
    """KPX_POD_IP if the sandbox set it, else eth0's IPv4 address (ioctl, no DNS)."""
    ip = os.environ.get("KPX_POD_IP")
    if ip:
        return ip
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            req = struct.pack("256s", ifname.encode()[:15])
            return socket.inet_ntoa(fcntl.ioctl(s.fileno(), SIOCGIFADDR, req)[20:24])
    except OSError:
        return "0.0.0.0"


def pod_name() -> str:
    return os.environ.get("KPX_POD_NAME") or socket.gethostname()


def parse_args(prog: str, argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog=prog)
    p.add_argument("--port", type=int, default=8080)
    p.add_argument("--bind", default="0.0.0.0")
    return p.parse_args(argv)


def line_prefix() -> bytes:
    return f"pod={pod_name()} ip={pod_ip()} client=".encode()


def run_loop(main_coro_factory) -> None:  # type: ignore[no-untyped-def]
    """Run with uvloop when installed (the bench pushes thousands of connections through us)."""
    import asyncio

    try:
        import uvloop

        uvloop.run(main_coro_factory())
    except ImportError:
        asyncio.run(main_coro_factory())
