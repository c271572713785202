"""Control-plane figures of one cell, from the proxy's own /metrics (kube-proxy's names) and /proc:

    full_sync_s        kubeproxy_sync_full_proxy_rules_duration_seconds of a proxy started on a
                       node with no rules (after `kpx proxy --cleanup`), every Service already there
    endpoint_change_s  kubeproxy_network_programming_duration_seconds of one changed EndpointSlice
                       (its last-change-trigger-time annotation -> rules in the kernel)
    add_service_s      the same, for a new Service + EndpointSlice stamped before the Service's POST
    rules              rule/object count in the kernel (iptables-save / nft / ipvsadm in the node)
    ruleset_bytes      size of that dump (about what a full sync writes)
    cpu_s, rss_bytes   the proxy process's CPU seconds (utime+stime) and peak RSS (VmHWM)
"""

from __future__ import annotations

import re
import subprocess
import time
import urllib.request
from dataclasses import dataclass
from typing import Any

from bench.lab import NS, SERVICES, SLICES, TARGET, BenchLab, filler_ip, now_rfc3339, service_body, slice_body
from bench.matrix import Cell
from netns.ns import netns_argv
from netns.up import kpx_argv

_LINE = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{[^}]*\})?\s+(\S+)")


def parse_metrics(text: str) -> dict[str, float]:
    """Prometheus text -> {'name{labels}': value} (labels kept verbatim)."""
    out: dict[str, float] = {}
    for line in text.splitlines():
        m = _LINE.match(line)
        if m:
            try:
                out[m.group(1) + (m.group(2) or "")] = float(m.group(3))
            except ValueError:
                continue
    return out


@dataclass
class Proxy:
    proc: subprocess.Popen[bytes]
    url: str
    log: Any = None  # its log file

    def metrics(self) -> dict[str, float]:
        try:
            with urllib.request.urlopen(self.url, timeout=5) as r:
                return parse_metrics(r.read().decode())
        except OSError:
            return {}

    def cpu_s(self) -> float:
        import os
        from pathlib import Path

        fields = Path(f"/proc/{self.proc.pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def rss_peak(self) -> int:
        from pathlib import Path

        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
        return 0


def node_cmd(bl: BenchLab, argv: list[str], timeout: float = 120) -> str:
    p = subprocess.run(netns_argv(bl.client_node.netns, argv), capture_output=True, text=True, timeout=timeout)
    return p.stdout


def cleanup(bl: BenchLab, c: Cell) -> None:
    """`kpx proxy --cleanup` in the node: every mode's rules gone, so the next sync starts empty."""
    argv = kpx_argv("proxy", "--cleanup", *c.proxy_args, "--hostname-override", bl.client_node.name)
    subprocess.run(netns_argv(bl.client_node.netns, argv), capture_output=True, timeout=300)


def start_proxy(bl: BenchLab, c: Cell, sync_timeout: float) -> tuple[Proxy, float]:
    """Start the cell's proxy on the client's node; wait for its first (full) sync. Returns the
    proxy and the wall time from start to rules programmed."""
    from netns.up import node_kubeconfig_path

    n = bl.client_node
    argv = kpx_argv("proxy", *c.proxy_args, "--kubeconfig", str(node_kubeconfig_path(bl.lab)),
                    "--hostname-override", n.name, "--bind-address", n.ip, "--cluster-cidr", bl.lab.pod_cidr,
                    "--metrics-bind-address", f"{n.ip}:10249", "--healthz-bind-address", f"{n.ip}:10256")
    t0 = time.monotonic()
    from netns.up import log_path

    role = f"proxy/{n.name}-{c.key}"
    proc = bl.spawn(role, argv, n.netns)
    px = Proxy(proc, f"http://{n.ip}:10249/metrics", log_path(bl.lab, role))
    try:
        wait_count(px, "kubeproxy_sync_full_proxy_rules_duration_seconds_count", 1, sync_timeout, f"{c.key} full sync")
    except BaseException:
        bl.stop(proc)
        raise
    return px, time.monotonic() - t0


def wait_count(px: Proxy, name: str, target: float, timeout: float, what: str) -> dict[str, float]:
    from kpx.errors import UserError

    deadline = time.monotonic() + timeout
    while True:
        if px.proc.poll() is not None:
            from netns.up import last_line

            why = last_line(px.log) if px.log else ""
            raise UserError(f"the proxy exited while waiting for {what} (exit {px.proc.returncode}): {why}")
        m = px.metrics()
        if m.get(name, 0) >= target:
            return m
        if time.monotonic() > deadline:
            raise UserError(f"{what} did not happen in {timeout:.0f}s")
        time.sleep(0.05)


NPL = "kubeproxy_network_programming_duration_seconds"
MIN_SYNC_PERIOD = 1.0  # the proxy's default --min-sync-period


def _programmed(bl: BenchLab, px: Proxy, action: Any, timeout: float, what: str) -> float:
    """Run `action(kc)` (one change stamped with a trigger time); the network-programming
    latency the proxy observed for it."""
    before = px.metrics()
    c0, s0 = before.get(NPL + "_count", 0), before.get(NPL + "_sum", 0)
    bl.run(action)
    after = wait_count(px, NPL + "_count", c0 + 1, timeout, what)
    return (after[NPL + "_sum"] - s0) / max(1.0, after[NPL + "_count"] - c0)


def endpoint_changes(bl: BenchLab, px: Proxy, repeats: int, endpoints: int, timeout: float) -> list[float]:
    """One endpoint of one filler Service replaced, `repeats` times (a fresh address each time).
    With no fillers (1 Service) the change is to an extra slice of a probe Service."""
    name = "svc-00000" if _exists(bl, "svc-00000") else "zy-probe"
    if name == "zy-probe":
        async def mk(kc: Any) -> None:
            await kc.create(SERVICES, service_body(name))
        bl.run(mk)
    out = []
    for r in range(repeats):
        time.sleep(MIN_SYNC_PERIOD)  # an idle proxy: not the previous change's rate limit
        ips = [filler_ip(10**6 + r, k, endpoints) for k in range(endpoints)]
        body = slice_body(f"{name}-bench", name, ips, trigger=now_rfc3339())

        async def act(kc: Any, body: Any = body) -> None:
            from kpx.kubeclient import ApiError

            try:
                cur = await kc.get(f"{SLICES}/{body['metadata']['name']}")
                body["metadata"]["resourceVersion"] = cur["metadata"]["resourceVersion"]
                await kc.update(f"{SLICES}/{body['metadata']['name']}", body)
            except ApiError as e:
                if e.code != 404:
                    raise
                await kc.create(SLICES, body)

        out.append(_programmed(bl, px, act, timeout, "an endpoint change"))
    return out


def _exists(bl: BenchLab, name: str) -> bool:
    from kpx.kubeclient import ApiError

    async def get(kc: Any) -> bool:
        try:
            await kc.get(f"{SERVICES}/{name}")
            return True
        except ApiError:
            return False

    return bool(bl.run(get))


def add_services(bl: BenchLab, px: Proxy, repeats: int, endpoints: int, timeout: float) -> list[float]:
    """A new Service + EndpointSlice, stamped before the Service's POST; deleted afterwards."""
    out = []
    names = [f"zy-add-{r}" for r in range(repeats)]
    for r, name in enumerate(names):
        time.sleep(MIN_SYNC_PERIOD)
        trig = now_rfc3339()

        async def act(kc: Any, name: str = name, trig: str = trig, r: int = r) -> None:
            await kc.create(SERVICES, service_body(name))
            await kc.create(SLICES, slice_body(f"{name}-bench", name,
                                               [filler_ip(2 * 10**6 + r, k, endpoints) for k in range(endpoints)],
                                               trigger=trig))

        out.append(_programmed(bl, px, act, timeout, "a new Service"))

    async def rm(kc: Any) -> None:
        for name in [*names, "zy-probe"]:
            for path in (f"{SERVICES}/{name}", f"{SLICES}/{name}-bench"):
                try:
                    await kc.delete(path)
                except Exception:
                    pass

    bl.run(rm)
    return out


def rule_count(bl: BenchLab, c: Cell) -> tuple[int, int, dict[str, int]]:
    """(rules, dump bytes, details) as the kernel of the client's node holds them."""
    details: dict[str, int] = {}
    dumps = ""
    if c.mode in ("iptables", "userspace", "ipvs"):
        for b in [c.backend] if c.backend else ["legacy", "nft"]:  # "auto" backends: count both
            dump = node_cmd(bl, [f"iptables-{b}-save"])
            dumps += dump
            details[f"iptables_{b}_rules"] = sum(1 for ln in dump.splitlines() if ln.startswith("-A "))
    if c.mode == "nftables":
        dump = node_cmd(bl, ["nft", "list", "table", "ip", "kube-proxy"])
        dumps += dump
        details["nft_chains"] = dump.count("\tchain ")
        details["nft_rules"] = sum(1 for ln in dump.splitlines() if ln.startswith("\t\t") and
                                   not ln.strip().startswith(("type ", "elements", "flags", "}")))
        details["nft_map_elements"] = dump.count(" : ")
    if c.mode == "ipvs":
        dump = node_cmd(bl, ["ipvsadm", "-Ln"])
        dumps += dump
        details["ipvs_virtual_servers"] = sum(1 for ln in dump.splitlines() if ln.startswith(("TCP", "UDP", "SCTP")))
        details["ipvs_real_servers"] = sum(1 for ln in dump.splitlines() if ln.strip().startswith("->") and
                                           "RemoteAddress" not in ln)
        details["ipsets"] = node_cmd(bl, ["ipset", "list", "-n"]).count("\n")
    rules = sum(v for k, v in details.items() if k.endswith(("_rules", "_real_servers", "_virtual_servers")))
    return rules, len(dumps.encode()), details


def target_programmed(bl: BenchLab, c: Cell) -> bool:
    """The measured Service's ClusterIP is in the node's kernel state (a sanity check)."""
    ip = bl.target_ip
    if c.mode == "nftables":
        return ip in node_cmd(bl, ["nft", "list", "table", "ip", "kube-proxy"])
    if c.mode == "ipvs":
        return ip in node_cmd(bl, ["ipvsadm", "-Ln"])
    backends = [c.backend] if c.backend else ["legacy", "nft"]
    return any(ip in node_cmd(bl, [f"iptables-{b}-save", "-t", "nat"]) for b in backends)


__all__ = ["NS", "TARGET", "Proxy", "add_services", "cleanup", "endpoint_changes", "parse_metrics",
           "rule_count", "start_proxy", "target_programmed"]
