"""The one `kpx` entry point. Each component registers its own sub-commands; this file only
dispatches, so that `kpx down` does not pay for importing the apiserver.

Component modules expose `register(subparsers)`; every parser they add sets `func`, a callable
taking the parsed namespace and returning an exit code.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

from kpx.errors import UserError

# Modules that contribute sub-commands, in the order `kpx --help` lists them.
COMPONENT_CLIS = (
    "netns.cli",  # up, down, status, exec, node
    "controlplane.cli",  # apiserver
    "proxy.cli",  # proxy
    "proxy.trace_cli",  # trace
    "bench.cli",  # bench
    "kpx.vm",  # vm
)


class OneLineParser(argparse.ArgumentParser):
    """argparse, but a usage mistake is one line plus a pointer to --help, and exit code 2."""

    def error(self, message: str) -> None:  # type: ignore[override]
        sys.stderr.write(f"{self.prog}: error: {message} (see '{self.prog} --help')\n")
        sys.exit(2)


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(prog="kpx", description="kube-proxy modes on a netns lab")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=OneLineParser)
    sub.required = True
    for modname in COMPONENT_CLIS:
        try:
            mod = importlib.import_module(modname)
        except ModuleNotFoundError as e:
            if e.name != modname:
                raise
            continue
        mod.register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        rc = args.func(args)
    except UserError as e:
        sys.stderr.write(f"kpx {args.command}: {e}\n")
        return e.exit_code
    except KeyboardInterrupt:
        sys.stderr.write(f"kpx {args.command}: interrupted\n")
        return 130
    return int(rc or 0)


if __name__ == "__main__":
    sys.exit(main())
