"""userspace mode data-path bench: the same ClusterIPs in the same lab, run by userspace
(splice relay), userspace (recv/send relay) and iptables mode, one after the other.

    .venv/bin/python -m bench.userspace_bench [--seconds 5] [--json out.json]

Builds a throw-away 2-node lab (deleted afterwards, even on error): an iperf3 server pod and a
kpx/http pod on node2, a client pod on node1; node1's proxy is the mode under test (driven in
process, its data-path thread inside node1's netns). Per mode:
  bulk_gbps       iperf3 -c <ClusterIP> (one TCP stream, client -> server)
  conn_per_s      wrk with "Connection: close" (a new connection per request) against kpx/http
  cpu_s_per_gb    CPU seconds of the proxy (this process: the data-path thread) per GB relayed
                  during the iperf3 run (userspace modes; the kernel does iptables' work)
The machine is shared: the load average is printed with the figures.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import resource
import subprocess
import sys
import time
from typing import Any

from netns.lab import Lab
from proxy.iptables_restore import Iptables
from proxy.model import Endpoint, ProxyConfig, ProxyState, ServicePort, ServicePortName
from proxy.modes.base import Mode
from proxy.modes.iptables import IptablesMode, cleanup_backend
from proxy.modes.userspace import UserspaceMode

BULK_IP, HTTP_IP = "10.96.70.1", "10.96.70.2"


def cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def run(argv: list[str], timeout: float = 120) -> str:
    p = subprocess.run(argv, capture_output=True, text=True, timeout=timeout)
    if p.returncode != 0:
        raise RuntimeError(f"{' '.join(argv[-6:])} failed: {p.stderr.strip()[-400:]}")
    return p.stdout


def iperf(client: list[str], seconds: int) -> tuple[float, int]:
    out = json.loads(run(client + ["iperf3", "-c", BULK_IP, "-p", "5201", "-t", str(seconds), "-J"],
                         timeout=seconds + 60))
    end = out["end"]["sum_received"]
    return end["bits_per_second"] / 1e9, int(end["bytes"])


def wrk(client: list[str], seconds: int) -> float:
    out = run(client + ["wrk", "-t", "2", "-c", "32", "-d", f"{seconds}s", "-H", "Connection: close",
                        f"http://{HTTP_IP}:80/"], timeout=seconds + 60)
    m = re.search(r"Requests/sec:\s+([\d.]+)", out)
    if not m:
        raise RuntimeError(f"cannot parse wrk output: {out[-300:]}")
    return float(m[1])


def measure(mode: Mode[Any], state: ProxyState, client: list[str], seconds: int) -> dict[str, float]:
    mode.apply(mode.render(state, None))
    time.sleep(0.2)
    c0 = cpu()
    gbps, nbytes = iperf(client, seconds)
    c1 = cpu()
    rps = wrk(client, seconds)
    res = {"bulk_gbps": round(gbps, 3), "conn_per_s": round(rps, 1)}
    if isinstance(mode, UserspaceMode):
        res["cpu_s_per_gb"] = round((c1 - c0) / (nbytes / 1e9), 3)
    return res


def loop_overhead(rounds: int = 20000) -> dict[str, float]:
    """Why the data path runs its own epoll loop: CPU microseconds per readiness event for a
    1-byte ping-pong over a socketpair, dispatched by a raw select.epoll loop (as
    proxy.userspace.reactor does) and by uvloop's add_reader callbacks."""
    import select
    import socket

    def raw() -> float:
        a, b = socket.socketpair()
        a.setblocking(False)
        b.setblocking(False)
        ep = select.epoll()
        handlers = {}
        left = [rounds]

        def on_a(ev: int) -> None:
            a.recv(1)
            a.send(b"x")

        def on_b(ev: int) -> None:
            b.recv(1)
            left[0] -= 1
            if left[0]:
                b.send(b"x")

        for s_, h in ((a, on_a), (b, on_b)):
            handlers[s_.fileno()] = h
            ep.register(s_.fileno(), select.EPOLLIN)
        c0 = cpu()
        b.send(b"x")
        while left[0]:
            for fd, ev in ep.poll(1.0, 1024):
                handlers[fd](ev)
        used = cpu() - c0
        ep.close()
        a.close()
        b.close()
        return used

    def uv() -> float:
        import asyncio

        import uvloop

        a, b = socket.socketpair()
        a.setblocking(False)
        b.setblocking(False)
        loop = uvloop.new_event_loop()
        done = loop.create_future()
        left = [rounds]

        def on_a() -> None:
            a.recv(1)
            a.send(b"x")

        def on_b() -> None:
            b.recv(1)
            left[0] -= 1
            if left[0]:
                b.send(b"x")
            elif not done.done():
                done.set_result(None)

        loop.add_reader(a.fileno(), on_a)
        loop.add_reader(b.fileno(), on_b)
        c0 = cpu()
        b.send(b"x")
        loop.run_until_complete(done)
        used = cpu() - c0
        loop.remove_reader(a.fileno())
        loop.remove_reader(b.fileno())
        loop.close()
        a.close()
        b.close()
        asyncio.set_event_loop(None)
        return used

    events = 2 * rounds
    return {"epoll_us_per_event": round(raw() / events * 1e6, 2), "uvloop_us_per_event": round(uv() / events * 1e6, 2)}


def make_lab() -> Lab:
    from tests.integration.lab_fixtures import make_lab as mk

    return mk(nodes=2, prefix="ub")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0] if __doc__ else None)
    ap.add_argument("--seconds", type=int, default=5)
    ap.add_argument("--modes", default="userspace,userspace-copy,iptables")
    ap.add_argument("--json", default=None)
    ap.add_argument("--pipe-size", type=int, default=1 << 20, help="splice pipe size (bytes)")
    args = ap.parse_args(argv)
    lab = make_lab()
    results: dict[str, Any] = {"loadavg_before": os.getloadavg(), "loop": loop_overhead()}
    print("loop", results["loop"], flush=True)
    try:
        srv = "us-iperf"
        lab.add_pod(2, "default", srv, image=None, command=["iperf3", "-s", "-p", "5201", "-B", "0.0.0.0"], wait_port=5201)
        lab.add_pod(2, "default", "us-http", image="kpx/http")
        lab.add_pod(1, "default", "us-client", image="kpx/echo")
        client = lab.pod("default", "us-client").enter_argv([])
        n1, n2 = lab.nodes[0], lab.nodes[1]
        cfg = ProxyConfig(node_name=n1.name, node_ips=(n1.ip,), cluster_cidr=lab.pod_cidr)
        bulk = ServicePort(ServicePortName("default", "bulk"), BULK_IP, 5201)
        http = ServicePort(ServicePortName("default", "http"), HTTP_IP, 80)
        state = ProxyState(cfg, {bulk.name: bulk, http.name: http}, {
            bulk.name: (Endpoint(lab.pod("default", srv).ip, 5201, node_name=n2.name),),
            http.name: (Endpoint(lab.pod("default", "us-http").ip, 8080, node_name=n2.name),),
        })
        for name in args.modes.split(","):
            mode: Mode[Any]
            if name.startswith("userspace"):
                mode = UserspaceMode(cfg, backend="nft", netns=n1.netns,
                                     relay="copy" if name.endswith("copy") else "splice", pipe_size=args.pipe_size)
            else:
                mode = IptablesMode(cfg, backend="nft", netns=n1.netns)
            try:
                results[name] = measure(mode, state, client, args.seconds)
            finally:
                mode.cleanup()
                mode.close()
            print(name, results[name], flush=True)
        cleanup_backend(Iptables("nft", n1.netns))
    finally:
        lab.destroy()
    results["loadavg_after"] = os.getloadavg()
    us, ipt = results.get("userspace"), results.get("iptables")
    if us and ipt:
        results["userspace_vs_iptables"] = {
            "bulk": round(us["bulk_gbps"] / ipt["bulk_gbps"], 3),
            "conn_per_s": round(us["conn_per_s"] / ipt["conn_per_s"], 3),
        }
    cp = results.get("userspace-copy")
    if us and cp:
        results["splice_vs_copy"] = {"bulk": round(us["bulk_gbps"] / cp["bulk_gbps"], 3),
                                     "cpu_per_gb": round(us["cpu_s_per_gb"] / cp["cpu_s_per_gb"], 3)}
    print(json.dumps(results, indent=2))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
