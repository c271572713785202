"""What `kpx bench` measures: the cells (mode x backend x Services), which of them this build and
kernel can run (the others are reported as skipped, with the reason), the checks made before any
work starts, and the percentile summary every record uses. Pure logic: unit-tested."""

from __future__ import annotations

import importlib
import math
import os
import statistics
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from kpx.errors import UserError

ALL_MODES = ("userspace", "iptables-legacy", "iptables-nft", "nftables", "ipvs")
DEFAULT_SIZES = (1, 1000, 5000)
SCALE_SIZES = (1, 1000, 5000, 10000, 30000)
QUICK_SIZES = (1, 100)
MAX_SERVICES = 60000  # the ClusterIP range and the apiserver's SQLite hold more; RAM does not
# measured here: ~20 KiB per Service with 10 endpoints across apiserver + proxy + kernel rules
BYTES_PER_SERVICE = 64 * 1024


@dataclass(frozen=True, slots=True)
class Cell:
    """One proxy configuration: `mode` as results.json names it, `backend` for iptables."""

    key: str  # e.g. "iptables-nft"
    mode: str  # userspace|iptables|nftables|ipvs
    backend: str  # legacy|nft|"" (where it does not apply)

    @property
    def proxy_args(self) -> list[str]:
        args = ["--proxy-mode", self.mode]
        if self.backend:
            args += ["--iptables-backend", self.backend]
        return args


def cell(key: str) -> Cell:
    if key not in ALL_MODES:
        raise UserError(f"--modes: unknown mode {key!r}; choose from {', '.join(ALL_MODES)}")
    mode, _, backend = key.partition("-")
    if mode == "ipvs":
        backend = ""  # ipvs uses iptables too, with the auto backend
    return Cell(key, mode, backend)


def parse_modes(text: str) -> list[Cell]:
    keys = [k.strip() for k in text.split(",") if k.strip()]
    if "iptables" in keys:  # both backends
        i = keys.index("iptables")
        keys[i:i + 1] = ["iptables-legacy", "iptables-nft"]
    if not keys:
        raise UserError("--modes: give at least one mode")
    return [cell(k) for k in dict.fromkeys(keys)]


def parse_sizes(text: str, endpoints: int) -> list[int]:
    try:
        sizes = sorted({int(x) for x in text.split(",") if x.strip()})
    except ValueError:
        raise UserError(f"--services {text!r}: a comma-separated list of counts, e.g. 1,1000,5000") from None
    if not sizes or sizes[0] < 1:
        raise UserError(f"--services {text!r}: counts must be >= 1")
    check_capacity(sizes[-1], endpoints)
    return sizes


def mem_available() -> int:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 1 << 62


def check_capacity(services: int, endpoints: int, available: int | None = None) -> None:
    """Counts this machine cannot hold fail here, before the lab is built."""
    if not 1 <= endpoints <= 1000:
        raise UserError(f"--endpoints {endpoints}: must be 1-1000 (one EndpointSlice holds at most 1000)")
    if services > MAX_SERVICES:
        raise UserError(f"--services {services}: more than kpx bench supports ({MAX_SERVICES}); use fewer")
    need = services * BYTES_PER_SERVICE * max(1, endpoints) // 10
    avail = mem_available() if available is None else available
    if need > avail:
        raise UserError(f"--services {services} x {endpoints} endpoints needs ~{need >> 20} MiB, "
                        f"this machine has {avail >> 20} MiB available: use fewer Services")


def unavailable_reason(c: Cell, in_vm: bool) -> str | None:
    """Why this build/kernel cannot run the cell (None: it can)."""
    from proxy.modes import MODES
    from proxy.modes.base import ModeUnavailable

    modpath = MODES.get(c.mode)
    if modpath is None:
        return f"this build has no {c.mode} mode (proxy.modes.MODES)"
    try:
        mod = importlib.import_module(modpath)
    except ImportError as e:
        return f"this build cannot load {modpath}: {e}"
    cls = getattr(mod, "MODE", None)
    if cls is None:
        return f"{modpath} exports no MODE"
    if c.mode == "ipvs" and not in_vm:
        try:
            cls.check_kernel()
        except ModeUnavailable:
            return "this kernel has no IPVS: add --vm to measure it in the qemu VM (figures under emulation)"
    else:
        try:
            cls.check_kernel()
        except ModeUnavailable as e:
            return str(e).splitlines()[0]
    if c.backend:
        from shutil import which

        if not which(f"iptables-{c.backend}-restore"):
            return f"iptables-{c.backend}-restore is not installed"
    return None


def check_fds(services: int) -> None:
    """The userspace mode holds one listening socket per Service port."""
    import resource

    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    if services + 200 > soft:
        raise UserError(f"--services {services}: the userspace mode needs one socket per Service and the open-file "
                        f"limit is {soft}: use fewer Services or leave userspace out of --modes")


def summary(samples: Sequence[float]) -> dict[str, Any]:
    """n, p01/p50/p90/p99 (nearest-rank on sorted samples), mean and stdev."""
    xs = sorted(samples)
    n = len(xs)
    if n == 0:
        return {"n": 0}

    def pct(p: float) -> float:
        return xs[min(n - 1, max(0, math.ceil(p / 100 * n) - 1))]

    return {"n": n, "p01": pct(1), "p50": pct(50), "p90": pct(90), "p99": pct(99),
            "mean": statistics.fmean(xs), "stdev": statistics.stdev(xs) if n > 1 else 0.0,
            "min": xs[0], "max": xs[-1]}


def repeats_summary(values: Sequence[float]) -> dict[str, Any]:
    """A repeated single figure: its median as `value`, the spread as min/max and p-values."""
    s = summary(values)
    if s["n"]:
        s["value"] = statistics.median(values)
    return s


def cpus() -> int:
    return os.cpu_count() or 1
