"""Pod sandboxes: a pause-style holder owning the pod's net/uts/ipc namespaces, wired into the
node's cni0 bridge like the CNI bridge plugin does, and containers that join those namespaces.

    node netns kpx-<lab>-node<i>: cni0 ── veth<hash> ══ eth0 (pod netns kpx-<lab>-<ns>-<pod>)
    pod eth0 10.244.<i>.<n>/24, default via 10.244.<i>.1 (cni0), hostname = pod name

The holder is `netns/holder/kpx-holder` (a small static C program, built on first use or by
`make setup`): it forks one holder per sandbox that does unshare(NET|UTS|IPC), sethostname,
lo up and the /run/netns bind mount, then sleeps in pause() reaping children; RSS ~0.25 MiB
(catatonit -P measures ~0.7 MiB and would need unshare + hostname + ip execs around it). One
exec can start the holders of many pods (`Sandbox.create_many`).

Each sandbox is recorded in <lab state>/sandboxes/<netns>.json before anything is created, with
the holder's and containers' PID + start time, its veth and its IPAM lease, so a restarted agent
can adopt it (`Sandbox.list`) and the lab's destroy can remove it after a crash.
"""

from __future__ import annotations

import builtins
import hashlib
import json
import os
import random
import subprocess
import time
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

from netns import ns
from netns.ipam import Ipam, write_in_place

if TYPE_CHECKING:
    from netns.lab import Lab, LabNode

HOSTNAME_MAX = 63  # like the kubelet: a pod's hostname is its name truncated to 63


class SandboxError(ns.NsError):
    """A sandbox could not be created or found."""


def holder_binary() -> str:
    """Path of kpx-holder (compiled on first use; see netns/cbuild.py)."""
    from netns.cbuild import binary

    return binary("kpx-holder")


def veth_name(lab: str, namespace: str, pod: str) -> str:
    """Node-side veth name: 'veth' + 8 hex of the pod's identity (≤ 15 chars, stable)."""
    return "veth" + hashlib.sha1(f"{lab}/{namespace}/{pod}".encode()).hexdigest()[:8]


@dataclass
class Sandbox:
    lab: str
    node: str
    node_netns: str
    bridge: str
    namespace: str
    pod: str
    netns: str
    ip: str
    prefixlen: int
    gateway: str
    veth_host: str
    state_dir: str  # the lab's state dir
    holder_pid: int = 0
    holder_start: int | None = None
    ipam_dir: str | None = None
    ipam_key: str | None = None
    containers: dict[str, dict[str, Any]] = field(default_factory=dict)
    status: str = "creating"
    created: float = field(default_factory=time.time)

    # -- records ---------------------------------------------------------------------------

    @staticmethod
    def record_path(state_dir: str | os.PathLike[str], netns: str) -> Path:
        return Path(state_dir) / "sandboxes" / f"{netns}.json"

    @property
    def path(self) -> Path:
        return self.record_path(self.state_dir, self.netns)

    def save(self) -> None:
        try:
            write_in_place(self.path, json.dumps(asdict(self)))
        except FileNotFoundError:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            write_in_place(self.path, json.dumps(asdict(self)))

    @classmethod
    def from_record(cls, path: Path) -> Sandbox:
        return cls(**json.loads(path.read_text()))

    @classmethod
    def load(cls, lab: Lab, namespace: str, pod: str) -> Sandbox:
        path = cls.record_path(lab.state_dir, lab.pod_netns(namespace, pod))
        try:
            return cls.from_record(path)
        except FileNotFoundError:
            raise SandboxError(f"no sandbox for pod {namespace}/{pod} in lab {lab.name}") from None

    @classmethod
    def list(cls, lab: Lab, node: str | None = None) -> builtins.list[Sandbox]:
        """Sandboxes recorded for the lab (optionally one node): what a restarted agent adopts."""
        d = Path(lab.state_dir) / "sandboxes"
        out: builtins.list[Sandbox] = []
        try:
            names = sorted(os.listdir(d))
        except FileNotFoundError:
            return out
        for name in names:
            if name.startswith(".") or not name.endswith(".json"):
                continue
            try:
                sb = cls.from_record(d / name)
            except (FileNotFoundError, json.JSONDecodeError):
                continue
            if node is None or sb.node == node:
                out.append(sb)
        return out

    # -- create ----------------------------------------------------------------------------

    @classmethod
    def create(
        cls,
        lab: Lab,
        node: int | str | LabNode,
        namespace: str,
        pod: str,
        ip: str | None = None,
        prefixlen: int | None = None,
        gateway: str | None = None,
    ) -> Sandbox:
        """Create the pod's netns + holder, veth into the node's cni0, eth0 with ip (leased from
        the node's IPAM when ip is None), default route via cni0. Rolls back on failure."""
        return cls.create_many(lab, node, [(namespace, pod, ip)], prefixlen=prefixlen, gateway=gateway)[0]

    @classmethod
    def create_many(
        cls,
        lab: Lab,
        node: int | str | LabNode,
        pods: Iterable[tuple[str, str] | tuple[str, str, str | None]],
        prefixlen: int | None = None,
        gateway: str | None = None,
    ) -> builtins.list[Sandbox]:
        """Create sandboxes for (namespace, pod[, ip]) on one node: one holder exec and one
        `ip -batch` write for all of them, then each pod's eth0. All or nothing."""
        from netns.lab import LabNode

        n = node if isinstance(node, LabNode) else lab.node(node)
        sbs: builtins.list[Sandbox] = []
        seen: set[str] = set()
        for item in pods:
            namespace, pod = item[0], item[1]
            ip = item[2] if len(item) > 2 else None  # type: ignore[misc]
            netns = lab.pod_netns(namespace, pod)
            if netns in seen or ns.netns_exists(netns) or cls.record_path(lab.state_dir, netns).exists():
                raise SandboxError(f"sandbox {netns} already exists (pod {namespace}/{pod})")
            seen.add(netns)
            sbs.append(
                cls(
                    lab=lab.name,
                    node=n.name,
                    node_netns=n.netns,
                    bridge=n.bridge,
                    namespace=namespace,
                    pod=pod,
                    netns=netns,
                    ip=ip or "",
                    prefixlen=prefixlen or int(n.pod_cidr.split("/")[1]),
                    gateway=gateway or n.bridge_ip,
                    veth_host=veth_name(lab.name, namespace, pod),
                    state_dir=lab.state_dir,
                )
            )
        if not sbs:
            return sbs
        try:
            for sb in sbs:
                if not sb.ip:
                    # a lease made just before a crash is found again by key (allocate is
                    # idempotent) and goes with the lab's state dir at destroy
                    ipam = lab.ipam(n)
                    sb.ipam_dir, sb.ipam_key = str(ipam.dir), f"{sb.namespace}/{sb.pod}"
                    sb.ip = ipam.allocate(sb.ipam_key)
                sb.save()  # before any kernel object: destroy always finds them
            _start_holders(sbs)
            ns.ip_shell(n.netns).run(line for sb in sbs for line in sb._node_side())
            for sb in sbs:
                # pod side: addr, up, default route (ioctls from a setns'd thread, no exec)
                ns.configure_iface(sb.netns, "eth0", sb.ip, sb.prefixlen, sb.gateway)
        except BaseException:
            destroy_many(sbs, grace=0)
            raise
        for sb in sbs:
            sb.status = "ready"
            sb.save()
        return sbs

    def _node_side(self) -> builtins.list[str]:
        v = self.veth_host
        return [
            f"link add {v} type veth peer name eth0 netns {self.netns}",
            f"link set {v} master {self.bridge}",
            # a pod reaching itself through its Service comes back on the same port
            f"link set {v} type bridge_slave hairpin on",
            f"link set {v} up",
        ]

    # -- state -----------------------------------------------------------------------------

    def holder_alive(self) -> bool:
        return (
            bool(self.holder_pid)
            and self.holder_start is not None
            and ns.proc_is(self.holder_pid, self.holder_start)
        )

    def alive(self) -> bool:
        """Holder running and netns mounted: the sandbox can host containers."""
        return self.holder_alive() and ns.netns_exists(self.netns)

    def container_alive(self, name: str) -> bool:
        c = self.containers.get(name)
        return c is not None and ns.proc_is(c["pid"], c["start"]) and not _zombie(c["pid"])

    def container_pid(self, name: str) -> int | None:
        c = self.containers.get(name)
        return c["pid"] if c else None

    # -- containers ------------------------------------------------------------------------

    def enter_argv(self, argv: builtins.list[str]) -> builtins.list[str]:
        """argv that runs argv inside the pod: its netns, uts (hostname) and ipc namespaces."""
        hp = self.holder_pid
        return [
            "nsenter",
            f"--net={ns.netns_path(self.netns)}",
            f"--uts=/proc/{hp}/ns/uts",
            f"--ipc=/proc/{hp}/ns/ipc",
            "--",
            *argv,
        ]

    def start_container(
        self,
        name: str,
        argv: builtins.list[str],
        env: dict[str, str] | None = None,
        log_path: str | os.PathLike[str] | None = None,
        cwd: str | None = None,
    ) -> subprocess.Popen[bytes]:
        """Start a container process in the pod's namespaces (stdout+stderr appended to log_path).

        The process gets its own session (it outlives an agent restart, like a pod a kubelet
        restart) and the Downward-API-like env KPX_POD_NAME/NAMESPACE/IP. The caller owns the
        Popen (poll/wait it to reap); the record keeps PID + start time for adopt and destroy.
        """
        if not self.alive():
            raise SandboxError(f"sandbox {self.netns} is not running (holder gone)")
        if self.container_alive(name):
            raise SandboxError(f"container {name} of {self.namespace}/{self.pod} is already running")
        full_env = {
            "PATH": os.environ.get("PATH", "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"),
            "HOME": "/",
            "HOSTNAME": self.pod[:HOSTNAME_MAX],
            "KPX_POD_NAME": self.pod,
            "KPX_POD_NAMESPACE": self.namespace,
            "KPX_POD_IP": self.ip,
            "KPX_NODE_NAME": self.node,
        }
        full_env.update(env or {})
        out: IO[bytes] | int
        if log_path is not None:
            Path(log_path).parent.mkdir(parents=True, exist_ok=True)
            out = open(log_path, "ab")  # noqa: SIM115 (closed below once the child has it)
        else:
            out = subprocess.DEVNULL
        try:
            p = subprocess.Popen(
                self.enter_argv(argv),
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                env=full_env,
                cwd=cwd or "/",
                start_new_session=True,
            )
        finally:
            if not isinstance(out, int):
                out.close()
        self.containers[name] = {"pid": p.pid, "start": ns.proc_starttime(p.pid), "argv": argv}
        self.save()
        return p

    def stop_container(self, name: str, grace: float = 2.0) -> None:
        """SIGTERM, then SIGKILL after grace; the sandbox (and its IP) stays."""
        c = self.containers.pop(name, None)
        if c:
            from netns.lab import kill_processes

            kill_processes([(c["pid"], c["start"])], grace=grace)
            self.save()

    def wait_listening(self, port: int, proto: str = "tcp", timeout: float = 10.0) -> None:
        """Wait until something in the pod listens on port (reads /proc/<holder>/net/tcp)."""
        deadline = time.monotonic() + timeout
        want = f":{port:04X}"
        table = f"/proc/{self.holder_pid}/net/{proto}"
        while True:
            with open(table) as f:
                next(f)
                for line in f:
                    parts = line.split()
                    if parts[1].endswith(want) and (proto == "udp" or parts[3] == "0A"):
                        return
            if time.monotonic() > deadline:
                raise SandboxError(
                    f"nothing listens on {proto}/{port} in {self.namespace}/{self.pod} after {timeout}s"
                )
            if not any(self.container_alive(n) for n in self.containers):
                raise SandboxError(
                    f"pod {self.namespace}/{self.pod}: container exited before listening on {port}"
                )
            time.sleep(0.01)

    # -- destroy ---------------------------------------------------------------------------

    def destroy(self, grace: float = 2.0) -> None:
        """Kill containers and holder, delete veth and netns, release the IP, drop the record.
        Idempotent; safe on a half-created sandbox."""
        destroy_many([self], grace=grace)


def destroy_many(sandboxes: builtins.list[Sandbox], grace: float = 2.0) -> None:
    """Tear down many sandboxes at once: one kill/wait round, one `ip -batch` per node."""
    from netns.lab import kill_processes

    targets: list[tuple[int, int | None]] = []
    for sb in sandboxes:
        targets += [(c["pid"], c["start"]) for c in sb.containers.values()]
        if sb.holder_pid and sb.holder_start is not None:
            targets.append((sb.holder_pid, sb.holder_start))
    # plus anything living in the pods' netns the records missed (a crash between starting a
    # process and saving its PID): such a process would keep the netns and its veth alive
    inodes = {i for i in (ns.netns_inode(sb.netns) for sb in sandboxes) if i is not None}
    known = {p for p, _ in targets}
    for pids in ns.pids_in_netns(inodes).values():
        targets += [(p, ns.proc_starttime(p)) for p in pids if p not in known]
    kill_processes(targets, grace=grace)
    by_node: dict[str, list[str]] = {}
    for sb in sandboxes:
        by_node.setdefault(sb.node_netns, []).append(sb.veth_host)
    for node_netns, veths in by_node.items():
        if ns.netns_exists(node_netns):
            delete_links(node_netns, veths)
    for sb in sandboxes:
        ns.netns_delete(sb.netns)
        if sb.ipam_dir and sb.ipam_key and sb.ip:
            Ipam(sb.ipam_dir, f"{sb.ip}/32").release_ip(sb.ip, sb.ipam_key)
        try:
            os.unlink(sb.path)
        except FileNotFoundError:
            pass


def _start_holders(sbs: builtins.list[Sandbox]) -> None:
    """One kpx-holder exec for all sandboxes: it forks one holder per pod and prints
    "ready PID PATH" (or "error PATH ...") per pod, in order."""
    argv = [holder_binary()]
    for sb in sbs:
        argv += [ns.netns_path(sb.netns), sb.pod[:HOSTNAME_MAX].rstrip("-.") or sb.pod[:HOSTNAME_MAX]]
    p = subprocess.run(argv, capture_output=True, text=True, stdin=subprocess.DEVNULL)
    by_path = {ns.netns_path(sb.netns): sb for sb in sbs}
    errors = []
    for line in p.stdout.splitlines():
        words = line.split(" ", 3)
        if words[0] == "ready" and len(words) == 3 and words[2] in by_path:
            sb = by_path[words[2]]
            sb.holder_pid = int(words[1])
            sb.holder_start = ns.proc_starttime(sb.holder_pid)
        else:
            errors.append(line)
    missing = [sb.netns for sb in sbs if not sb.holder_pid]
    if p.returncode != 0 or errors or missing:
        detail = "; ".join(errors) or p.stderr.strip() or f"no holder for {missing[0]}"
        raise SandboxError(f"holder failed: {detail}")


def delete_links(netns: str, names: builtins.list[str]) -> None:
    """Delete links synchronously in one kernel batch: tag them with a fresh link group, then
    `ip link del group G` (one unregister_netdevice_many, i.e. one RCU wait instead of one per
    link: 100 veths in ~0.1 s instead of ~2 s). Missing links are skipped."""
    group = random.randrange(1 << 16, 1 << 31)
    ns.ip_batch([f"link set {n} group {group}" for n in names], netns, force=True)
    ns.run(["ip", "-n", netns, "link", "del", "group", str(group)], check=False)


def _zombie(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            data = f.read()
        return data[data.rfind(b")") + 2 :].split()[0] == b"Z"
    except OSError:
        return True
