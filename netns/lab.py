"""The lab: nodes as network namespaces on one underlay bridge, an outside client, one host veth.

    root netns ── kpx0-<lab> ── br-<lab> (netns kpx-<lab>-net) ──┬── eth0 of kpx-<lab>-node<i>
                                                                ├── eth0 of kpx-<lab>-ext
    node netns: cni0 (10.244.<i>.1/24), forwarding, bridge-nf-call-iptables=1,
                host-gw routes to the other nodes' pod CIDRs, no default route.

Every object carries the lab name: netns `kpx-<lab>-*` (lab names are [a-z0-9], so the prefix is
exact), the host link `kpx0-<lab>`, the underlay bridge `br-<lab>`, state under
/var/lib/kpx/<lab>/. The state file is written before anything is created, so `destroy` works
after a crash at any point (even with no state file: the names alone are exact).
"""

from __future__ import annotations

import fcntl
import ipaddress
import json
import os
import re
import shutil
import signal
import time
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from kpx.errors import UserError
from netns import ns
from netns.ipam import Ipam

if TYPE_CHECKING:
    from netns.sandbox import Sandbox

DEFAULT_LAB = "lab"
DEFAULT_SUBNET = "192.168.56.0/24"
DEFAULT_POD_CIDR = "10.244.0.0/16"
DEFAULT_NODE_PREFIX = 24
BRIDGE = "cni0"
HOST_OFFSET = 1  # 192.168.56.1: the host end of kpx0-<lab>
NODE_OFFSET = 10  # node i gets .10+i (node1 = .11, as in the Vagrant layout)
EXT_OFFSET = 200  # the outside client
MAX_NODES = EXT_OFFSET - NODE_OFFSET - 1
LAB_NAME_RE = re.compile(r"^[a-z0-9]{1,10}$")  # kpx0-<lab> must fit IFNAMSIZ (15)
ROUTE_PROTO = "static"  # host-gw routes the lab (and the agent) own inside node netns


_IPAMS: dict[str, Ipam] = {}


def state_root() -> Path:
    return Path(os.environ.get("KPX_STATE_ROOT", "/var/lib/kpx"))


def netns_prefix(lab: str) -> str:
    return f"kpx-{lab}-"


def host_link_name(lab: str) -> str:
    return f"kpx0-{lab}"


@dataclass(frozen=True)
class LabNode:
    index: int
    name: str  # node1
    netns: str  # kpx-<lab>-node1
    ip: str  # 192.168.56.11
    prefixlen: int  # of the underlay
    pod_cidr: str  # 10.244.1.0/24
    bridge_ip: str  # 10.244.1.1 (gateway of the node's pods)
    bridge: str = BRIDGE


@dataclass
class Lab:
    name: str
    subnet: str
    pod_cidr: str
    node_prefix: int
    host_ip: str
    ext_ip: str
    host_link: str
    net_netns: str
    ext_netns: str
    nodes: list[LabNode]
    state_dir: str
    status: str = "creating"
    created: float = field(default_factory=time.time)

    # -- construction ----------------------------------------------------------------------

    @classmethod
    def plan(
        cls,
        name: str = DEFAULT_LAB,
        nodes: int = 2,
        subnet: str = DEFAULT_SUBNET,
        pod_cidr: str = DEFAULT_POD_CIDR,
        node_prefix: int = DEFAULT_NODE_PREFIX,
        state_dir: str | os.PathLike[str] | None = None,
    ) -> Lab:
        """The lab's names and addresses, validated; creates nothing."""
        if not LAB_NAME_RE.match(name):
            raise UserError(
                f"lab name {name!r} is invalid: use 1-10 lowercase letters/digits (it goes into link names)"
            )
        try:
            net = ipaddress.IPv4Network(subnet, strict=False)
        except ValueError:
            raise UserError(
                f"underlay subnet {subnet!r} is not an IPv4 CIDR (e.g. 192.168.56.0/24)"
            ) from None
        try:
            pods = ipaddress.IPv4Network(pod_cidr, strict=False)
        except ValueError:
            raise UserError(f"pod CIDR {pod_cidr!r} is not an IPv4 CIDR (e.g. 10.244.0.0/16)") from None
        if net.prefixlen > 24:
            raise UserError(f"underlay subnet {subnet} is too small: use a /24 or larger")
        if nodes < 1:
            raise UserError(f"--nodes {nodes}: a lab needs at least 1 node")
        if not pods.prefixlen < node_prefix <= 30:
            raise UserError(
                f"per-node pod prefix /{node_prefix} must be longer than {pod_cidr} and at most /30"
            )
        n_pod_ranges = 2 ** (node_prefix - pods.prefixlen) - 1  # index 0 is not used (10.244.0.0/24)
        limit = min(MAX_NODES, n_pod_ranges)
        if nodes > limit:
            raise UserError(
                f"--nodes {nodes} does not fit the address plan ({subnet} nodes at .{NODE_OFFSET + 1}-"
                f".{EXT_OFFSET - 1}, {pod_cidr} split in /{node_prefix}): use at most {limit}"
            )
        base = net.network_address
        pod_ranges = pods.subnets(new_prefix=node_prefix)
        next(pod_ranges)  # skip index 0
        lab_nodes = []
        for i in range(1, nodes + 1):
            pr = next(pod_ranges)
            lab_nodes.append(
                LabNode(
                    index=i,
                    name=f"node{i}",
                    netns=f"kpx-{name}-node{i}",
                    ip=str(base + NODE_OFFSET + i),
                    prefixlen=net.prefixlen,
                    pod_cidr=str(pr),
                    bridge_ip=str(pr.network_address + 1),
                )
            )
        return cls(
            name=name,
            subnet=str(net),
            pod_cidr=str(pods),
            node_prefix=node_prefix,
            host_ip=str(base + HOST_OFFSET),
            ext_ip=str(base + EXT_OFFSET),
            host_link=host_link_name(name),
            net_netns=f"kpx-{name}-net",
            ext_netns=f"kpx-{name}-ext",
            nodes=lab_nodes,
            state_dir=str(Path(state_dir) if state_dir else state_root() / name),
        )

    @classmethod
    def create(
        cls,
        name: str = DEFAULT_LAB,
        nodes: int = 2,
        subnet: str = DEFAULT_SUBNET,
        pod_cidr: str = DEFAULT_POD_CIDR,
        node_prefix: int = DEFAULT_NODE_PREFIX,
        state_dir: str | os.PathLike[str] | None = None,
    ) -> Lab:
        """Build the lab; on any failure tear down what was made and raise UserError."""
        lab = cls.plan(name, nodes, subnet, pod_cidr, node_prefix, state_dir)
        check_kernel()
        # one creator at a time on this host: two labs checking "is this subnet free?" at the
        # same moment must not both put the same address on a root link
        root = state_root()
        root.mkdir(parents=True, exist_ok=True)
        with open(root / ".create.lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            lab._check_free()
            lab._save()  # before any kernel object exists: destroy can always find them
            try:
                lab._build()
            except ns.NsError as e:
                lab.destroy()
                hint = _kernel_hint(str(e))
                raise UserError(f"creating lab {name} failed and was rolled back: {hint}") from None
            except BaseException:
                lab.destroy()
                raise
        lab.status = "ready"
        lab._save()
        return lab

    @classmethod
    def load(cls, name: str = DEFAULT_LAB, state_dir: str | os.PathLike[str] | None = None) -> Lab:
        path = Path(state_dir) if state_dir else state_root() / name
        try:
            data = json.loads((path / "lab.json").read_text())
        except FileNotFoundError:
            raise UserError(
                f"no lab named {name!r} (no {path}/lab.json): create it with 'kpx up --lab {name}'"
            ) from None
        data["nodes"] = [LabNode(**n) for n in data["nodes"]]
        data["state_dir"] = str(path)
        return cls(**data)

    @classmethod
    def exists(cls, name: str, state_dir: str | os.PathLike[str] | None = None) -> bool:
        path = Path(state_dir) if state_dir else state_root() / name
        return (path / "lab.json").exists()

    def _check_free(self) -> None:
        if (Path(self.state_dir) / "lab.json").exists():
            raise UserError(f"lab {self.name} already exists: use it, or 'kpx down --lab {self.name}' first")
        taken = [n for n in ns.list_netns() if n.startswith(netns_prefix(self.name))]
        if taken:
            raise UserError(
                f"netns {taken[0]} exists (lab {self.name} left over?): run 'kpx down --lab {self.name}' first"
            )
        net = ipaddress.IPv4Network(self.subnet)
        for link in ns.ip_json(["addr", "show"]):
            if link.get("ifname") == self.host_link:
                raise UserError(f"link {self.host_link} exists: run 'kpx down --lab {self.name}' first")
            for a in link.get("addr_info", []):
                if a.get("family") != "inet":
                    continue
                other = ipaddress.IPv4Network(f"{a['local']}/{a['prefixlen']}", strict=False)
                if other.overlaps(net):
                    raise UserError(
                        f"underlay {self.subnet} overlaps {a['local']}/{a['prefixlen']} on host link "
                        f"{link['ifname']}: choose another subnet (--subnet) or 'kpx down' that lab"
                    )

    def _build(self) -> None:
        br = f"br-{self.name}"
        plen = ipaddress.IPv4Network(self.subnet).prefixlen
        node_ns = [n.netns for n in self.nodes]
        ns.netns_add([self.net_netns, *node_ns, self.ext_netns])
        # Root netns: exactly one veth, one address, its connected route. No IPv6 autoconf on it.
        ns.ip_batch(
            [
                f"link add {self.host_link} type veth peer name host netns {self.net_netns}",
                f"link set {self.host_link} addrgenmode none",
                f"addr add {self.host_ip}/{plen} dev {self.host_link}",
                f"link set {self.host_link} up",
            ]
        )
        # Underlay: a plain L2 bridge; every node's eth0 and the ext client plug into it. IPv4
        # only: no IPv6 link-local autoconf on the underlay (`addrgenmode none`), so no RS/DAD
        # multicast ever reaches the host link.
        underlay = [
            "link set lo up",
            f"link add {br} type bridge",
            f"link set {br} addrgenmode none",
            f"link set {br} up",
            f"link set host master {br}",
            "link set host addrgenmode none",
            "link set host up",
        ]
        for port, peer_ns in [(n.name, n.netns) for n in self.nodes] + [("ext", self.ext_netns)]:
            underlay += [
                f"link add {port} type veth peer name eth0 netns {peer_ns}",
                f"link set {port} master {br}",
                f"link set {port} addrgenmode none",
                f"link set {port} up",
            ]
        ns.ip_batch(underlay, self.net_netns)
        ns.set_sysctls(self.net_netns, {"net.bridge.bridge-nf-call-iptables": "0"})
        routes = host_gw_routes(self.nodes)
        for n in self.nodes:
            nb = n.pod_cidr.split("/")[1]
            lines = [
                "link set lo up",
                f"addr add {n.ip}/{n.prefixlen} dev eth0",
                "link set eth0 addrgenmode none",
                "link set eth0 up",
                f"link add {n.bridge} type bridge",
                f"addr add {n.bridge_ip}/{nb} dev {n.bridge}",
                f"link set {n.bridge} up",
            ]
            lines += [f"route replace {cidr} via {via} proto {ROUTE_PROTO}" for cidr, via in routes[n.name]]
            ns.ip_batch(lines, n.netns)
            ns.set_sysctls(
                n.netns,
                {
                    "net.ipv4.ip_forward": "1",
                    # kube-proxy needs bridged pod traffic to traverse iptables (hairpin, same node).
                    "net.bridge.bridge-nf-call-iptables": "1",
                    "net.bridge.bridge-nf-call-ip6tables": "1",
                },
            )
        ns.ip_batch(
            [
                "link set lo up",
                f"addr add {self.ext_ip}/{plen} dev eth0",
                "link set eth0 addrgenmode none",
                "link set eth0 up",
            ],
            self.ext_netns,
        )

    def _save(self) -> None:
        d = Path(self.state_dir)
        d.mkdir(parents=True, exist_ok=True)
        data = asdict(self)
        data.pop("state_dir")
        tmp = d / f".lab.json.{os.getpid()}"
        tmp.write_text(json.dumps(data, indent=1) + "\n")
        os.replace(tmp, d / "lab.json")

    # -- lookups ---------------------------------------------------------------------------

    def node(self, which: int | str) -> LabNode:
        for n in self.nodes:
            if which in (n.index, n.name, n.netns):
                return n
        raise UserError(
            f"lab {self.name} has no node {which!r} (nodes: {', '.join(n.name for n in self.nodes)})"
        )

    def ipam(self, node: int | str | LabNode) -> Ipam:
        """The node's pod IPAM (leases under <state>/ipam/<node>/); one object per process."""
        n = node if isinstance(node, LabNode) else self.node(node)
        d = str(Path(self.state_dir) / "ipam" / n.name)
        ipam = _IPAMS.get(d)
        if ipam is None or str(ipam.network) != n.pod_cidr:
            ipam = _IPAMS[d] = Ipam(d, n.pod_cidr)
        return ipam

    def pod_netns(self, namespace: str, pod: str) -> str:
        return f"kpx-{self.name}-{namespace}-{pod}"

    @property
    def sandbox_dir(self) -> Path:
        return Path(self.state_dir) / "sandboxes"

    # -- processes the lab owns (agents, proxies, containers) ------------------------------

    @property
    def proc_dir(self) -> Path:
        return Path(self.state_dir) / "procs"

    def record_process(self, pid: int, role: str) -> None:
        """Remember a process so destroy kills it (by PID and start time: never a reused PID)."""
        start = ns.proc_starttime(pid)
        if start is None:
            return
        self.proc_dir.mkdir(parents=True, exist_ok=True)
        (self.proc_dir / str(pid)).write_text(json.dumps({"pid": pid, "start": start, "role": role}))

    def forget_process(self, pid: int) -> None:
        try:
            os.unlink(self.proc_dir / str(pid))
        except FileNotFoundError:
            pass

    def processes(self) -> list[dict[str, Any]]:
        return _read_records(self.proc_dir)

    # -- pods on nodes directly (tests and bench, no apiserver) -----------------------------

    def add_pod(
        self,
        node: int | str,
        namespace: str,
        pod: str,
        image: str | None = "kpx/echo",
        args: Iterable[str] = (),
        command: list[str] | None = None,
        wait_port: int | None = None,
    ) -> str:
        """Create a sandbox on node and start one container (image or command); returns the pod IP.

        With an echo/http image the call waits until the server listens (port 8080 or --port).
        """
        from netns.images import image_argv
        from netns.sandbox import Sandbox

        argv = list(command) + list(args) if command else image_argv(image or "", list(args))
        sb = Sandbox.create(self, node, namespace, pod)
        try:
            log = Path(self.state_dir) / "logs" / f"{namespace}_{pod}.log"
            sb.start_container("main", argv, log_path=log)
            port = wait_port
            if port is None and command is None and image:
                port = _port_from_args(list(args))
            if port is not None:
                sb.wait_listening(port)
        except BaseException:
            sb.destroy()
            raise
        return sb.ip

    def add_pods(
        self,
        node: int | str,
        namespace: str,
        names: Iterable[str],
        image: str = "kpx/echo",
        args: Iterable[str] = (),
    ) -> dict[str, str]:
        """Many pods of one image on one node at once (one holder exec and one `ip -batch`
        write for all); returns pod name -> IP once every one listens. All or nothing."""
        from netns.images import image_argv
        from netns.sandbox import Sandbox, destroy_many

        names, args = list(names), list(args)
        argv = image_argv(image, args)
        sbs = Sandbox.create_many(self, node, [(namespace, n) for n in names])
        try:
            logs = Path(self.state_dir) / "logs"
            for sb in sbs:
                sb.start_container("main", argv, log_path=logs / f"{namespace}_{sb.pod}.log")
            port = _port_from_args(args)
            for sb in sbs:
                sb.wait_listening(port)
        except BaseException:
            destroy_many(sbs)
            raise
        return {sb.pod: sb.ip for sb in sbs}

    def pod(self, namespace: str, pod: str) -> Sandbox:
        from netns.sandbox import Sandbox

        return Sandbox.load(self, namespace, pod)

    def delete_pod(self, namespace: str, pod: str) -> None:
        self.pod(namespace, pod).destroy()

    # -- routes ----------------------------------------------------------------------------

    def sync_routes(self, nodes: Iterable[tuple[str, str]] | None = None) -> None:
        """(Re)program host-gw routes on every lab node from (pod_cidr, node_ip) pairs."""
        pairs = list(nodes) if nodes is not None else [(n.pod_cidr, n.ip) for n in self.nodes]
        for n in self.nodes:
            sync_node_routes(n.netns, [(c, via) for c, via in pairs if via != n.ip])

    # -- teardown --------------------------------------------------------------------------

    def destroy(self) -> None:
        destroy(self.name, self.state_dir)


# --- routes ---------------------------------------------------------------------------------


def host_gw_routes(nodes: Iterable[LabNode]) -> dict[str, list[tuple[str, str]]]:
    """For each node, (other node's pod CIDR, other node's IP) routes: flannel's host-gw."""
    nodes = list(nodes)
    return {n.name: [(o.pod_cidr, o.ip) for o in nodes if o.name != n.name] for n in nodes}


def sync_node_routes(netns: str | None, routes: Iterable[tuple[str, str]]) -> None:
    """Make the `proto static` routes in netns exactly `routes` (cidr via ip): replace wanted ones,
    delete ones no longer wanted. The agent calls this when Nodes (podCIDR, InternalIP) change."""
    want = {str(ipaddress.IPv4Network(c, strict=False)): via for c, via in routes}
    have = {r["dst"]: r.get("gateway") for r in ns.ip_json(["route", "show", "proto", ROUTE_PROTO], netns)}
    lines = [f"route del {dst} proto {ROUTE_PROTO}" for dst in have if dst not in want]
    lines += [
        f"route replace {dst} via {via} proto {ROUTE_PROTO}"
        for dst, via in want.items()
        if have.get(dst) != via
    ]
    ns.ip_batch(lines, netns)


# --- checks ---------------------------------------------------------------------------------


def check_kernel() -> None:
    if os.geteuid() != 0:
        raise UserError("the lab needs root (network namespaces, veth, bridges): run with sudo")
    if not os.path.exists("/proc/self/ns/net"):
        raise UserError(
            "this kernel has no network namespaces (CONFIG_NET_NS): use a stock distribution kernel"
        )
    if shutil.which("ip") is None:
        raise UserError("iproute2 'ip' not found: apt-get install iproute2 (or 'make setup')")


def _kernel_hint(msg: str) -> str:
    low = msg.lower()
    if "unknown device type" in low or "not supported" in low:
        if "veth" in low:
            return f"{msg} (kernel lacks veth: CONFIG_VETH)"
        if "bridge" in low:
            return f"{msg} (kernel lacks bridge: CONFIG_BRIDGE)"
        return f"{msg} (missing kernel feature: CONFIG_VETH / CONFIG_BRIDGE / CONFIG_NET_NS)"
    return msg


def _port_from_args(args: list[str]) -> int:
    for i, a in enumerate(args):
        if a == "--port" and i + 1 < len(args):
            return int(args[i + 1])
        if a.startswith("--port="):
            return int(a.split("=", 1)[1])
    return 8080


def _read_records(d: Path) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    try:
        names = sorted(os.listdir(d))
    except FileNotFoundError:
        return out
    for name in names:
        if name.startswith("."):
            continue
        try:
            out.append(json.loads((d / name).read_text()))
        except (FileNotFoundError, json.JSONDecodeError):
            continue
    return out


# --- destroy: exact, idempotent, works after SIGKILL -----------------------------------------


def _ancestors() -> set[int]:
    pids, pid = set(), os.getpid()
    while pid > 1:
        pids.add(pid)
        try:
            with open(f"/proc/{pid}/stat", "rb") as f:
                data = f.read()
            pid = int(data[data.rfind(b")") + 2 :].split()[1])
        except (OSError, ValueError, IndexError):
            break
    return pids


def kill_processes(targets: list[tuple[int, int | None]], grace: float = 2.0) -> None:
    """SIGTERM each (pid, starttime) still ours, wait up to grace seconds, then SIGKILL the rest.

    A zombie counts as gone. Nothing is reaped here: a container's exit status belongs to
    whoever holds its Popen (the agent reports it), so waitpid stays with the owner.
    """
    me = _ancestors()
    live = [(p, s) for p, s in targets if p not in me and ns.kill_pid(p, s, signal.SIGTERM)]
    deadline = time.monotonic() + grace
    while live and time.monotonic() < deadline:
        time.sleep(0.02)
        live = [(p, s) for p, s in live if not _gone(p, s)]
    for p, s in live:
        ns.kill_pid(p, s, signal.SIGKILL)
    deadline = time.monotonic() + 5
    while live and time.monotonic() < deadline:  # SIGKILL is quick, but asynchronous
        live = [(p, s) for p, s in live if not _gone(p, s)]
        if live:
            time.sleep(0.01)


def _gone(pid: int, start: int | None) -> bool:
    """Exited (or a zombie), or the PID now belongs to another process."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            data = f.read()
    except OSError:
        return True
    fields = data[data.rfind(b")") + 2 :].split()
    return fields[0] == b"Z" or (start is not None and int(fields[19]) != start)


def destroy(name: str, state_dir: str | os.PathLike[str] | None = None) -> None:
    """Remove everything of lab `name`: its processes, netns, host link, state and leases.

    Exact: only netns named kpx-<name>-* (lab names have no '-', so no other lab matches), the
    link kpx0-<name>, the state dir; processes only if recorded with a matching start time or
    living inside one of the lab's netns. Idempotent: a second call finds nothing to do.
    """
    if not LAB_NAME_RE.match(name):
        raise UserError(f"lab name {name!r} is invalid: use 1-10 lowercase letters/digits")
    sdir = Path(state_dir) if state_dir else state_root() / name
    prefix = netns_prefix(name)
    names = {n for n in ns.list_netns() if n.startswith(prefix)}
    sandboxes = _read_records(sdir / "sandboxes")
    names |= {sb["netns"] for sb in sandboxes if sb.get("netns", "").startswith(prefix)}
    targets: list[tuple[int, int | None]] = []
    for r in _read_records(sdir / "procs"):
        targets.append((r["pid"], r["start"]))
    for sb in sandboxes:
        for c in sb.get("containers", {}).values():
            targets.append((c["pid"], c["start"]))
        if sb.get("holder_pid"):
            targets.append((sb["holder_pid"], sb.get("holder_start")))
    inodes = {i for i in (ns.netns_inode(n) for n in names) if i is not None}
    for pids in ns.pids_in_netns(inodes).values():
        # inside a lab netns = started by the lab; the start time pins it against PID reuse now
        targets += [(p, ns.proc_starttime(p)) for p in pids]
    seen: set[int] = set()
    uniq = []
    for p, s in targets:
        if p not in seen:
            seen.add(p)
            uniq.append((p, s))
    ns.close_ip_shells(prefix)  # our own `ip -batch` helpers in the lab's node netns
    kill_processes(uniq)
    link = host_link_name(name)
    if os.path.exists(f"/sys/class/net/{link}"):  # synchronously, not when the kernel frees -net
        ns.run(["ip", "link", "del", link], check=False)
    for n in sorted(names):
        ns.netns_delete(n)
    shutil.rmtree(sdir, ignore_errors=True)
