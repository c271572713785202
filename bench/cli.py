"""`kpx bench`: rule scaling with many Services, every proxy mode, control and data plane."""

from __future__ import annotations

import argparse


def register(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = sub.add_parser(
        "bench",
        help="measure every proxy mode with 1..30k Services: sync times, first-packet latency, report",
        description="Build a lab, create Services and EndpointSlices through the apiserver, and measure each "
        "proxy mode: full sync, one endpoint change, one Service added, rules, CPU and RSS of the proxy; "
        "first-packet connection latency (p01..p99), connections/s and throughput from a client pod, "
        "against the Service and the backend pod directly. Writes results.json, PNG plots and report.md.",
    )
    p.add_argument("--out", default="bench/results", help="output directory (default: %(default)s)")
    p.add_argument("--modes", default="userspace,iptables-legacy,iptables-nft,nftables,ipvs",
                   help="comma-separated: userspace, iptables (both backends), iptables-legacy, iptables-nft, "
                   "nftables, ipvs (default: all; modes this build or kernel lacks are reported as skipped)")
    p.add_argument("--services", default=None,
                   help="Service counts, e.g. 1,1000,5000 (default 1,1000,5000; --scale adds 10000,30000)")
    p.add_argument("--scale", action="store_true", help="the large sizes too: 1,1000,5000,10000,30000")
    p.add_argument("--endpoints", type=int, default=None, help="endpoints per Service (default 10; --quick 3)")
    p.add_argument("--repeats", type=int, default=5, help="repeats of every measurement (default: %(default)s)")
    p.add_argument("--samples", type=int, default=2000,
                   help="new connections per latency repeat (default: %(default)s; --quick at most 500)")
    p.add_argument("--quick", action="store_true", help="small counts (1 and 100 Services x 3 endpoints, 2 repeats), for CI")
    p.add_argument("--lab", default="bench", help="lab name to build (default: %(default)s)")
    p.add_argument("--reuse", action="store_true", help="run on the existing lab --lab (built with --proxy-mode none)")
    p.add_argument("--verbose", action="store_true", help="print each step on stderr when not on a terminal")
    p.add_argument("--vm", action="store_true",
                   help="also run ipvs (and iptables-legacy as its reference) inside the qemu VM (kpx vm), whose "
                   "kernel has IPVS; those cells are marked as measured under emulation")
    p.add_argument("--in-vm", action="store_true", help=argparse.SUPPRESS)  # set by the VM harness run
    p.add_argument("--secs", type=float, default=2.0, help="seconds per conn/s and throughput repeat (default: 2)")
    p.add_argument("--full-sync-budget", type=float, default=60.0,
                   help="seconds of repeated full syncs per cell after the first (default: %(default)s)")
    p.add_argument("--sync-timeout", type=float, default=600.0, help=argparse.SUPPRESS)
    p.set_defaults(func=_run)

    r = sub.add_parser("bench-report", help="re-render report.md and plots from a results.json")
    r.add_argument("--out", default="bench/results", help="directory holding results.json (default: %(default)s)")
    r.set_defaults(func=_report)


def _run(args: argparse.Namespace) -> int:
    from bench.run import run

    return run(args)


def _report(args: argparse.Namespace) -> int:
    from pathlib import Path

    from bench import report
    from kpx.errors import UserError

    if not (Path(args.out) / "results.json").exists():
        raise UserError(f"--out {args.out}: no results.json there (run 'kpx bench --out {args.out}' first)")
    report.write(Path(args.out))
    print(f"kpx bench-report: {args.out}/report.md")
    return 0
