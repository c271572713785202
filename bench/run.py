"""`kpx bench`: the whole pipeline. Checks first (before any work), then one lab; per Service count:
fillers through the apiserver, the measured Service re-created last, then per cell a fresh proxy on
the client's node (control-plane figures) and the client pod's traffic (data-plane figures).
Results are written after every cell, so an interrupted run still leaves what it measured.
"""

from __future__ import annotations

import json
import os
import platform
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench import control, data
from bench.lab import ECHO_PORT, IPERF_PORT, BenchLab
from bench.matrix import (
    DEFAULT_SIZES,
    QUICK_SIZES,
    SCALE_SIZES,
    Cell,
    check_fds,
    parse_modes,
    parse_sizes,
    repeats_summary,
    summary,
    unavailable_reason,
)
from kpx.errors import UserError


@dataclass
class Settings:
    cells: list[Cell]
    sizes: list[int]
    endpoints: int
    repeats: int
    samples: int  # connections per latency repeat
    secs: float  # per conn-rate / throughput repeat
    out: Path
    lab: str
    reuse: bool
    in_vm: bool
    quick: bool
    full_sync_budget: float  # seconds of repeated full syncs per cell, after the first
    sync_timeout: float


def settings(a: Any) -> Settings:
    """argparse namespace -> Settings, every mistake a UserError before any work starts."""
    sizes_text = a.services or ",".join(map(str, QUICK_SIZES if a.quick else SCALE_SIZES if a.scale else DEFAULT_SIZES))
    endpoints = a.endpoints if a.endpoints is not None else (3 if a.quick else 10)
    if a.repeats < 1:
        raise UserError(f"--repeats {a.repeats}: must be >= 1")
    if a.samples < 10:
        raise UserError(f"--samples {a.samples}: must be >= 10")
    return Settings(
        cells=parse_modes(a.modes), sizes=parse_sizes(sizes_text, endpoints), endpoints=endpoints,
        repeats=min(a.repeats, 2) if a.quick else a.repeats, samples=a.samples if not a.quick else min(a.samples, 300),
        secs=0.5 if a.quick else a.secs, out=Path(a.out), lab=a.lab, reuse=a.reuse, in_vm=a.in_vm, quick=a.quick,
        full_sync_budget=0.0 if a.quick else a.full_sync_budget, sync_timeout=a.sync_timeout,
    )


def preflight(s: Settings) -> dict[str, str]:
    """Everything that can be wrong, checked before the lab is built. Returns skipped cells."""
    if os.geteuid() != 0:
        raise UserError("kpx bench needs root (it builds a lab of network namespaces): run it with sudo")
    for tool in ("iperf3", "gcc", "nsenter"):
        if not shutil.which(tool):
            raise UserError(f"kpx bench needs {tool}: 'make setup' installs it")
    skipped = {c.key: r for c in s.cells if (r := unavailable_reason(c, s.in_vm))}
    if any(c.key == "ipvs" for c in s.cells) and "ipvs" in skipped and [c.key for c in s.cells] == ["ipvs"]:
        raise UserError(f"--modes ipvs: {skipped['ipvs']}")
    if any(c.mode == "userspace" and c.key not in skipped for c in s.cells):
        check_fds(s.sizes[-1])
    if not s.reuse:
        BenchLab.check_free(s.lab)
    try:
        s.out.mkdir(parents=True, exist_ok=True)
        (s.out / ".write-test").touch()
        (s.out / ".write-test").unlink()
    except OSError as e:
        raise UserError(f"--out {s.out}: cannot write there ({e.strerror or e})") from None
    data.connlat()  # compile the helper now: a missing compiler fails before the lab
    return skipped


def _version(argv: list[str]) -> str:
    try:
        p = subprocess.run(argv, capture_output=True, text=True, timeout=10)
        return (p.stdout or p.stderr).strip().splitlines()[0]
    except (OSError, IndexError, subprocess.TimeoutExpired):
        return "not installed"


def machine(s: Settings) -> dict[str, Any]:
    cpu = next((ln.split(":", 1)[1].strip() for ln in Path("/proc/cpuinfo").read_text().splitlines() if ln.startswith("model name")), "?")
    mem = next((int(ln.split()[1]) * 1024 for ln in Path("/proc/meminfo").read_text().splitlines() if ln.startswith("MemTotal")), 0)
    commit = subprocess.run(["git", "-C", str(Path(__file__).parent), "rev-parse", "--short", "HEAD"],
                            capture_output=True, text=True).stdout.strip()
    from proxy.config import ProxyOptions

    o = ProxyOptions()
    return {
        "cpu": cpu, "cpus": os.cpu_count(), "mem_bytes": mem, "kernel": platform.release(),
        "python": platform.python_version(), "loadavg_start": list(os.getloadavg()),
        "iptables_legacy": _version(["iptables-legacy", "--version"]),
        "iptables_nft": _version(["iptables-nft", "--version"]), "nft": _version(["nft", "--version"]),
        "ipvsadm": _version(["ipvsadm", "--version"]), "iperf3": _version(["iperf3", "--version"]),
        "kpx_commit": commit, "in_vm": s.in_vm, "emulated": s.in_vm,
        "proxy_settings": {"min_sync_period_s": o.min_sync_period, "sync_period_s": o.sync_period,
                           "masquerade_bit": o.masquerade_bit, "ipvs_scheduler": o.ipvs_scheduler,
                           "proxies": "one kpx proxy, on the client's node", "conntrack_cleanup": True},
        "bench_settings": {"sizes": s.sizes, "endpoints": s.endpoints, "repeats": s.repeats,
                           "samples_per_repeat": s.samples, "seconds_per_rate_repeat": s.secs, "quick": s.quick,
                           "modes": [c.key for c in s.cells]},
    }


class Progress:
    """rich progress bar on a TTY; one line per step on stderr otherwise only with --verbose."""

    def __init__(self, total: int, verbose: bool) -> None:
        self.verbose = verbose
        self._p: Any = None
        if sys.stderr.isatty():
            from rich.console import Console
            from rich.progress import BarColumn, TextColumn, TimeElapsedColumn
            from rich.progress import Progress as RichProgress

            self._p = RichProgress(TextColumn("{task.description}"), BarColumn(), TextColumn("{task.completed}/"
                                   "{task.total} cells"), TimeElapsedColumn(), console=Console(stderr=True))
            self._task = self._p.add_task("kpx bench", total=total)

    @contextmanager
    def shown(self) -> Iterator[Progress]:
        if self._p is None:
            yield self
            return
        with self._p:
            yield self

    def step(self, msg: str) -> None:
        if self._p is not None:
            self._p.update(self._task, description=msg)
        elif self.verbose:
            sys.stderr.write(f"kpx bench: {msg}\n")

    def advance(self) -> None:
        if self._p is not None:
            self._p.advance(self._task)


@dataclass
class Results:
    machine: dict[str, Any]
    records: list[dict[str, Any]] = field(default_factory=list)
    skipped: list[dict[str, Any]] = field(default_factory=list)

    def add(self, c: Cell | None, services: int, endpoints: int, metric: str, summ: dict[str, Any],
            mode: str | None = None, **extra: Any) -> None:
        rec: dict[str, Any] = {"mode": mode or (c.mode if c else ""), "backend": c.backend if c else "",
                               "cell": c.key if c else "", "services": services, "endpoints": endpoints,
                               "metric": metric, **summ, **extra}
        if self.machine.get("emulated"):
            rec["emulated"] = True
        self.records.append(rec)

    def save(self, out: Path) -> None:
        doc = {"machine": self.machine, "records": self.records, "skipped": self.skipped}
        tmp = out / ".results.json.tmp"
        tmp.write_text(json.dumps(doc, indent=1) + "\n")
        tmp.replace(out / "results.json")


def measure_cell(s: Settings, bl: BenchLab, c: Cell, n: int, res: Results, prog: Progress) -> None:
    e = s.endpoints
    control.cleanup(bl, c)
    prog.step(f"{c.key} x {n} Services: full sync")
    fulls: list[float] = []
    starts: list[float] = []
    spent = 0.0
    while True:
        px, startup = control.start_proxy(bl, c, s.sync_timeout)
        m = px.metrics()
        fulls.append(m.get("kubeproxy_sync_full_proxy_rules_duration_seconds_sum", 0.0))
        starts.append(startup)
        spent += startup
        if len(fulls) >= s.repeats or spent > s.full_sync_budget:
            break
        bl.stop(px.proc)
        control.cleanup(bl, c)
    try:
        res.add(c, n, e, "full_sync_s", repeats_summary(fulls),
                note="proxy's own sync_full_proxy_rules_duration_seconds, fresh node, every Service present")
        res.add(c, n, e, "start_to_programmed_s", repeats_summary(starts),
                note="proxy start (list+watch, then the full sync) to rules in the kernel, wall clock")
        if not control.target_programmed(bl, c):
            raise UserError(f"the measured Service {bl.target_ip} is not in the {c.key} rules")
        prog.step(f"{c.key} x {n} Services: endpoint change, add Service")
        res.add(c, n, e, "endpoint_change_s",
                repeats_summary(control.endpoint_changes(bl, px, s.repeats, e, s.sync_timeout)),
                note="kubeproxy_network_programming_duration_seconds: EndpointSlice trigger time -> kernel")
        res.add(c, n, e, "add_service_s",
                repeats_summary(control.add_services(bl, px, s.repeats, e, s.sync_timeout)),
                note="network programming latency of a new Service + EndpointSlice")
        rules, nbytes, details = control.rule_count(bl, c)
        res.add(c, n, e, "rules", {"value": rules, "n": 1}, details=details)
        res.add(c, n, e, "ruleset_bytes", {"value": nbytes, "n": 1}, note="kernel dump size, about a full sync's payload")
        prog.step(f"{c.key} x {n} Services: data plane")
        ns = bl.client_netns
        direct_ip = bl.backend_ips[0]
        for target, port, mode in ((bl.target_ip, 80, None), (direct_ip, ECHO_PORT, "direct")):
            lat: list[float] = []
            p50s: list[float] = []
            fails = 0
            for _ in range(s.repeats):
                xs, f = data.latencies(ns, target, port, s.samples)
                lat += xs
                fails += f
                if xs:
                    p50s.append(summary(xs)["p50"])
            rs = repeats_summary(p50s)
            res.add(c, n, e, "first_packet_rtt_s", summary(lat), mode=mode, repeats=s.repeats,
                    repeat_p50_min=rs.get("min"), repeat_p50_max=rs.get("max"), failed_connects=fails)
            res.add(c, n, e, "conn_per_s",
                    repeats_summary([data.conn_rate(ns, target, port, s.secs) for _ in range(s.repeats)]),
                    mode=mode, procs=2)
        for target, mode in ((bl.iperf_ip, None), (direct_ip, "direct")):
            try:
                tps = [data.throughput(ns, target, IPERF_PORT, s.secs) for _ in range(s.repeats)]
                res.add(c, n, e, "throughput_bps", repeats_summary(tps), mode=mode, streams=1)
            except (RuntimeError, subprocess.TimeoutExpired, KeyError, ValueError) as err:
                res.add(c, n, e, "throughput_bps", {"n": 0, "value": None, "error": str(err)[:200]}, mode=mode)
        res.add(c, n, e, "cpu_s", {"value": px.cpu_s(), "n": 1}, note="proxy utime+stime over the whole cell")
        res.add(c, n, e, "rss_bytes", {"value": px.rss_peak(), "n": 1}, note="proxy peak RSS (VmHWM)")
    finally:
        bl.stop(px.proc)
        control.cleanup(bl, c)


def vm_pass(s: Settings, res: Results) -> None:
    """ipvs (and iptables-legacy, its reference) inside the VM, merged as `vm:` cells."""
    from bench import vm

    modes = ["ipvs", "iptables-legacy"]
    try:
        doc = vm.run_in_vm(modes, s.sizes, s.endpoints, s.repeats, s.samples)
    except UserError as e:  # the host figures stand; say why the VM ones are missing
        res.skipped = [x for x in res.skipped if x["cell"] != "ipvs"] + [
            {"mode": "ipvs", "backend": "", "cell": "ipvs", "reason": str(e)}]
        res.save(s.out)
        return
    whole: dict[str, Any] = {"machine": res.machine, "records": res.records, "skipped": res.skipped}
    vm.merge(whole, doc)
    res.skipped = whole["skipped"]
    res.save(s.out)


def run(a: Any) -> int:
    s = settings(a)
    skipped = preflight(s)
    res = Results(machine(s))
    for c in s.cells:
        if c.key in skipped:
            res.skipped.append({"mode": c.mode, "backend": c.backend, "cell": c.key, "reason": skipped[c.key]})
    cells = [c for c in s.cells if c.key not in skipped]
    if not cells:
        raise UserError("no mode of --modes can run here: " +
                        "; ".join(f"{k}: {v}" for k, v in skipped.items()))
    prog = Progress(len(cells) * len(s.sizes), a.verbose)
    t0 = time.monotonic()
    with prog.shown():
        prog.step(f"building lab {s.lab}")
        try:
            bl = BenchLab.attach(s.lab) if s.reuse else BenchLab.up(s.lab)
        except KeyboardInterrupt:  # Ctrl-C while `kpx up` runs: remove whatever it built
            if not s.reuse:
                signal.signal(signal.SIGINT, signal.SIG_IGN)
                BenchLab.remove(s.lab)
            raise
        try:
            prog.step(f"{s.endpoints} backend pods and a client pod")
            bl.prepare(s.endpoints)
            floor = data.tool_floor(bl.client_netns, s.samples)
            res.add(None, 0, 0, "tool_floor_s", summary(floor), mode="client",
                    note="kpx-connlat to its own loopback listener in the client pod")
            made = 0
            failed: dict[str, str] = {}
            for n in s.sizes:
                if n - 1 > made:
                    prog.step(f"creating {n - 1 - made} filler Services + EndpointSlices")
                    tc = time.monotonic()
                    def filled(d: int, base: int = made, n: int = n) -> None:
                        prog.step(f"filler Services {base + d}/{n - 1}")

                    bl.fill(made, n - 1, s.endpoints, progress=filled)
                    res.add(None, n, s.endpoints, "create_objects_per_s",
                            {"value": 2 * (n - 1 - made) / (time.monotonic() - tc), "n": 1}, mode="apiserver",
                            note="Services + EndpointSlices created through the apiserver, 32 clients")
                    made = n - 1
                bl.recreate_target()
                for c in cells:
                    if c.key in failed:
                        prog.advance()
                        continue
                    try:
                        measure_cell(s, bl, c, n, res, prog)
                    except (UserError, RuntimeError, subprocess.TimeoutExpired) as err:
                        # one mode failing (its proxy exited, a sync timed out) does not sink the others
                        failed[c.key] = f"failed at {n} Services: {err}"
                        res.skipped.append({"mode": c.mode, "backend": c.backend, "cell": c.key,
                                            "reason": failed[c.key]})
                        res.records = [r for r in res.records if r["cell"] != c.key]
                    res.machine["loadavg_end"] = list(os.getloadavg())
                    res.machine["duration_s"] = time.monotonic() - t0
                    res.save(s.out)
                    prog.advance()
        finally:
            prog.step("removing the lab")
            signal.signal(signal.SIGINT, signal.SIG_IGN)  # a second Ctrl-C must not leave half a lab
            bl.down()
            res.machine["loadavg_end"] = list(os.getloadavg())
            res.machine["duration_s"] = time.monotonic() - t0
            res.save(s.out)
    if a.vm and not s.in_vm:
        vm_pass(s, res)
    from bench import report

    report.write(s.out)
    print(f"kpx bench: {len(res.records)} records, {len(cells)} modes x {len(s.sizes)} sizes in "
          f"{time.monotonic() - t0:.0f}s; report in {s.out}/report.md")
    return 0
