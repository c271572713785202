"""`kpx apiserver`: run the Kubernetes-compatible apiserver in the foreground (flag names as kube-apiserver)."""

from __future__ import annotations

import argparse
import ipaddress
from pathlib import Path
from typing import Any

from kpx.errors import UserError


def register(sub: Any) -> None:
    p = sub.add_parser(
        "apiserver",
        help="run the apiserver in the foreground",
        description="Serve the Kubernetes API (Namespaces, Nodes, Pods, Services, EndpointSlices, Events) over "
        "HTTPS with list+watch, backed by SQLite (default) or etcd. Writes DATA_DIR/kubeconfig on start.",
    )
    p.add_argument("--data-dir", required=True, help="state directory: database, CA and certs, tokens, kubeconfig")
    p.add_argument("--storage", choices=("sqlite", "etcd"), default="sqlite", help="storage backend (default sqlite)")
    p.add_argument("--etcd-servers", default="http://127.0.0.1:2379",
                   help="comma-separated etcd client URLs (with --storage etcd)")
    p.add_argument("--bind-address", default="127.0.0.1",
                   help="comma-separated addresses to listen on (e.g. 127.0.0.1,192.168.56.1)")
    p.add_argument("--secure-port", type=int, default=6443, help="HTTPS port (default 6443)")
    p.add_argument("--advertise-address", default="",
                   help="address published in the kubernetes Service's EndpointSlice (default: the lab host link)")
    p.add_argument("--host-link-address", default="192.168.56.1",
                   help="the lab host-link address put in the serving certificate (default 192.168.56.1)")
    p.add_argument("--service-cluster-ip-range", default="10.96.0.0/12", help="Service ClusterIP CIDR")
    p.add_argument("--service-node-port-range", default="30000-32767", help="NodePort range BASE-MAX")
    p.add_argument("--cluster-cidr", default="10.244.0.0/16", help="pod network CIDR(s), comma-separated")
    p.add_argument("--controllers", default="*",
                   help="in-process controllers to run: '*' (all), '' (none) or a comma list")
    p.add_argument("--watch-cache-history", type=int, default=1000,
                   help="revisions of events kept for watch-from-RV (older -> 410 Expired)")
    p.add_argument("--watch-cache-history-seconds", type=float, default=300.0, help=argparse.SUPPRESS)
    p.add_argument("--etcd-compaction-interval", type=float, default=60.0,
                   help="seconds between store compaction checks")
    p.add_argument("--compaction-retain-revisions", type=int, default=1000, help=argparse.SUPPRESS)
    p.add_argument("--compaction-retain-seconds", type=float, default=300.0, help=argparse.SUPPRESS)
    p.add_argument("--bookmark-interval", type=float, default=60.0, help=argparse.SUPPRESS)
    p.add_argument("--log-level", default="info", choices=("debug", "info", "warning", "error"))
    p.set_defaults(func=run)


def _config(args: argparse.Namespace) -> Any:
    from controlplane.server import ServerConfig

    if not 1 <= args.secure_port <= 65535:
        raise UserError(f"--secure-port {args.secure_port}: must be 1-65535")
    binds = tuple(a.strip() for a in args.bind_address.split(",") if a.strip())
    if not binds:
        raise UserError("--bind-address: give at least one address, e.g. 127.0.0.1")
    for a in binds + ((args.advertise_address,) if args.advertise_address else ()) + (args.host_link_address,):
        try:
            ipaddress.ip_address(a)
        except ValueError:
            raise UserError(f"{a!r} is not an IP address (--bind-address / --advertise-address)") from None
    try:
        net = ipaddress.ip_network(args.service_cluster_ip_range, strict=True)
    except ValueError as e:
        raise UserError(f"--service-cluster-ip-range {args.service_cluster_ip_range!r}: {e}") from None
    if net.version == 4 and net.prefixlen > 30:
        raise UserError(f"--service-cluster-ip-range {net}: too small, use at most a /30")
    lo, _, hi = args.service_node_port_range.partition("-")
    try:
        lo_i, hi_i = int(lo), int(hi or lo)
        if not 0 < lo_i <= hi_i <= 65535:
            raise ValueError
    except ValueError:
        raise UserError(
            f"--service-node-port-range {args.service_node_port_range!r}: want BASE-MAX, e.g. 30000-32767"
        ) from None
    for c in args.cluster_cidr.split(","):
        try:
            ipaddress.ip_network(c.strip(), strict=False)
        except ValueError as e:
            raise UserError(f"--cluster-cidr {c!r}: {e}") from None
    if args.watch_cache_history < 1:
        raise UserError("--watch-cache-history must be >= 1")
    data_dir = Path(args.data_dir).absolute()
    try:
        data_dir.mkdir(parents=True, exist_ok=True)
        probe = data_dir / ".kpx-write-test"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as e:
        raise UserError(f"--data-dir {data_dir}: not usable ({e.strerror or e}); pick a writable directory") from None
    if args.storage == "etcd":
        for u in args.etcd_servers.split(","):
            if not u.strip().startswith(("http://", "https://")):
                raise UserError(f"--etcd-servers {u!r}: want URLs like http://127.0.0.1:2379")
    controllers: tuple[str, ...] | None
    if args.controllers.strip() == "*":
        controllers = None
    else:
        controllers = tuple(x.strip() for x in args.controllers.split(",") if x.strip())
    return ServerConfig(
        data_dir=data_dir,
        storage=args.storage,
        etcd_servers=args.etcd_servers,
        bind_addresses=binds,
        secure_port=args.secure_port,
        advertise_address=args.advertise_address,
        host_link_address=args.host_link_address,
        service_cluster_ip_range=str(net),
        service_node_port_range=f"{lo_i}-{hi_i}",
        cluster_cidr=args.cluster_cidr,
        controllers=controllers,
        watch_cache_history=args.watch_cache_history,
        watch_cache_history_seconds=args.watch_cache_history_seconds,
        compaction_interval=args.etcd_compaction_interval,
        compaction_retain_revisions=args.compaction_retain_revisions,
        compaction_retain_seconds=args.compaction_retain_seconds,
        bookmark_interval=args.bookmark_interval,
    )


def run(args: argparse.Namespace) -> int:
    import asyncio
    import errno

    import uvloop

    from controlplane.server import serve
    from kpx import log as kpxlog

    config = _config(args)
    kpxlog.setup("apiserver", args.log_level)

    def ready(server: Any) -> None:
        print(f"kpx apiserver: serving https://{config.bind_addresses[0]}:{config.secure_port} "
              f"(kubeconfig {config.data_dir / 'kubeconfig'})", flush=True)

    try:
        uvloop.run(serve(config, on_ready=ready))
    except OSError as e:
        if e.errno == errno.EADDRINUSE:
            raise UserError(f"port {config.secure_port} is already in use on {','.join(config.bind_addresses)}; "
                            "stop the other server or pass --secure-port") from None
        if e.errno == errno.EADDRNOTAVAIL:
            raise UserError(f"cannot listen on {','.join(config.bind_addresses)}: address not on this host "
                            "(--bind-address)") from None
        raise UserError(f"apiserver failed to start: {e}") from None
    except asyncio.CancelledError:
        pass
    except Exception as e:
        from controlplane.store.base import StoreError

        if isinstance(e, StoreError | ConnectionError):
            raise UserError(f"storage {config.storage} unusable: {e}") from None
        raise
    return 0
