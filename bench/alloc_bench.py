"""Micro-benchmark: ClusterIP / NodePort allocation cost with many values already allocated.

    .venv/bin/python -m bench.alloc_bench [--allocated 30000] [--ops 5000]

Prints µs per allocate_next+release with N already taken, for a nearly empty and a loaded range,
and for the NodePort range when nearly full (the worst case for a scanning allocator).
Figures are CPU time per operation (time.process_time), so a busy shared machine does not inflate them.
"""

from __future__ import annotations

import argparse
import random
import time

from controlplane.alloc import ClusterIPAllocator, NodePortAllocator


def _per_op(alloc: ClusterIPAllocator | NodePortAllocator, ops: int) -> float:
    t0 = time.process_time()
    for _ in range(ops):
        v = alloc.allocate_next()
        alloc.release(v)  # type: ignore[arg-type]
    return (time.process_time() - t0) / ops * 1e6


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    ap.add_argument("--allocated", type=int, default=30000)
    ap.add_argument("--ops", type=int, default=5000)
    a = ap.parse_args(argv)
    rng = random.Random(1)

    ips = ClusterIPAllocator("10.96.0.0/12", rng=rng)
    empty = _per_op(ips, a.ops)
    t0 = time.process_time()
    for _ in range(a.allocated):
        ips.allocate_next()
    fill = (time.process_time() - t0) / a.allocated * 1e6
    loaded = _per_op(ips, a.ops)
    print(f"clusterIP 10.96.0.0/12: next+release {empty:.1f} us empty, {loaded:.1f} us with {a.allocated} allocated;"
          f" filling {a.allocated} took {fill:.1f} us each")

    small = ClusterIPAllocator("10.96.0.0/16", rng=rng)
    for _ in range(small.free - 2):  # the first address is kept for the kubernetes Service
        small.allocate_next()
    print(f"clusterIP 10.96.0.0/16 with 1 free of {small.bitmap.size}: next+release {_per_op(small, a.ops):.1f} us")

    ports = NodePortAllocator("30000-32767", rng=rng)
    for _ in range(ports.free - 1):
        ports.allocate_next()
    print(f"nodePort 30000-32767 with 1 free: next+release {_per_op(ports, a.ops):.1f} us")

    big = NodePortAllocator("1-65535", rng=rng)
    for _ in range(min(a.allocated, big.free - 1)):
        big.allocate_next()
    print(f"nodePort 1-65535 with {big.used} allocated: next+release {_per_op(big, a.ops):.1f} us")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
