"""Pod sandbox bench: create/teardown rates, holder and container RSS, on a throw-away lab.

    sudo .venv/bin/python -m bench.pods_bench [--pods 200] [--nodes 2] [--workers 4]
                                               [--image kpx/echo|none] [--json out.json]

Phases (each timed on its own): sandboxes (holder + netns + veth + IP), containers (start the
image in every pod and wait until it listens), the whole pipeline (both, per pod, as an agent
does), teardown of every pod in one batch, then the lab. Uses its own lab name and a free /24
of 198.18.0.0/15, so it runs beside tests and a user's lab.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from netns.images import image_argv
from netns.lab import Lab
from netns.sandbox import Sandbox, destroy_many


def _rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


def _make_lab(nodes: int) -> Lab:
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    from tests.integration.lab_fixtures import make_lab

    return make_lab(nodes=nodes, prefix="b")


def run(pods: int, nodes: int, workers: int, image: str | None) -> dict[str, Any]:
    lab = _make_lab(nodes)
    out: dict[str, Any] = {
        "pods": pods,
        "nodes": nodes,
        "workers": workers,
        "image": image,
        "cpus": os.cpu_count(),
    }
    try:
        pool = ThreadPoolExecutor(max_workers=workers)

        def make(i: int) -> Sandbox:
            return Sandbox.create(lab, 1 + i % nodes, "bench", f"p{i}")

        t0 = time.perf_counter()
        sbs = list(pool.map(make, range(pods)))
        dt = time.perf_counter() - t0
        out["sandbox_create_s"] = round(dt, 3)
        out["sandbox_create_per_s"] = round(pods / dt, 1)
        rss = [_rss_kib(sb.holder_pid) for sb in sbs]
        out["holder_rss_kib_mean"] = round(statistics.mean(rss))
        out["holder_rss_kib_max"] = max(rss)

        if image:
            argv = image_argv(image)

            def start(sb: Sandbox) -> None:
                sb.start_container("main", argv)
                sb.wait_listening(8080, timeout=60)

            t0 = time.perf_counter()
            list(pool.map(start, sbs))
            dt = time.perf_counter() - t0
            out["container_start_s"] = round(dt, 3)
            out["container_start_per_s"] = round(pods / dt, 1)
            crss = [_rss_kib(sb.container_pid("main") or 0) for sb in sbs]
            out["container_rss_kib_mean"] = round(statistics.mean(crss))

        t0 = time.perf_counter()
        destroy_many(sbs)
        out["teardown_s"] = round(time.perf_counter() - t0, 3)

        if image:  # the agent's pipeline: sandbox, then container, then wait for it to listen

            def pipeline(i: int) -> Sandbox:
                sb = Sandbox.create(lab, 1 + i % nodes, "bench", f"q{i}")
                sb.start_container("main", argv)
                sb.wait_listening(8080, timeout=60)
                return sb

            t0 = time.perf_counter()
            sbs = list(pool.map(pipeline, range(pods)))
            dt = time.perf_counter() - t0
            out["pipeline_per_s"] = round(pods / dt, 1)
            t0 = time.perf_counter()
            destroy_many(sbs)
            out["pipeline_teardown_s"] = round(time.perf_counter() - t0, 3)
        # bulk: what lab.add_pods does, all of a node's sandboxes in one holder exec
        t0 = time.perf_counter()
        per_node = [[("bench", f"r{i}") for i in range(pods) if i % nodes == k] for k in range(nodes)]
        sbs = [sb for batch in pool.map(lambda k: Sandbox.create_many(lab, k + 1, per_node[k]), range(nodes))
               for sb in batch]  # fmt: skip
        dt = time.perf_counter() - t0
        out["bulk_sandbox_create_per_s"] = round(pods / dt, 1)
        t0 = time.perf_counter()
        destroy_many(sbs)
        out["bulk_teardown_s"] = round(time.perf_counter() - t0, 3)
        pool.shutdown()
    finally:
        t0 = time.perf_counter()
        lab.destroy()
        out["lab_destroy_s"] = round(time.perf_counter() - t0, 3)
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--pods", type=int, default=200)
    ap.add_argument("--nodes", type=int, default=2)
    ap.add_argument("--workers", type=int, default=4)
    ap.add_argument("--image", default="kpx/echo", help="kpx/echo, kpx/http or 'none' (sandboxes only)")
    ap.add_argument("--json", help="also write the figures to this file")
    a = ap.parse_args(argv)
    res = run(a.pods, a.nodes, a.workers, None if a.image == "none" else a.image)
    for k, v in res.items():
        print(f"{k:24} {v}")
    if a.json:
        Path(a.json).write_text(json.dumps(res, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
