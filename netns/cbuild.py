"""Build the lab's two small C programs (sandbox holder, echo/http image) on first use.

`make setup` builds them too; building here as well means a fresh checkout, a CI runner or a
changed source never runs a stale binary. Static linking keeps their RSS minimal (no shared
libc pages mapped); it falls back to dynamic if libc.a is missing.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

from netns.ns import NsError

NETNS_DIR = Path(__file__).resolve().parent
PROGRAMS = {
    "kpx-holder": NETNS_DIR / "holder" / "holder.c",
    "kpx-echo": NETNS_DIR / "images" / "kpx-echo.c",
}


def binary(name: str) -> str:
    """Path of program `name`, (re)compiled next to its source when missing or out of date."""
    src = PROGRAMS[name]
    out = src.with_name(name)
    if out.exists() and out.stat().st_mtime >= src.stat().st_mtime:
        return str(out)
    tmp = out.with_name(f".{name}.{os.getpid()}")
    err = ""
    for flags in (["-static"], []):
        p = subprocess.run(
            ["gcc", "-O2", "-Wall", *flags, "-o", str(tmp), str(src)], capture_output=True, text=True
        )
        if p.returncode == 0:
            os.replace(tmp, out)  # atomic: a concurrent builder never sees half a binary
            return str(out)
        err = p.stderr.strip()
    raise NsError(f"building {out} failed (is gcc installed? run 'make setup'): {err[-300:]}")


def build_all() -> None:
    for name in PROGRAMS:
        binary(name)


if __name__ == "__main__":
    build_all()
