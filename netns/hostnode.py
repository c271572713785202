"""The node agent on a machine of its own (a Vagrant VM, any real node): no lab around it.

The machine's current network namespace is the node. Once the apiserver's node IPAM gave the
Node a spec.podCIDR, the agent makes what the lab would have made: bridge cni0 with the first
address of the podCIDR, IPv4 forwarding and bridge-nf-call-iptables on. Pods are named
`kpx-h_<node>-<namespace>-<pod>` (never a lab's `kpx-<lab>-` prefix, so a lab's teardown cannot
touch them), and the node's netns gets a name too (`ip netns attach kpx-h_<node>-host <pid>`)
so the sandbox code addresses it like a lab node netns.
"""

from __future__ import annotations

import contextlib
import ipaddress
import os
import re
import subprocess
from pathlib import Path

from kpx.errors import UserError
from netns import ns
from netns.lab import BRIDGE, Lab, LabNode


def host_lab_name(node_name: str) -> str:
    return "h_" + re.sub(r"[^a-z0-9.-]", "-", node_name.lower())[:40]


def handle_name(node_name: str) -> str:
    return f"kpx-{host_lab_name(node_name)}-host"


def attach_current_netns(handle: str) -> None:
    """Give the netns this process runs in a name under /run/netns (idempotent)."""
    mine = os.stat("/proc/self/ns/net").st_ino
    if ns.netns_exists(handle):
        if ns.netns_inode(handle) == mine:
            return
        ns.netns_delete(handle)  # a stale name (the machine's netns was re-created)
    ns.run(["ip", "netns", "attach", handle, str(os.getpid())])


def host_lab(node_name: str, node_ip: str, pod_cidr: str, state_dir: Path) -> tuple[Lab, LabNode]:
    net = ipaddress.ip_network(pod_cidr, strict=False)
    if net.version != 4 or net.prefixlen > 30:
        raise UserError(f"spec.podCIDR {pod_cidr}: kpx node needs an IPv4 block of /30 or larger")
    handle = handle_name(node_name)
    attach_current_netns(handle)
    node = LabNode(index=1, name=node_name, netns=handle, ip=node_ip, prefixlen=32, pod_cidr=str(net),
                   bridge_ip=str(net.network_address + 1))
    lab = Lab(name=host_lab_name(node_name), subnet=f"{node_ip}/32", pod_cidr=str(net), node_prefix=net.prefixlen,
              host_ip="", ext_ip="", host_link="", net_netns="", ext_netns="", nodes=[node],
              state_dir=str(state_dir), status="ready")
    return lab, node


def setup_node_network(node: LabNode) -> None:
    """cni0 with the podCIDR's gateway address, forwarding and bridged traffic through netfilter."""
    plen = node.pod_cidr.split("/")[1]
    want = f"{node.bridge_ip}/{plen}"
    links = {link["ifname"]: link for link in ns.ip_json(["addr", "show"])}
    lines = []
    if BRIDGE not in links:
        lines.append(f"link add {BRIDGE} type bridge")
    have = [f"{a['local']}/{a['prefixlen']}" for a in links.get(BRIDGE, {}).get("addr_info", [])
            if a.get("family") == "inet"]
    lines += [f"addr del {a} dev {BRIDGE}" for a in have if a != want]
    if want not in have:
        lines.append(f"addr add {want} dev {BRIDGE}")
    lines.append(f"link set {BRIDGE} up")
    ns.ip_batch(lines)
    if not os.path.exists("/proc/sys/net/bridge"):
        subprocess.run(["modprobe", "br_netfilter"], capture_output=True)
    for key, value in (("net/ipv4/ip_forward", "1"), ("net/bridge/bridge-nf-call-iptables", "1")):
        with contextlib.suppress(FileNotFoundError), open(f"/proc/sys/{key}", "w") as f:
            f.write(value)
