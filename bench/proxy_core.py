"""Proxy core figures (no kernel): how long the change tracker takes to ingest N Services with
their EndpointSlices, to snapshot a full and a partial ProxyState, and to build the conntrack
reconciler's UDP frontend map. These bound the control-plane cost kpx adds before a mode renders.

    .venv/bin/python -m bench.proxy_core --services 1000,10000,30000 --endpoints 3
"""

from __future__ import annotations

import argparse
import time
from typing import Any

from proxy.conntrack import udp_frontends
from proxy.model import ProxyConfig
from proxy.tracker import ChangeTracker


def objects(n: int, eps: int) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    svcs, slices = [], []
    for i in range(n):
        name = f"svc{i}"
        svcs.append({"metadata": {"namespace": "bench", "name": name, "resourceVersion": "1"},
                     "spec": {"type": "ClusterIP", "clusterIP": f"10.96.{i // 250}.{i % 250 + 1}",
                              "ports": [{"name": "http", "port": 80, "protocol": "TCP" if i % 2 else "UDP"}]}})
        slices.append({"metadata": {"namespace": "bench", "name": f"{name}-abc",
                                    "labels": {"kubernetes.io/service-name": name}},
                       "addressType": "IPv4",
                       "endpoints": [{"addresses": [f"10.{244 + (i * eps + j) // 65000}.{(i * eps + j) // 250 % 256}."
                                                    f"{(i * eps + j) % 250 + 1}"],
                                      "conditions": {"ready": True}, "nodeName": f"n{j % 3}"} for j in range(eps)],
                       "ports": [{"name": "http", "port": 8080, "protocol": "TCP" if i % 2 else "UDP"}]})
    return svcs, slices


def run(n: int, eps: int) -> dict[str, float]:
    svcs, slices = objects(n, eps)
    t = ChangeTracker(ProxyConfig("n0"))
    t0 = time.perf_counter()
    for s in svcs:
        t.on_service("ADDED", None, s)
    for s in slices:
        t.on_endpoint_slice("ADDED", None, s)
    ingest = time.perf_counter() - t0
    t0 = time.perf_counter()
    state, tok = t.snapshot()
    full = time.perf_counter() - t0
    t.commit(tok)
    changed = dict(slices[n // 2])
    changed["endpoints"] = changed["endpoints"][:-1]
    t0 = time.perf_counter()
    t.on_endpoint_slice("MODIFIED", slices[n // 2], changed)
    pstate, _ = t.snapshot()
    partial = time.perf_counter() - t0
    assert pstate.changed is not None and len(pstate.changed) == 1
    t0 = time.perf_counter()
    udp_frontends(state)
    front = time.perf_counter() - t0
    return {"ingest_s": ingest, "per_object_us": ingest / (2 * n) * 1e6, "snapshot_full_ms": full * 1e3,
            "change+snapshot_partial_ms": partial * 1e3, "udp_frontends_ms": front * 1e3}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--services", default="1000,10000,30000")
    ap.add_argument("--endpoints", type=int, default=3)
    a = ap.parse_args()
    print(f"{'services':>9} {'ingest s':>9} {'us/object':>10} {'full snap ms':>13} {'partial ms':>11} {'udp map ms':>11}")
    for n in (int(x) for x in a.services.split(",")):
        r = run(n, a.endpoints)
        print(f"{n:>9} {r['ingest_s']:>9.2f} {r['per_object_us']:>10.1f} {r['snapshot_full_ms']:>13.1f} "
              f"{r['change+snapshot_partial_ms']:>11.2f} {r['udp_frontends_ms']:>11.1f}")


if __name__ == "__main__":
    main()
