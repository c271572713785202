"""Data-plane figures from inside the client pod: kpx-connlat (bench/connlat.c) for first-packet
connection latency and new connections per second, iperf3 for bulk throughput.

    first_packet_rtt_s  connect() time of a new TCP connection (returns on the SYN-ACK), samples
    conn_per_s          connect+close (RST) loops in 2 processes, connections per second
    throughput_bps      iperf3 -c, one stream, bits per second (receiver side)
    tool_floor_s        kpx-connlat against its own loopback listener: the client's own cost
"""

from __future__ import annotations

import json
import subprocess

from netns import cbuild
from netns.ns import netns_argv

cbuild.PROGRAMS.setdefault("kpx-connlat", cbuild.Path(__file__).resolve().parent / "connlat.c")


def connlat() -> str:
    """The helper's path, compiled next to its source on first use (as the lab's C programs)."""
    return cbuild.binary("kpx-connlat")


def _run(netns: str, argv: list[str], timeout: float) -> str:
    p = subprocess.run(netns_argv(netns, argv), capture_output=True, text=True, timeout=timeout)
    if p.returncode != 0:
        raise RuntimeError(f"{argv[0]} failed: {p.stderr.strip()[-300:]}")
    return p.stdout


def latencies(netns: str, ip: str, port: int, n: int) -> tuple[list[float], int]:
    """(connect times of the connections that succeeded, how many failed within 2 s)."""
    p = subprocess.run(netns_argv(netns, [connlat(), "lat", ip, str(port), str(n)]), capture_output=True,
                       text=True, timeout=120 + n * 0.05)
    if p.returncode != 0:
        raise RuntimeError(f"kpx-connlat failed: {p.stderr.strip()[-300:]}")
    fails = sum(int(ln.split()[1]) for ln in p.stderr.splitlines() if ln.startswith("failures "))
    return [int(x) / 1e9 for x in p.stdout.split()], fails


def tool_floor(netns: str, n: int) -> list[float]:
    return [int(x) / 1e9 for x in _run(netns, [connlat(), "loop", str(n)], timeout=60).split()]


def conn_rate(netns: str, ip: str, port: int, secs: float, procs: int = 2) -> float:
    out = _run(netns, [connlat(), "rate", ip, str(port), str(secs), str(procs)], timeout=secs + 30)
    return int(out.strip()) / secs


def throughput(netns: str, ip: str, port: int, secs: float) -> float:
    t = str(max(1, round(secs)))  # iperf3 -t takes whole seconds (0.5 read as 0: it never ends)
    out = _run(netns, ["iperf3", "-c", ip, "-p", str(port), "-t", t, "-J", "--connect-timeout", "5000"], timeout=secs + 30)
    doc = json.loads(out)
    return float(doc["end"]["sum_received"]["bits_per_second"])
