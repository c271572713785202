"""`kpx proxy`: one kube-proxy in the foreground, with kube-proxy's flag names."""

from __future__ import annotations

import argparse


def register(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    from proxy.config import add_flags

    p = sub.add_parser(
        "proxy",
        help="run kube-proxy (one mode) for this node in the foreground",
        description="Run kube-proxy for one node: list+watch Services, EndpointSlices and this Node, and program "
        "the kernel of the current network namespace in the chosen mode. Flags take kube-proxy's names; "
        "--config takes a KubeProxyConfiguration (v1alpha1) file, and flags given explicitly override it.",
    )
    add_flags(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import asyncio
    import signal
    import sys

    from kpx import log as kpxlog
    from proxy.config import resolve
    from proxy.server import ProxyServer, cleanup_all, node_name_of

    opts = resolve(args)
    if args.write_config_to:
        import yaml

        from kpx.errors import UserError
        from proxy.config import to_config_doc

        try:
            with open(args.write_config_to, "w") as f:
                yaml.safe_dump(to_config_doc(opts), f, sort_keys=False)
        except OSError as e:
            raise UserError(f"--write-config-to {args.write_config_to}: {e.strerror or e}") from None
        return 0
    level = "debug" if opts.verbosity >= 4 else "info"
    kpxlog.setup("proxy", level, node=node_name_of(opts), mode=opts.mode)
    if opts.cleanup:
        problems = cleanup_all(opts)
        if problems:
            sys.stderr.write("kpx proxy --cleanup: " + "; ".join(problems) + "\n")
            return 1
        return 0

    async def main() -> int:
        server = ProxyServer(opts)
        loop = asyncio.get_running_loop()
        stop = asyncio.Event()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        await server.start()
        try:
            await stop.wait()
        finally:
            await server.stop()
        return 0

    try:
        import uvloop

        return uvloop.run(main())
    except ImportError:
        return asyncio.run(main())
