"""Micro-benchmark: per-write cost of the apiserver's object semantics (no HTTP, no storage).

    .venv/bin/python -m bench.semantics_bench [--n 300]

For a Service, a Pod and a 100-endpoint EndpointSlice: create pipeline (field validation +
defaults + validation + managedFields), an update's managedFields bookkeeping, a kubectl-style
strategic merge patch, and a server-side apply over an existing object.
Figures are CPU time per operation (time.process_time), so a busy shared machine does not inflate them.
"""

from __future__ import annotations

import argparse
import copy
import time
from collections.abc import Callable
from typing import Any

from controlplane.defaults import apply_defaults
from controlplane.fieldvalidation import check
from controlplane.patch import server_side_apply, strategic_merge_patch
from controlplane.ssa import record_update
from controlplane.validation import validate_create

SVC: dict[str, Any] = {"apiVersion": "v1", "kind": "Service", "metadata": {"name": "x", "namespace": "default", "labels": {"app": "x"}},
       "spec": {"selector": {"app": "x"}, "ports": [{"name": "http", "port": 80, "targetPort": 8080},
                                                    {"name": "https", "port": 443, "targetPort": 8443}]}}
POD: dict[str, Any] = {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "p", "namespace": "default", "labels": {"app": "x"}},
       "spec": {"containers": [{"name": "c", "image": "kpx/echo", "ports": [{"containerPort": 8080}],
                                "readinessProbe": {"tcpSocket": {"port": 8080}}}]}}
ES: dict[str, Any] = {"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
      "metadata": {"name": "x-1", "namespace": "default", "labels": {"kubernetes.io/service-name": "x"}},
      "addressType": "IPv4",
      "endpoints": [{"addresses": [f"10.244.{i // 250}.{i % 250 + 1}"], "conditions": {"ready": True}, "nodeName": "n1",
                     "targetRef": {"kind": "Pod", "namespace": "default", "name": f"p{i}", "uid": "u"}} for i in range(100)],
      "ports": [{"name": "http", "port": 8080, "protocol": "TCP"}]}


def _us(n: int, prep: Callable[[], Any], fn: Callable[[Any], Any]) -> float:
    items = [prep() for _ in range(n)]
    t0 = time.process_time()
    for it in items:
        fn(it)
    return (time.process_time() - t0) / n * 1e6


def _row(obj: dict[str, Any], n: int) -> tuple[float, float, float, float]:
    kind = obj["kind"]

    def create(o: Any) -> None:
        check(kind, o)
        apply_defaults(kind, o)
        validate_create(kind, o)
        record_update(None, o, "bench")

    c = _us(n, lambda: copy.deepcopy(obj), create)
    stored = copy.deepcopy(obj)
    create(stored)

    def changed() -> Any:
        new = copy.deepcopy(stored)
        new["metadata"]["labels"]["v"] = "2"
        return new

    def smp(_: Any) -> None:
        strategic_merge_patch(stored, {"metadata": {"labels": {"v": "3", "app": None}}}, kind)

    def ssa(_: Any) -> None:
        server_side_apply(stored, obj, kind, manager="applier", force=True)

    u = _us(n, changed, lambda new: record_update(stored, new, "other"))
    return c, u, _us(n, lambda: None, smp), _us(n, lambda: None, ssa)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    ap.add_argument("--n", type=int, default=300)
    n = ap.parse_args(argv).n
    for name, obj in (("Service", SVC), ("Pod", POD), ("EndpointSlice(100)", ES)):
        c, u, smp, ssa = _row(obj, n)
        print(f"{name:20s} create {c:7.0f} us   update-managedFields {u:6.0f} us   SMP {smp:6.0f} us   SSA {ssa:7.0f} us")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
