"""Pod start-up and teardown throughput of the node agents, end to end through the apiserver.

    sudo .venv/bin/python -m bench.pods_e2e_bench [--pods 500] [--nodes 2] [--probe] [--keep]

Builds its own lab with `kpx up` (unique name, free subnet and port), then:
  1. creates N kpx/echo Pods (no nodeName: the scheduler spreads them) with 16 concurrent POSTs,
  2. watches them until every one is Ready -> pods/s = N / (last Ready - first POST),
  3. deletes them all (graceful, grace 0 s) and waits until the API has none and every sandbox,
     netns and IP lease is gone -> teardown seconds,
and prints one line per figure plus a JSON summary. `kpx down` at the end (unless --keep).
Targets: >= 20 pods/s to Ready with 500 pods over 2 nodes; teardown of 500 pods <= 60 s.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import secrets
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from kpx.kubeclient import Informer, KubeClient, KubeConfig


def _ready(pod: dict[str, Any] | None) -> bool:
    return bool(pod) and any(c.get("type") == "Ready" and c.get("status") == "True"
                             for c in (pod or {}).get("status", {}).get("conditions") or [])


def pod_body(name: str, probe: bool, node: str | None = None) -> dict[str, Any]:
    c: dict[str, Any] = {"name": "echo", "image": "kpx/echo"}
    if probe:
        c["readinessProbe"] = {"tcpSocket": {"port": 8080}, "periodSeconds": 1}
    return {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": name, "labels": {"bench": "pods"}},
            "spec": {"containers": [c], "terminationGracePeriodSeconds": 0, **({"nodeName": node} if node else {})}}


async def run(kubeconfig: Path, n: int, probe: bool, state_dir: Path, pin: int = 0) -> dict[str, Any]:
    cfg = KubeConfig.load(kubeconfig)
    async with KubeClient(cfg, request_timeout=120) as kc:
        ready_at: dict[str, float] = {}
        nodes: dict[str, str] = {}
        all_ready = asyncio.Event()

        seen_at: dict[str, float] = {}
        bound_at: dict[str, float] = {}

        def on_event(typ: str, old: dict[str, Any] | None, new: dict[str, Any] | None) -> None:
            if new is not None:
                nm = new["metadata"]["name"]
                seen_at.setdefault(nm, time.monotonic())
                if new["spec"].get("nodeName"):
                    bound_at.setdefault(nm, time.monotonic())
            if new is not None and _ready(new):
                name = new["metadata"]["name"]
                if name not in ready_at:
                    ready_at[name] = time.monotonic()
                    nodes[name] = new["spec"].get("nodeName", "")
                    if len(ready_at) >= n:
                        all_ready.set()

        inf = Informer(kc, "/api/v1/namespaces/default/pods", label_selector="bench=pods", on_event=on_event)
        task = asyncio.create_task(inf.run())
        await inf.wait_synced()
        sem = asyncio.Semaphore(16)

        async def create(i: int) -> None:
            async with sem:
                node = f"node{i % pin + 1}" if pin else None
                await kc.create("/api/v1/namespaces/default/pods", pod_body(f"bench-{i:04d}", probe, node))

        t0 = time.monotonic()
        await asyncio.gather(*(create(i) for i in range(n)))
        t_created = time.monotonic()
        await asyncio.wait_for(all_ready.wait(), timeout=max(60.0, n / 4))
        t_ready = max(ready_at.values())
        per_node: dict[str, int] = {}
        for v in nodes.values():
            per_node[v] = per_node.get(v, 0) + 1
        def p50(xs: list[float]) -> float:
            return round(sorted(xs)[len(xs) // 2], 2) if xs else 0.0

        bind_lat = p50([bound_at[k] - seen_at[k] for k in ready_at if k in bound_at])
        start_lat = p50([ready_at[k] - bound_at[k] for k in ready_at if k in bound_at])
        last_bound = round(max(bound_at.values()) - t0, 2)
        # teardown
        t1 = time.monotonic()

        async def delete(name: str) -> None:
            async with sem:
                await kc.delete(f"/api/v1/namespaces/default/pods/{name}", gracePeriodSeconds=0)

        await asyncio.gather(*(delete(f"bench-{i:04d}") for i in range(n)))
        t_deleted = time.monotonic()
        sandboxes = state_dir / "sandboxes"
        while True:
            left = (await kc.list("/api/v1/namespaces/default/pods", label_selector="bench=pods")).get("items") or []
            sb_left = [f for f in os.listdir(sandboxes) if f.endswith(".json")] if sandboxes.exists() else []
            netns_left = [x for x in os.listdir("/run/netns") if x.startswith(f"kpx-{state_dir.name}-default-bench-")]
            leases = sum(len([f for f in os.listdir(d) if f[0].isdigit()])
                         for d in (state_dir / "ipam").iterdir()) if (state_dir / "ipam").exists() else 0
            if not left and not sb_left and not netns_left and leases == 0:
                break
            if time.monotonic() - t1 > 90:
                raise RuntimeError(f"teardown stuck: {len(left)} pods, {len(sb_left)} sandboxes, {leases} leases")
            await asyncio.sleep(0.2)
        t_gone = time.monotonic()
        task.cancel()
        return {
            "pods": n,
            "probe": probe,
            "scheduler": not pin,
            "per_node": per_node,
            "create_s": round(t_created - t0, 2),
            "all_ready_s": round(t_ready - t0, 2),
            "pods_per_s_to_ready": round(n / (t_ready - t0), 1),
            "p50_created_to_bound_s": bind_lat,
            "p50_bound_to_ready_s": start_lat,
            "last_bound_s": last_bound,
            "delete_calls_s": round(t_deleted - t1, 2),
            "teardown_s": round(t_gone - t1, 2),
        }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--pods", type=int, default=500)
    ap.add_argument("--nodes", type=int, default=2)
    ap.add_argument("--probe", action="store_true", help="give every pod a tcpSocket readiness probe")
    ap.add_argument("--keep", action="store_true", help="leave the lab up afterwards")
    ap.add_argument("--pin", action="store_true",
                    help="set spec.nodeName round-robin (skip the scheduler: the agents' own throughput)")
    a = ap.parse_args(argv)
    if os.geteuid() != 0:
        print("pods_bench: run as root (it builds a lab)", file=sys.stderr)
        return 1
    from netns.lab import state_root
    from netns.up import free_port

    name = ""
    for _ in range(10):  # another lab (a test session) may hold the random subnet: pick again
        name = "pb" + secrets.token_hex(3)
        n = int.from_bytes(os.urandom(2), "big") % 512
        subnet = f"198.{18 + n // 256}.{n % 256}.0/24"
        up = subprocess.run([sys.executable, "-m", "kpx", "up", "--lab", name, "--nodes", str(a.nodes), "--proxy-mode",
                             "none", "--subnet", subnet, "--apiserver-port", str(free_port())],
                            capture_output=True, text=True)
        if up.returncode == 0:
            break
        if "overlaps" not in up.stderr and "in use" not in up.stderr:
            print(f"pods_bench: kpx up failed: {up.stderr.strip()}", file=sys.stderr)
            return 1
    else:
        print(f"pods_bench: kpx up failed: {up.stderr.strip()}", file=sys.stderr)
        return 1
    try:
        res = asyncio.run(run(state_root() / name / "kubeconfig", a.pods, a.probe, state_root() / name,
                              a.nodes if a.pin else 0))
    finally:
        if not a.keep:
            subprocess.run([sys.executable, "-m", "kpx", "down", "--lab", name], capture_output=True)
    how = "scheduler" if not a.pin else "pinned nodeName"
    print(f"pods created -> all Ready ({how}): {res['pods']} pods in {res['all_ready_s']} s = "
          f"{res['pods_per_s_to_ready']} pods/s (target >= 20), spread {res['per_node']}, "
          f"p50 created->bound {res['p50_created_to_bound_s']} s, bound->Ready {res['p50_bound_to_ready_s']} s")
    print(f"teardown of {res['pods']} pods (API gone, sandboxes, netns, IP leases): {res['teardown_s']} s "
          f"(target <= 60)")
    print(json.dumps(res))
    return 0


if __name__ == "__main__":
    sys.exit(main())
