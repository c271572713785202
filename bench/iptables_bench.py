"""iptables mode control-plane bench: render and iptables-restore at 1k/5k/10k Services.

    .venv/bin/python -m bench.iptables_bench [--sizes 1000,5000,10000] [--endpoints 10]
                                             [--backends nft,legacy] [--json out.json]

Per size and backend, in a throw-away netns (deleted afterwards, even on error):
  render_cold   first full render (no caches)          restore_full_replace  restore replacing the tables
  apply_full    mode.apply of a full plan: --noflush restore + iptables-save sweep + jump check
  render_warm   full render again, nothing changed (cache hits)
  partial       one endpoint changed: render + apply (= "one endpoint change programmed")
Payload bytes and rule counts come from Plan.stats. Figures are wall-clock seconds; *_cpu columns
are CPU seconds of the bench and its iptables children (user+sys), which stay meaningful on a busy
machine.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import secrets
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from proxy.iptables_restore import Iptables, iptables_version
from proxy.model import Endpoint, ProxyConfig, ProxyState, ServicePort, ServicePortName
from proxy.modes.iptables import IptablesMode
from proxy.modes.iptables_render import IptablesRenderer

CFG = ProxyConfig(node_name="node1", node_ips=("192.168.56.11",), cluster_cidr="10.244.0.0/16")


def make_state(n_services: int, n_eps: int) -> ProxyState:
    services: dict[ServicePortName, ServicePort] = {}
    endpoints: dict[ServicePortName, tuple[Endpoint, ...]] = {}
    for i in range(n_services):
        spn = ServicePortName(f"ns{i % 100}", f"svc{i}", "http")
        services[spn] = ServicePort(
            spn, f"10.{96 + i // 65000}.{(i // 250) % 250}.{i % 250 + 1}", 80, node_port=30000 + i if i % 10 == 0 else 0
        )
        endpoints[spn] = tuple(
            Endpoint(f"10.{244 + (i * n_eps + j) // 62500}.{(i * n_eps + j) // 250 % 250}.{(i * n_eps + j) % 250 + 1}",
                     8080, node_name=f"node{j % 3 + 1}")
            for j in range(n_eps)
        )
    return ProxyState(CFG, services, endpoints)


@contextmanager
def throwaway_netns() -> Iterator[str]:
    name = f"kpx-bench{secrets.token_hex(4)}"
    subprocess.run(["ip", "netns", "add", name], check=True)
    try:
        yield name
    finally:
        subprocess.run(["ip", "netns", "del", name], check=False)


def _t(fn: Any) -> tuple[float, Any]:
    t0 = time.perf_counter()
    out = fn()
    return time.perf_counter() - t0, out


def _cpu() -> float:
    """CPU seconds of this process and its waited-for children (iptables-restore, incl. its
    kernel time): on a shared, loaded machine wall time mostly measures the queue."""
    me = resource.getrusage(resource.RUSAGE_SELF)
    ch = resource.getrusage(resource.RUSAGE_CHILDREN)
    return me.ru_utime + me.ru_stime + ch.ru_utime + ch.ru_stime


def bench_one(n: int, n_eps: int, backend: str, noflush_max: int) -> dict[str, Any]:
    st = make_state(n, n_eps)
    res: dict[str, Any] = {"services": n, "endpoints_per_service": n_eps, "backend": backend}
    r = IptablesRenderer(CFG)
    c0 = _cpu()
    res["render_cold"], plan = _t(lambda: r.render(st, None))
    res["render_cold_cpu"] = _cpu() - c0
    text = plan.payload.text()
    res["payload_bytes"] = len(text)
    res["rules_nat"] = plan.stats["rules_nat"]
    res["rules_filter"] = plan.stats["rules_filter"]
    res["chains_written"] = plan.stats["chains_written"]
    full_noflush = n <= noflush_max
    with throwaway_netns() as ns:
        ipt = Iptables(backend, ns)
        mode = IptablesMode(CFG, backend=backend, netns=ns)
        mode.renderer = r  # reuse the warm caches
        res["render_warm"], plan2 = _t(lambda: mode.render(st, None))
        # the whole table replaced in an empty netns: what restore itself costs
        res["restore_full_replace"], _ = _t(lambda: ipt.restore(text, noflush=False))
        if full_noflush:
            # what the proxy does on a full sync: --noflush restore + save sweep + jump check
            res["apply_full"], prior = _t(lambda: mode.apply(plan2))
        else:
            res["apply_full"] = None
            prior = plan2.prior
        # one endpoint changes in one Service: partial render + --noflush restore
        spn = next(iter(st.services))
        eps = dict(st.endpoints)
        old = eps[spn]
        eps[spn] = (*old[:-1], Endpoint("10.255.255.1", 8080, node_name="node2"))
        st2 = ProxyState(CFG, st.services, eps, changed=frozenset({spn}))
        t0 = time.perf_counter()
        c0 = _cpu()
        p3 = mode.render(st2, prior)
        t_render = time.perf_counter() - t0
        mode.apply(p3)
        res["partial_render"] = t_render
        res["partial_programmed"] = time.perf_counter() - t0
        res["partial_programmed_cpu"] = _cpu() - c0
        res["partial_payload_bytes"] = p3.stats["payload_bytes"]
        res["partial_chains_written"] = p3.stats["chains_written"]
        res["partial_chains_skipped"] = p3.stats["chains_skipped"]
        assert "10.255.255.1:8080" in ipt.save("nat")  # it landed
    return res


def _fmt(v: Any) -> str:
    if v is None:
        return f"{'skipped':>14}"
    return f"{v:>14.3f}" if isinstance(v, float) else f"{v:>14}"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="1000,5000,10000")
    ap.add_argument("--endpoints", type=int, default=10)
    ap.add_argument("--backends", default="nft,legacy")
    ap.add_argument("--json", help="write results here")
    ap.add_argument(
        "--nft-noflush-max",
        type=int,
        default=5000,
        help="largest size at which the nft backend runs a --noflush full sync (minutes at 10k with iptables-nft 1.8.9)",
    )
    a = ap.parse_args(argv)
    if os.geteuid() != 0:
        print("iptables_bench: run as root (it creates a throw-away netns)", file=sys.stderr)
        return 1
    env = {
        "kernel": platform.release(),
        "python": platform.python_version(),
        "cpus": os.cpu_count(),
        "iptables": {b: ".".join(map(str, iptables_version(b))) for b in a.backends.split(",")},
    }
    print(f"# {env}")
    cols = ["backend", "services", "render_cold", "render_cold_cpu", "render_warm", "restore_full_replace",
            "apply_full", "partial_render", "partial_programmed", "partial_programmed_cpu", "payload_bytes",
            "partial_payload_bytes", "rules_nat"]
    print(" ".join(f"{c:>14}" for c in cols))
    results = []
    for size in (int(s) for s in a.sizes.split(",")):
        for backend in a.backends.split(","):
            res = bench_one(size, a.endpoints, backend, a.nft_noflush_max if backend == "nft" else 10**9)
            results.append(res)
            print(" ".join(_fmt(res[c]) for c in cols), flush=True)
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"env": env, "results": results}, f, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
