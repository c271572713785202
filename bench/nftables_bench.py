"""nftables mode control plane at scale: render and `nft -f` times for full syncs, one endpoint
change, one Service added, transaction size, table object counts, in a throw-away netns.

    .venv/bin/python -m bench.nftables_bench [--sizes 1000,5000,10000,30000] [--endpoints 10]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import time
import uuid
from dataclasses import replace

from bench.synthetic import endpoints, make_state, service
from netns.ns import netns_add, netns_delete
from proxy.modes.nftables import NftablesMode


def nft_apply(ns: str, payload: str) -> float:
    t = time.perf_counter()
    r = subprocess.run(["ip", "netns", "exec", ns, "nft", "-f", "-"], input=payload, capture_output=True, text=True)
    if r.returncode != 0:
        raise SystemExit(f"nft -f failed: {r.stderr[:500]}")
    return time.perf_counter() - t


def run(sizes: list[int], eps: int) -> list[dict]:
    out = []
    for n in sizes:
        ns = f"kpx-nftb{uuid.uuid4().hex[:6]}"
        netns_add([ns])
        try:
            st = make_state(n, eps)
            mode = NftablesMode(st.config)
            t = time.perf_counter()
            plan = mode.render(st, None)
            render_full = time.perf_counter() - t
            apply_full = nft_apply(ns, plan.payload)
            prior = plan.prior
            # one endpoint changes in the last Service
            last = service(n - 1)
            eps_map = dict(st.endpoints)
            eps_map[last.name] = endpoints(n - 1, eps, gen=1)
            st1 = replace(st, endpoints=eps_map, changed=frozenset({last.name}))
            t = time.perf_counter()
            p1 = mode.render(st1, prior)
            render_ep = time.perf_counter() - t
            apply_ep = nft_apply(ns, p1.payload)
            # one Service added
            new = replace(service(n), name=replace(service(n).name, name=f"svc-new-{n}"))
            svcs = dict(st1.services)
            svcs[new.name] = new
            eps_map[new.name] = endpoints(n + 7, eps)
            st2 = replace(st1, services=svcs, endpoints=eps_map, changed=frozenset({new.name}))
            t = time.perf_counter()
            p2 = mode.render(st2, p1.prior)
            render_add = time.perf_counter() - t
            apply_add = nft_apply(ns, p2.payload)
            rec = {
                "services": n, "endpoints": eps,
                "render_full_s": round(render_full, 4), "nft_full_s": round(apply_full, 4),
                "payload_full_bytes": plan.stats["payload_bytes"], "chains": plan.stats["chains_total"],
                "render_endpoint_change_s": round(render_ep, 5), "nft_endpoint_change_s": round(apply_ep, 5),
                "payload_endpoint_change_bytes": p1.stats["payload_bytes"],
                "render_add_service_s": round(render_add, 5), "nft_add_service_s": round(apply_add, 5),
            }
            print(json.dumps(rec), flush=True)
            out.append(rec)
        finally:
            netns_delete(ns)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", default="1000,5000,10000,30000")
    ap.add_argument("--endpoints", type=int, default=10)
    a = ap.parse_args()
    run([int(x) for x in a.sizes.split(",")], a.endpoints)


if __name__ == "__main__":
    main()
