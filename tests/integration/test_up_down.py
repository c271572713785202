"""`kpx up` / `kpx down` as a user runs them: cycles leave nothing behind (also after every
process was SIGKILLed), the host's root netns is unchanged apart from the documented host link,
a second `kpx up` of a running lab is a clear error, a failed `kpx up` rolls back."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import time
from pathlib import Path

import pytest

from netns import ns
from netns.lab import state_root
from tests.integration.cluster_fixtures import Cluster, free_port, kpx, unique_name

pytestmark = pytest.mark.netns

COUNTERS = re.compile(r"\[\d+:\d+\]|counter packets \d+ bytes \d+")
VOLATILE_SYSCTLS = ("netfilter/nf_conntrack_count", "ipv4/route/gc_", "ipv6/route/gc_")


def _foreign(s: str) -> bool:
    """Objects of other labs (other test sessions run in parallel) and of ours: compared apart."""
    return "kpx0-" in s


def root_snapshot() -> dict[str, list[str]]:
    """The host's root netns as text: links, addresses, routes (all tables), iptables, nft, net sysctls."""
    snap: dict[str, list[str]] = {}
    snap["links"] = sorted(f"{link['ifname']} {link.get('link_type')} mtu={link.get('mtu')} {link.get('address', '')}"
                           for link in ns.ip_json(["link", "show"]) if not _foreign(link["ifname"]))
    snap["addrs"] = sorted(f"{link['ifname']} {a['local']}/{a['prefixlen']}" for link in ns.ip_json(["addr", "show"])
                           if not _foreign(link["ifname"]) for a in link.get("addr_info", []))
    snap["routes"] = sorted(json.dumps(r, sort_keys=True) for fam in ("-4", "-6")
                            for r in json.loads(subprocess.run(["ip", "-j", fam, "route", "show", "table", "all"],
                                                               capture_output=True, text=True).stdout or "[]")
                            if not _foreign(str(r.get("dev", ""))))
    for tool in ("iptables-save", "iptables-legacy-save", "ip6tables-save"):
        p = subprocess.run([tool], capture_output=True, text=True)
        snap[tool] = [COUNTERS.sub("", ln) for ln in p.stdout.splitlines() if ln and not ln.startswith("#")]
    p = subprocess.run(["nft", "list", "ruleset"], capture_output=True, text=True)
    snap["nft"] = [COUNTERS.sub("", ln) for ln in p.stdout.splitlines()]
    sysctls = []
    for root, dirs, files in os.walk("/proc/sys/net"):
        dirs[:] = [d for d in dirs if not _foreign(d)]
        for f in files:
            path = os.path.join(root, f)
            if any(v in path for v in VOLATILE_SYSCTLS):
                continue
            try:
                with open(path) as fh:
                    sysctls.append(f"{path[len('/proc/sys/'):]}={fh.read().strip()}")
            except OSError:
                continue  # write-only (flush) or not readable
    snap["sysctls"] = sorted(sysctls)
    return snap


def diff(a: dict[str, list[str]], b: dict[str, list[str]]) -> dict[str, tuple[list[str], list[str]]]:
    out = {}
    for k in a:
        gone, new = sorted(set(a[k]) - set(b[k])), sorted(set(b[k]) - set(a[k]))
        if gone or new:
            out[k] = (gone[:5], new[:5])
    return out


def host_link_objects(lab: str) -> dict[str, list[str]]:
    link = f"kpx0-{lab}"
    addrs = [f"{a['local']}/{a['prefixlen']}" for li in ns.ip_json(["addr", "show"]) if li["ifname"] == link
             for a in li.get("addr_info", [])]
    routes = [r["dst"] for r in ns.ip_json(["route", "show", "table", "all"]) if r.get("dev") == link]
    return {"addrs": addrs, "routes": routes}


def leftovers(lab: str) -> list[str]:
    out = [n for n in ns.list_netns() if n.startswith(f"kpx-{lab}-")]
    if os.path.exists(f"/sys/class/net/kpx0-{lab}"):
        out.append(f"kpx0-{lab}")
    if (state_root() / lab).exists():
        out.append(str(state_root() / lab))
    return out


def lab_pids(lab: str) -> list[tuple[int, int]]:
    """Every process of the lab: recorded components, sandbox holders and containers."""
    d = state_root() / lab
    out = []
    for f in (d / "procs").iterdir():
        r = json.loads(f.read_text())
        out.append((r["pid"], r["start"]))
    for f in (d / "sandboxes").glob("*.json"):
        sb = json.loads(f.read_text())
        out.append((sb["holder_pid"], sb["holder_start"]))
        out += [(c["pid"], c["start"]) for c in sb["containers"].values()]
    return out


def test_up_down_cycles_leave_the_host_as_it_was() -> None:
    before = root_snapshot()
    name = unique_name("ud").replace("-", "")[:10]
    n = int.from_bytes(os.urandom(2), "big") % 512
    subnet = f"198.{18 + n // 256}.{n % 256}.0/24"
    plen = subnet.split("/")[1]
    try:
        for cycle in range(5):
            storage = "etcd" if cycle == 1 else "sqlite"
            p = kpx("up", "--lab", name, "--subnet", subnet, "--apiserver-port", str(free_port()), "--storage", storage,
                    timeout=120)
            assert p.returncode == 0, p.stderr
            assert f"export KUBECONFIG={state_root() / name / 'kubeconfig'}" in p.stdout
            # While up: the only change to the root netns is the host link, its address and connected route.
            assert diff(before, root_snapshot()) == {}
            host = subnet.replace(".0/", ".1/")
            objs = host_link_objects(name)
            assert objs["addrs"] == [host]
            # connected + local + broadcast routes, and the per-link IPv6 multicast route the kernel adds
            allowed = (subnet, host.split("/")[0], subnet.replace(f".0/{plen}", ".255"), "ff00::/8")
            assert subnet in objs["routes"] and all(r in allowed for r in objs["routes"]), objs
            st = json.loads((state_root() / name / "up.json").read_text())
            assert st["storage"] == storage and (st["etcd_client_port"] is not None) == (storage == "etcd")
            if cycle == 3:
                # A pod is running, then every process of the lab is SIGKILLed, as a crash would.
                pod = {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "victim"},
                       "spec": {"nodeName": "node1", "containers": [{"name": "c", "image": "kpx/echo"}]}}
                kc = str(state_root() / name / "kubeconfig")
                subprocess.run(["kubectl", "--kubeconfig", kc, "apply", "-f", "-"], input=json.dumps(pod),
                               capture_output=True, text=True, check=True)
                deadline = time.monotonic() + 20
                while not list((state_root() / name / "sandboxes").glob("*victim*.json")):
                    assert time.monotonic() < deadline, "pod sandbox never appeared"
                    time.sleep(0.1)
                time.sleep(0.5)
                pids = lab_pids(name)
                assert len(pids) >= 5  # apiserver, 2 agents, holder, container
                for pid, start in pids:
                    ns.kill_pid(pid, start, signal.SIGKILL)
            p = kpx("down", "--lab", name)
            assert p.returncode == 0, p.stderr
            assert "removed" in p.stdout
            assert leftovers(name) == []
            assert diff(before, root_snapshot()) == {}
    finally:
        kpx("down", "--lab", name)
    # idempotent: nothing left, a second down says so and succeeds
    p = kpx("down", "--lab", name)
    assert p.returncode == 0 and "not up" in p.stdout


def test_up_of_a_running_lab_is_a_clear_error_and_keeps_it(cluster: Cluster) -> None:
    netns_before = sorted(n for n in ns.list_netns() if n.startswith(f"kpx-{cluster.name}-"))
    p = kpx("up", "--lab", cluster.name, "--subnet", cluster.lab.subnet, "--apiserver-port", str(free_port()))
    assert p.returncode == 1
    assert p.stderr.count("\n") == 1 and "already up" in p.stderr and "Traceback" not in p.stderr
    assert sorted(n for n in ns.list_netns() if n.startswith(f"kpx-{cluster.name}-")) == netns_before
    nodes = cluster.request("GET", "/api/v1/nodes")["items"]
    assert {n["metadata"]["name"] for n in nodes} >= {"node1", "node2"}


def test_failed_up_rolls_back_everything(tmp_path: Path) -> None:
    name = unique_name("rb").replace("-", "")[:10]
    n = int.from_bytes(os.urandom(2), "big") % 512
    subnet = f"198.{18 + n // 256}.{n % 256}.0/24"
    # The apiserver cannot be ready within 0.2 s: up must fail, say why in one line, and remove all.
    p = kpx("up", "--lab", name, "--subnet", subnet, "--apiserver-port", str(free_port()), "--timeout", "0.2")
    assert p.returncode == 1
    assert p.stderr.count("\n") == 1 and "did not come up and was removed" in p.stderr
    assert leftovers(name) == []


def test_up_refuses_bad_input_in_one_line() -> None:
    for args, want in ((["--lab", "Bad_Name"], "invalid"), (["--nodes", "0"], "at least 1 node"),
                       (["--lab", "x" + os.urandom(3).hex(), "--subnet", "10.0.0.0/28"], "too small")):
        p = kpx("up", *args)
        assert p.returncode != 0 and p.stderr.count("\n") == 1 and want in p.stderr, p.stderr
    p = kpx("up", "--proxy-mode", "bogus")
    assert p.returncode == 2 and "invalid choice" in p.stderr


def test_demo_proves_pod_clusterip_and_nodeport_traffic() -> None:
    name = unique_name("dm").replace("-", "")[:10]
    n = int.from_bytes(os.urandom(2), "big") % 512
    subnet = f"198.{18 + n // 256}.{n % 256}.0/24"
    try:
        p = kpx("up", "--lab", name, "--subnet", subnet, "--apiserver-port", str(free_port()), "--demo", timeout=180)
        assert p.returncode == 0, p.stdout + p.stderr
        ok = [ln for ln in p.stdout.splitlines() if ln.strip().startswith("OK ")]
        assert "FAIL" not in p.stdout and "all checks passed" in p.stdout
        # pod->pod tcp+udp across nodes, pod->ClusterIP tcp+udp, ext->NodePort on both nodes
        assert len(ok) == 6, p.stdout
        assert "proxy iptables" in p.stdout and "across nodes" in p.stdout
        again = kpx("up", "--lab", name, "--demo")
        assert again.returncode == 1 and "already up" in again.stderr and "kpx down --lab" in again.stderr
    finally:
        kpx("down", "--lab", name)
    assert leftovers(name) == []


def test_proxy_mode_without_a_proxy_in_the_build_is_refused_before_building(monkeypatch: pytest.MonkeyPatch) -> None:
    import argparse

    from kpx.errors import UserError
    from netns import up as up_mod

    monkeypatch.setattr(up_mod, "proxy_available", lambda: False)
    name = unique_name("np").replace("-", "")[:10]
    args = argparse.Namespace(lab=name, nodes=2, proxy_mode="nftables", storage="sqlite", demo=False,
                              subnet="198.18.0.0/24", apiserver_port=free_port(), timeout=30.0)
    with pytest.raises(UserError) as e:
        up_mod.up(args)
    assert "no 'kpx proxy'" in str(e.value) and "\n" not in str(e.value)
    assert leftovers(name) == []
