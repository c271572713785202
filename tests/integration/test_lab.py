"""The lab on the real kernel: topology, reachability, exact and idempotent teardown."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from kpx.errors import UserError
from netns import ns
from netns.images import image_argv
from netns.lab import Lab, destroy, state_root, sync_node_routes
from tests.integration.lab_fixtures import free_subnet, make_lab, unique_lab_name
from tests.integration.netprobe import parse, probe

pytestmark = pytest.mark.netns

with open("/proc/sys/net/ipv4/ip_forward") as _f:
    ROOT_IP_FORWARD = _f.read().strip()  # read at import, before any lab of this session exists


# --- root netns snapshot -------------------------------------------------------------------


def _sysctls() -> dict[str, str]:
    out = {}
    for root, _dirs, files in os.walk("/proc/sys/net"):
        for f in files:
            p = os.path.join(root, f)
            try:
                with open(p) as fh:
                    out[p] = fh.read()
            except OSError:
                pass
    return out


def _lines(argv: list[str]) -> set[str]:
    return {ln.strip() for ln in ns.run(argv).stdout.splitlines() if ln.strip() and not ln.startswith("#")}


def root_snapshot() -> dict[str, object]:
    links = {lk["ifname"] for lk in ns.ip_json(["link", "show"])}
    return {
        "netns": set(ns.list_netns()),
        "links": links,
        "addrs": _lines(["ip", "-o", "-4", "addr", "show"]) | _lines(["ip", "-o", "-6", "addr", "show"]),
        "routes": _lines(["ip", "route", "show", "table", "all"]),
        # counters change with traffic; the rules themselves must not
        "iptables": {ln for ln in _lines(["iptables-save"]) if not ln.startswith(":")},
        "nft": _lines(["nft", "list", "ruleset"]),
        "sysctls": _sysctls(),
    }


def _mine(items: set[str], lab: Lab) -> set[str]:
    net = lab.subnet.rsplit(".", 1)[0] + "."
    return {i for i in items if lab.name in i or net in i}


def _per_iface(key: str, ifnames: set[str]) -> str | None:
    parts = key.split("/")
    for i, part in enumerate(parts[:-1]):
        if part in ("conf", "neigh") and parts[i + 1] in ifnames:
            return parts[i + 1]
    return None


def assert_root_delta(before: dict, after: dict, lab: Lab, *, up: bool) -> None:
    """The root netns differs from `before` by exactly the lab's host link (up) or not at all.

    Other helpers' sessions create their own labs concurrently, so objects that carry neither
    this lab's name nor its subnet are left out of the comparison; iptables, nft and every
    sysctl that is not per-interface must be identical (nobody may change the root netns).
    """
    host_link = lab.host_link
    want_links = {host_link} if up else set()
    assert _mine(after["links"] - before["links"], lab) == want_links
    assert not (before["links"] - after["links"]) - {lk for lk in before["links"] if lk.startswith("kpx0-")}
    if not up:
        assert {n for n in after["netns"] if n.startswith(f"kpx-{lab.name}-")} == set()
    new_addrs = _mine(after["addrs"] - before["addrs"], lab)
    new_routes = _mine(after["routes"] - before["routes"], lab)
    if up:
        assert len([a for a in new_addrs if " inet " in a]) == 1, new_addrs
        assert all(host_link in a and f"{lab.host_ip}/24" in a for a in new_addrs), new_addrs
        main = {r for r in new_routes if "table" not in r}
        assert main == {f"{lab.subnet} dev {host_link} proto kernel scope link src {lab.host_ip}"}, new_routes
        # the local table only holds what the kernel derives from that one address / link
        local = {r.split(" dev ")[0] for r in new_routes - main}
        bcast = lab.subnet.rsplit(".", 1)[0] + ".255"
        assert local <= {f"local {lab.host_ip}", f"broadcast {bcast}", "multicast ff00::/8"}, new_routes
    else:
        assert new_addrs == set() and new_routes == set()
    assert after["iptables"] == before["iptables"]
    assert after["nft"] == before["nft"]
    others = (after["links"] | before["links"]) - {"lo"}
    for key, value in after["sysctls"].items():
        iface = _per_iface(key, others)
        if iface is not None and iface not in before["links"]:
            assert iface != host_link or up, f"{key} left behind"
            continue
        if key in before["sysctls"] and iface is None:
            assert before["sysctls"][key] == value, f"root sysctl {key} changed"


# --- tests ----------------------------------------------------------------------------------


def test_create_destroy_leaves_nothing_behind() -> None:
    before = root_snapshot()
    lab = make_lab(nodes=2)
    try:
        lab.add_pod(1, "default", "web-1")
        lab.add_pod(2, "kube-system", "web-2")
        up = root_snapshot()
        assert_root_delta(before, up, lab, up=True)
        assert {
            f"kpx-{lab.name}-{s}"
            for s in ("net", "node1", "node2", "ext", "default-web-1", "kube-system-web-2")
        } == {n for n in up["netns"] if n.startswith(f"kpx-{lab.name}-")}
    finally:
        lab.destroy()
    after = root_snapshot()
    assert_root_delta(before, after, lab, up=False)
    assert not Path(lab.state_dir).exists()
    lab.destroy()  # idempotent
    destroy(lab.name)


def test_topology(lab: Lab) -> None:
    assert [n.ip for n in lab.nodes] == [str(lab.subnet.rsplit(".", 1)[0]) + f".{10 + i}" for i in (1, 2)]
    for n in lab.nodes:
        links = {lk["ifname"]: lk for lk in ns.ip_json(["addr", "show"], n.netns)}
        assert set(links) >= {"lo", "eth0", "cni0"}
        assert [a["local"] for a in links["eth0"]["addr_info"] if a["family"] == "inet"] == [n.ip]
        assert [a for a in links["eth0"]["addr_info"] if a["family"] == "inet6"] == []  # IPv4-only underlay
        assert [a["local"] for a in links["cni0"]["addr_info"] if a["family"] == "inet"] == [n.bridge_ip]
        assert ns.get_sysctl(n.netns, "net.ipv4.ip_forward") == "1"
        assert ns.get_sysctl(n.netns, "net.bridge.bridge-nf-call-iptables") == "1"
        # the same values seen by a process inside the node netns (not through our setns thread)
        seen = ns.run(
            [
                "ip",
                "netns",
                "exec",
                n.netns,
                "sysctl",
                "-n",
                "net.ipv4.ip_forward",
                "net.bridge.bridge-nf-call-iptables",
            ]
        ).stdout.split()
        assert seen == ["1", "1"]
        routes = ns.ip_json(["route", "show"], n.netns)
        assert not [r for r in routes if r["dst"] == "default"], "node netns must have no default route"
        gw = {r["dst"]: r.get("gateway") for r in routes if r.get("gateway")}
        assert gw == {o.pod_cidr: o.ip for o in lab.nodes if o.name != n.name}
    # the root netns keeps its own forwarding setting; the lab never changes it
    with open("/proc/sys/net/ipv4/ip_forward") as f:
        assert f.read().strip() == ROOT_IP_FORWARD
    host = ns.ip_json(["addr", "show", "dev", lab.host_link])[0]["addr_info"]
    assert [(a["family"], a["local"]) for a in host] == [("inet", lab.host_ip)]
    loaded = Lab.load(lab.name)
    assert loaded.nodes == lab.nodes and loaded.ext_netns == f"kpx-{lab.name}-ext"


def _node_echo(lab: Lab, node_index: int, port: int) -> subprocess.Popen[bytes]:
    n = lab.node(node_index)
    p = subprocess.Popen(
        ns.netns_argv(n.netns, image_argv("kpx/echo", ["--port", str(port)])),
        env={**os.environ, "KPX_POD_NAME": n.name, "KPX_POD_IP": n.ip},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        if f":{port:04X} 00000000:0000 0A" in Path(f"/proc/{p.pid}/net/tcp").read_text():
            return p
        time.sleep(0.02)
    p.kill()
    raise AssertionError("node echo did not start")


def test_ext_and_host_reach_node_ips(lab: Lab) -> None:
    p = _node_echo(lab, 2, 18080)
    try:
        ext = parse(
            probe(["nsenter", f"--net=/run/netns/{lab.ext_netns}", "--"], "tcp", lab.nodes[1].ip, 18080)
        )
        assert ext["pod"] == "node2" and ext["client"].split(":")[0] == lab.ext_ip
        host = parse(probe([], "tcp", lab.nodes[1].ip, 18080))  # from the root netns, over kpx0-<lab>
        assert host["client"].split(":")[0] == lab.host_ip
        udp = parse(
            probe(["nsenter", f"--net=/run/netns/{lab.ext_netns}", "--"], "udp", lab.nodes[1].ip, 18080)
        )
        assert udp["client"].split(":")[0] == lab.ext_ip
    finally:
        p.kill()
        p.wait()


def test_sync_node_routes_follows_node_changes(lab: Lab) -> None:
    n1 = lab.node(1)
    try:
        sync_node_routes(n1.netns, [("10.244.2.0/24", lab.nodes[1].ip), ("10.244.9.0/24", lab.nodes[1].ip)])
        gw = {r["dst"]: r.get("gateway") for r in ns.ip_json(["route", "show", "proto", "static"], n1.netns)}
        assert gw == {"10.244.2.0/24": lab.nodes[1].ip, "10.244.9.0/24": lab.nodes[1].ip}
        sync_node_routes(n1.netns, [])
        assert ns.ip_json(["route", "show", "proto", "static"], n1.netns) == []
    finally:
        lab.sync_routes()
    gw = {r["dst"]: r.get("gateway") for r in ns.ip_json(["route", "show", "proto", "static"], n1.netns)}
    assert gw == {lab.nodes[1].pod_cidr: lab.nodes[1].ip}


def test_user_errors_make_nothing(lab: Lab) -> None:
    name = unique_lab_name()
    with pytest.raises(UserError, match="does not fit"):
        Lab.create(name, nodes=500, subnet="198.18.0.0/24")
    with pytest.raises(UserError, match="already exists"):
        Lab.create(lab.name, nodes=1, subnet=free_subnet())
    with pytest.raises(UserError, match="overlaps"):
        Lab.create(name, nodes=1, subnet=lab.subnet)
    with pytest.raises(UserError, match="invalid"):
        Lab.create("Bad-Name", nodes=1)
    assert not [n for n in ns.list_netns() if n.startswith(f"kpx-{name}-")]
    assert not (state_root() / name).exists()
    assert not os.path.exists(f"/sys/class/net/kpx0-{name}")


def test_failed_build_rolls_back(monkeypatch: pytest.MonkeyPatch) -> None:
    """A kernel error half-way (here: the ext netns's batch) leaves nothing half made."""
    name = unique_lab_name()
    real = ns.ip_batch

    def failing(lines, netns=None, *, force=False):  # type: ignore[no-untyped-def]
        if netns == f"kpx-{name}-ext":
            real(["link add x type nosuchkind"], netns)
        return real(lines, netns, force=force)

    monkeypatch.setattr(ns, "ip_batch", failing)
    with pytest.raises(UserError, match="rolled back"):
        Lab.create(name, nodes=2, subnet=free_subnet())
    assert not [n for n in ns.list_netns() if n.startswith(f"kpx-{name}-")]
    assert not os.path.exists(f"/sys/class/net/kpx0-{name}")
    assert not (state_root() / name).exists()


_CRASHER = textwrap.dedent(
    """
    import sys, time
    from netns.lab import Lab
    lab = Lab.create(sys.argv[1], nodes=2, subnet=sys.argv[2])
    lab.add_pod(1, "default", "a")
    lab.add_pod(2, "default", "b")
    print("up", flush=True)
    time.sleep(600)
    """
)


@pytest.mark.parametrize("kill_all", [True, False], ids=["all-killed", "creator-killed"])
def test_destroy_after_sigkill(kill_all: bool) -> None:
    """SIGKILL the creating process (and, in one case, every holder and container too): destroy
    still removes everything, killing the survivors it recorded."""
    name = unique_lab_name("k")
    subnet = free_subnet()
    p = subprocess.Popen([sys.executable, "-c", _CRASHER, name, subnet], stdout=subprocess.PIPE, text=True)
    try:
        assert p.stdout is not None and p.stdout.readline().strip() == "up"
        sdir = state_root() / name
        sandboxes = [json.loads(f.read_text()) for f in (sdir / "sandboxes").glob("*.json")]
        pids = [p.pid] + [s["holder_pid"] for s in sandboxes]
        pids += [c["pid"] for s in sandboxes for c in s["containers"].values()]
        assert len(pids) == 5
        for pid in pids if kill_all else [p.pid]:
            os.kill(pid, signal.SIGKILL)
        p.wait()
        if not kill_all:
            assert all(ns.proc_starttime(pid) is not None for pid in pids[1:])
    finally:
        destroy(name)
    assert not [n for n in ns.list_netns() if n.startswith(f"kpx-{name}-")]
    assert not os.path.exists(f"/sys/class/net/kpx0-{name}")
    assert not sdir.exists()
    for pid in pids:
        st = ns.proc_starttime(pid)
        assert st is None or Path(f"/proc/{pid}/stat").read_text().split(") ")[1][0] == "Z"
    destroy(name)  # idempotent without any state left


def test_ip_shell_reports_the_failing_line_and_recovers(lab: Lab) -> None:
    n = lab.node(1)
    sh = ns.ip_shell(n.netns)
    sh.run(["link add kpxtst0 type bridge", "link set kpxtst0 up"])
    try:
        with pytest.raises(ns.NsError, match="kpxtst0|exists"):
            sh.run(["link add kpxtst0 type bridge"])  # already exists: ip exits, we see why
        sh.run(["link set kpxtst0 down"])  # a fresh shell takes over
        assert "UP" not in ns.ip_json(["link", "show", "kpxtst0"], n.netns)[0]["flags"]
    finally:
        sh.run(["link del kpxtst0"])
    assert not [lk for lk in ns.ip_json(["link", "show"], n.netns) if lk["ifname"] == "kpxtst0"]


def test_destroy_by_name_alone_after_state_was_wiped() -> None:
    """Even with /var/lib/kpx/<lab> gone, the names are exact: destroy finds the netns, the host
    link and the processes living in them (holder, container)."""
    import shutil

    lab = make_lab(nodes=1)
    lab.add_pod(1, "default", "w")
    sb = lab.pod("default", "w")
    pids = [sb.holder_pid, sb.container_pid("main")]
    shutil.rmtree(lab.state_dir)
    destroy(lab.name)
    assert not [n for n in ns.list_netns() if n.startswith(f"kpx-{lab.name}-")]
    assert not os.path.exists(f"/sys/class/net/{lab.host_link}")
    for pid in pids:
        assert pid is not None
        assert (
            ns.proc_starttime(pid) is None or Path(f"/proc/{pid}/stat").read_text().split(") ")[1][0] == "Z"
        )
