"""`kpx up` / `kpx down` / `kpx status` / `kpx exec`: a whole cluster on one machine.

    kpx up:  Lab.create (netns nodes, underlay, ext, host link)
             -> [etcd on 127.0.0.1, random ports]  -> apiserver on 127.0.0.1:P and <host link>:P
             -> one `kpx node` per node netns       -> [one `kpx proxy` per node netns]
             -> every Node Ready                    -> print how to use it
    kpx down: kill the lab's agents and proxies first (so nothing restarts a container), then
             the lab's destroy (every recorded process, netns, host link, state dir).

Everything lives under /var/lib/kpx/<lab>/: up.json (what was started, ports), kubeconfig (for
the host: https://127.0.0.1:P), node-kubeconfig (for agents and proxies inside the node netns:
https://<host link>:P), logs/<role>.log, pids/<role>.pid. Processes are also recorded with the
lab (PID + start time), so `kpx down` after a crash or SIGKILL kills exactly them.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import fcntl
import importlib
import importlib.util
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import yaml

from kpx.errors import UserError
from netns import ns
from netns.lab import DEFAULT_LAB, Lab, LabNode, netns_prefix, state_root

ETCD = "/usr/bin/etcd"


@dataclass
class UpState:
    """What `kpx up` started (STATE/up.json): read by status, down, the demo and tests."""

    lab: str
    apiserver_port: int
    storage: str
    proxy_mode: str | None
    etcd_client_port: int | None = None
    etcd_peer_port: int | None = None
    components: dict[str, int] = field(default_factory=dict)  # role -> pid
    started: float = field(default_factory=time.time)

    @staticmethod
    def path(lab: Lab) -> Path:
        return Path(lab.state_dir) / "up.json"

    def save(self, lab: Lab) -> None:
        p = self.path(lab)
        tmp = p.with_name(f".up.json.{os.getpid()}")
        tmp.write_text(json.dumps(asdict(self), indent=1) + "\n")
        os.replace(tmp, p)

    @classmethod
    def load(cls, lab: Lab) -> UpState | None:
        try:
            return cls(**json.loads(cls.path(lab).read_text()))
        except (FileNotFoundError, json.JSONDecodeError, TypeError):
            return None


def kubeconfig_path(lab: Lab) -> Path:
    return Path(lab.state_dir) / "kubeconfig"


def node_kubeconfig_path(lab: Lab) -> Path:
    return Path(lab.state_dir) / "node-kubeconfig"


def log_path(lab: Lab, role: str) -> Path:
    return Path(lab.state_dir) / "logs" / f"{role.replace('/', '-')}.log"


def kpx_argv(*args: str) -> list[str]:
    """argv of a kpx sub-command with this interpreter (the venv's), not whatever is on PATH."""
    return [sys.executable, "-m", "kpx", *args]


# --------------------------------------------------------------------------- helpers


def _port_free(port: int, host: str = "127.0.0.1") -> bool:
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError:
            return False
    return True


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def proxy_available() -> bool:
    """True when this build has `kpx proxy` (proxy/cli.py registering a `proxy` command)."""
    try:
        if importlib.util.find_spec("proxy.cli") is None:
            return False
        mod = importlib.import_module("proxy.cli")
    except ImportError:
        return False
    parser = argparse.ArgumentParser()
    sub = parser.add_subparsers()
    try:
        mod.register(sub)
    except Exception:
        return False
    return "proxy" in sub.choices


def last_line(path: Path) -> str:
    """The last meaningful line of a log (what a one-line failure message quotes)."""
    try:
        lines = [ln.strip() for ln in path.read_text(errors="replace").splitlines() if ln.strip()]
    except OSError:
        return ""
    for ln in reversed(lines):
        if not ln.startswith(("Traceback", "File ", "^")):
            return ln[-240:]
    return ""


@contextlib.contextmanager
def _up_lock(name: str) -> Iterator[None]:
    """Serialize `kpx up`/`kpx down` of one lab (two concurrent ups never half-build twice)."""
    root = state_root()
    root.mkdir(parents=True, exist_ok=True)
    fd = os.open(root / f".{name}.lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise UserError(f"another 'kpx up' or 'kpx down' of lab {name} is running: wait for it") from None
        yield
    finally:
        os.close(fd)


def spawn(lab: Lab, role: str, argv: list[str], netns: str | None = None) -> subprocess.Popen[bytes]:
    """Start a lab component in the background (own session, log file, pid file, lab record)."""
    logf = log_path(lab, role)
    logf.parent.mkdir(parents=True, exist_ok=True)
    full = ns.netns_argv(netns, argv) if netns else argv
    with open(logf, "ab") as out:
        p = subprocess.Popen(full, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                             start_new_session=True, cwd="/")
    lab.record_process(p.pid, role)
    pids = Path(lab.state_dir) / "pids"
    pids.mkdir(parents=True, exist_ok=True)
    (pids / f"{role.replace('/', '-')}.pid").write_text(f"{p.pid}\n")
    return p


def progress(msg: str) -> None:
    """One step of a long operation, shown on a terminal only (scripts and tests stay quiet)."""
    if sys.stderr.isatty():
        sys.stderr.write(f"  ... {msg}\n")
        sys.stderr.flush()


class Failed(Exception):
    """A step of `kpx up` failed; the message is the one line to print."""


def _wait(what: str, deadline: float, check: Any, procs: dict[str, subprocess.Popen[bytes]], lab: Lab) -> Any:
    """Poll check() until it returns a truthy value; fail early when a component died."""
    while True:
        for role, p in procs.items():
            if p.poll() is not None:
                why = last_line(log_path(lab, role)) or f"exit code {p.returncode}"
                raise Failed(f"{role} exited while waiting for {what}: {why} (log {log_path(lab, role)})")
        v = check()
        if v:
            return v
        if time.monotonic() > deadline:
            raise Failed(f"timed out waiting for {what}")
        time.sleep(0.1)


def _http_ok(url: str, timeout: float = 1.0) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as r:
            return bool(200 <= r.status < 300)
    except Exception:
        return False


# --------------------------------------------------------------------------- up


def _start_etcd(lab: Lab, st: UpState, procs: dict[str, subprocess.Popen[bytes]], deadline: float) -> str:
    if not os.path.exists(ETCD):
        raise Failed(f"--storage etcd needs Debian's etcd ({ETCD}): apt-get install etcd-server (or 'make setup')")
    st.etcd_client_port, st.etcd_peer_port = free_port(), free_port()
    url = f"http://127.0.0.1:{st.etcd_client_port}"
    peer = f"http://127.0.0.1:{st.etcd_peer_port}"
    name = f"kpx-{lab.name}"
    procs["etcd"] = spawn(lab, "etcd", [
        ETCD, "--name", name, "--data-dir", str(Path(lab.state_dir) / "etcd"),
        "--listen-client-urls", url, "--advertise-client-urls", url,
        "--listen-peer-urls", peer, "--initial-advertise-peer-urls", peer,
        "--initial-cluster", f"{name}={peer}", "--log-level", "warn",
    ])
    st.save(lab)
    _wait("etcd", deadline, lambda: _http_ok(url + "/health"), procs, lab)
    return url


def _write_kubeconfigs(lab: Lab, port: int) -> None:
    src = Path(lab.state_dir) / "apiserver" / "kubeconfig"
    doc = yaml.safe_load(src.read_text())
    doc["clusters"][0]["cluster"]["server"] = f"https://127.0.0.1:{port}"
    for path, server in ((kubeconfig_path(lab), f"https://127.0.0.1:{port}"),
                         (node_kubeconfig_path(lab), f"https://{lab.host_ip}:{port}")):
        doc["clusters"][0]["cluster"]["server"] = server
        tmp = path.with_name(f".{path.name}.tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            yaml.safe_dump(doc, f, sort_keys=False)
        os.replace(tmp, path)


async def _nodes_ready(kubeconfig: Path, names: list[str]) -> list[str]:
    """Names of the wanted nodes that are not Ready yet (all of them if the apiserver is down)."""
    from kpx.kubeclient import KubeClient, KubeConfig, KubeError

    try:
        async with KubeClient(KubeConfig.load(kubeconfig), request_timeout=3) as kc:
            items = (await kc.get("/api/v1/nodes")).get("items") or []
    except KubeError:
        return names
    ready = set()
    for n in items:
        for c in (n.get("status") or {}).get("conditions") or []:
            if c.get("type") == "Ready" and c.get("status") == "True":
                ready.add(n["metadata"]["name"])
    return [n for n in names if n not in ready]


def _bring_up(lab: Lab, args: argparse.Namespace, st: UpState) -> dict[str, subprocess.Popen[bytes]]:
    deadline = time.monotonic() + args.timeout
    procs: dict[str, subprocess.Popen[bytes]] = {}
    api_argv = kpx_argv(
        "apiserver", "--data-dir", str(Path(lab.state_dir) / "apiserver"),
        "--secure-port", str(args.apiserver_port), "--bind-address", f"127.0.0.1,{lab.host_ip}",
        "--host-link-address", lab.host_ip, "--advertise-address", lab.host_ip,
        "--cluster-cidr", lab.pod_cidr, "--storage", args.storage,
    )
    if args.storage == "etcd":
        progress("starting etcd on 127.0.0.1")
        api_argv += ["--etcd-servers", _start_etcd(lab, st, procs, deadline)]
    progress(f"starting the apiserver on 127.0.0.1:{args.apiserver_port} and {lab.host_ip}:{args.apiserver_port}")
    procs["apiserver"] = spawn(lab, "apiserver", api_argv)
    st.components["apiserver"] = procs["apiserver"].pid
    st.save(lab)
    apiserver_kc = Path(lab.state_dir) / "apiserver" / "kubeconfig"

    def api_ready() -> bool:
        if not apiserver_kc.exists():
            return False
        import ssl

        ctx = ssl.create_default_context(cafile=str(Path(lab.state_dir) / "apiserver" / "pki" / "ca.crt"))
        try:
            with urllib.request.urlopen(f"https://127.0.0.1:{args.apiserver_port}/readyz", timeout=1,
                                        context=ctx) as r:
                return bool(r.status == 200)
        except Exception:
            return False

    _wait("the apiserver", deadline, api_ready, procs, lab)
    _write_kubeconfigs(lab, args.apiserver_port)
    nkc = str(node_kubeconfig_path(lab))
    progress(f"starting {len(lab.nodes)} node agents" + (f" and {args.proxy_mode} proxies" if args.proxy_mode else ""))
    for n in lab.nodes:
        role = f"node/{n.name}"
        procs[role] = spawn(lab, role, kpx_argv(
            "node", "--kubeconfig", nkc, "--node-name", n.name, "--node-ip", n.ip, "--lab", lab.name,
            "--state-dir", str(Path(lab.state_dir) / "nodes" / n.name),
        ), netns=n.netns)
        st.components[role] = procs[role].pid
    if args.proxy_mode:
        for n in lab.nodes:
            role = f"proxy/{n.name}"
            procs[role] = spawn(lab, role, kpx_argv(
                "proxy", "--proxy-mode", args.proxy_mode, "--kubeconfig", nkc, "--hostname-override", n.name,
                "--bind-address", n.ip, "--cluster-cidr", lab.pod_cidr,
            ), netns=n.netns)
            st.components[role] = procs[role].pid
    st.save(lab)
    names = [n.name for n in lab.nodes]
    kc = kubeconfig_path(lab)
    progress("waiting for every node to be Ready")
    _wait(f"nodes {', '.join(names)} to be Ready", deadline,
          lambda: not asyncio.run(_nodes_ready(kc, names)), procs, lab)
    if args.proxy_mode:
        for n in lab.nodes:
            _wait(f"proxy on {n.name} (healthz {n.ip}:10256)", deadline,
                  lambda n=n: _http_ok(f"http://{n.ip}:10256/healthz"), procs, lab)
    return procs


def up(args: argparse.Namespace) -> int:
    if os.geteuid() != 0:
        raise UserError("kpx up needs root (network namespaces, veth, bridges): run it with sudo")
    plan = Lab.plan(args.lab, nodes=args.nodes, subnet=args.subnet)  # validates names and addresses
    flag = "" if args.lab == DEFAULT_LAB else f" --lab {args.lab}"
    if Lab.exists(args.lab):
        hint = f"'kpx down{flag}' first, then 'make demo'" if args.demo else f"'kpx down{flag}' first"
        raise UserError(f"lab {args.lab} is already up (KUBECONFIG={kubeconfig_path(plan)}, see 'kpx status'): "
                        f"use it, or run {hint}")
    if args.proxy_mode is None:  # like a kubeadm cluster: kube-proxy in iptables mode on every node
        args.proxy_mode = "iptables" if proxy_available() else None
    elif args.proxy_mode == "none":
        args.proxy_mode = None
    elif not proxy_available():
        raise UserError(f"--proxy-mode {args.proxy_mode}: this build has no 'kpx proxy' yet; run without --proxy-mode")
    if not 1 <= args.apiserver_port <= 65535:
        raise UserError(f"--apiserver-port {args.apiserver_port}: must be 1-65535")
    if not _port_free(args.apiserver_port):
        raise UserError(f"port {args.apiserver_port} on 127.0.0.1 is in use (another apiserver?): stop it first")
    with _up_lock(args.lab):
        t0 = time.monotonic()
        progress(f"building lab {args.lab}: {args.nodes} node netns, underlay {args.subnet}, host link kpx0-{args.lab}")
        lab = Lab.create(args.lab, nodes=args.nodes, subnet=args.subnet)
        st = UpState(lab=lab.name, apiserver_port=args.apiserver_port, storage=args.storage,
                     proxy_mode=args.proxy_mode)
        st.save(lab)
        try:
            _bring_up(lab, args, st)
        except BaseException as e:
            _teardown(lab.name)
            if isinstance(e, Failed):
                raise UserError(f"lab {lab.name} did not come up and was removed: {e}") from None
            if isinstance(e, KeyboardInterrupt):
                raise
            if isinstance(e, UserError):
                raise UserError(f"lab {lab.name} did not come up and was removed: {e}") from None
            raise
        took = time.monotonic() - t0
    _print_ready(lab, st, took, flag)
    if args.demo:
        from netns.demo import run as run_demo

        return run_demo(lab)
    return 0


def _print_ready(lab: Lab, st: UpState, took: float, flag: str) -> None:
    nodes = ", ".join(f"{n.name} {n.ip}" for n in lab.nodes)
    proxy = f", proxy {st.proxy_mode}" if st.proxy_mode else ", no proxy"
    print(f"kpx up: lab {lab.name} is ready in {took:.1f}s: {len(lab.nodes)} nodes ({nodes}), "
          f"apiserver https://127.0.0.1:{st.apiserver_port} (storage {st.storage}){proxy}")
    print(f"  export KUBECONFIG={kubeconfig_path(lab)}")
    print("  kubectl get nodes -o wide")
    print(f"  kpx exec{flag} node/{lab.nodes[0].name} -- ip route")
    print(f"  kpx status{flag}; kpx down{flag}   # remove the lab")
    sys.stdout.flush()


# --------------------------------------------------------------------------- down


def _teardown(name: str) -> None:
    """Stop agents/proxies first (nothing may restart a container meanwhile), then destroy all."""
    from netns.lab import destroy, kill_processes

    lab_dir = state_root() / name
    first: list[tuple[int, int | None]] = []
    with contextlib.suppress(FileNotFoundError):
        for rec in os.listdir(lab_dir / "procs"):
            try:
                r = json.loads((lab_dir / "procs" / rec).read_text())
            except (OSError, json.JSONDecodeError):
                continue
            if str(r.get("role", "")).startswith(("node/", "proxy/")):
                first.append((int(r["pid"]), r.get("start")))
    for pid, start in first:
        ns.kill_pid(pid, start, signal.SIGKILL)
    kill_processes(first, grace=1.0)
    destroy(name)


def lab_leftovers(name: str) -> list[str]:
    """What of lab `name` exists on this machine (empty: nothing to remove)."""
    out = [n for n in ns.list_netns() if n.startswith(netns_prefix(name))]
    if os.path.exists(f"/sys/class/net/kpx0-{name}"):
        out.append(f"link kpx0-{name}")
    if (state_root() / name).exists():
        out.append(str(state_root() / name))
    return out


def down(name: str) -> int:
    if os.geteuid() != 0:
        raise UserError("kpx down needs root: run it with sudo")
    Lab.plan(name, nodes=1)  # validates the name
    with _up_lock(name):
        left = lab_leftovers(name)
        if not left:
            print(f"kpx down: lab {name} is not up (nothing to remove)")
            return 0
        t0 = time.monotonic()
        _teardown(name)
        still = lab_leftovers(name)
    if still:
        raise UserError(f"lab {name}: could not remove {', '.join(still[:3])}; run 'kpx down --lab {name}' again")
    print(f"kpx down: lab {name} removed ({len(left)} objects) in {time.monotonic() - t0:.1f}s")
    return 0


# --------------------------------------------------------------------------- status


def _pid_alive(pid: int, start: int | None) -> bool:
    return start is not None and ns.proc_is(pid, start)


def labs() -> list[str]:
    root = state_root()
    try:
        return sorted(d for d in os.listdir(root) if (root / d / "lab.json").exists())
    except FileNotFoundError:
        return []


def status(name: str | None) -> int:
    names = [name] if name else labs()
    if not names:
        print("kpx status: no lab is up (create one with 'sudo kpx up')")
        return 0
    for lname in names:
        if not Lab.exists(lname):
            left = lab_leftovers(lname)
            if left:
                print(f"lab {lname}: broken (left over: {', '.join(left[:3])}): run 'kpx down --lab {lname}'")
            else:
                print(f"lab {lname}: not up")
            continue
        lab = Lab.load(lname)
        st = UpState.load(lab)
        print(f"lab {lab.name}: {len(lab.nodes)} nodes, underlay {lab.subnet}, host link {lab.host_link} "
              f"{lab.host_ip}" + (f", storage {st.storage}, proxy {st.proxy_mode or 'none'}" if st else ""))
        if st:
            print(f"  KUBECONFIG={kubeconfig_path(lab)}  apiserver https://127.0.0.1:{st.apiserver_port}")
        not_ready: list[str] = []
        if st and kubeconfig_path(lab).exists():
            not_ready = asyncio.run(_nodes_ready(kubeconfig_path(lab), [n.name for n in lab.nodes]))
        print(f"  {'COMPONENT':<16} {'PID':>7}  STATE")
        for r in sorted(lab.processes(), key=lambda r: str(r.get("role"))):
            role = str(r.get("role"))
            alive = _pid_alive(int(r["pid"]), r.get("start"))
            extra = ""
            if role.startswith("node/") and alive:
                extra = " NotReady" if role[5:] in not_ready else " Ready"
            print(f"  {role:<16} {r['pid']:>7}  {'running' if alive else 'dead'}{extra}")
        from netns.sandbox import Sandbox

        per_node: dict[str, int] = {}
        for sb in Sandbox.list(lab):
            per_node[sb.node] = per_node.get(sb.node, 0) + 1
        print("  pods: " + ", ".join(f"{n.name} {per_node.get(n.name, 0)}" for n in lab.nodes))
    return 0


# --------------------------------------------------------------------------- exec


def exec_argv(lab: Lab, target: str, cmd: list[str]) -> list[str]:
    """argv running cmd in a node, pod or the ext client of the lab."""
    if not cmd:
        cmd = [os.environ.get("SHELL") or "/bin/sh"]
    kind, _, rest = target.partition("/")
    if kind in ("node", "nodes", "no"):
        node: LabNode = lab.node(rest)
        return ns.netns_argv(node.netns, cmd)
    if kind == "ext" and not rest:
        return ns.netns_argv(lab.ext_netns, cmd)
    if kind in ("pod", "pods", "po"):
        namespace, _, pod = rest.partition("/")
        if not pod:
            namespace, pod = "default", namespace
        from netns.sandbox import Sandbox, SandboxError

        try:
            sb = Sandbox.load(lab, namespace, pod)
        except SandboxError:
            raise UserError(f"no pod {namespace}/{pod} runs in lab {lab.name} (kubectl get pods -o wide)") from None
        if not sb.alive():
            raise UserError(f"pod {namespace}/{pod} has no running sandbox (kubectl describe pod {pod})")
        return sb.enter_argv(cmd)
    raise UserError(f"target {target!r}: use node/NAME, pod/NAMESPACE/NAME or ext")


def exec_in(name: str, target: str, cmd: list[str]) -> int:
    lab = Lab.load(name)
    argv = exec_argv(lab, target, cmd)
    if shutil.which(argv[0]) is None:
        raise UserError(f"{argv[0]} not found: apt-get install util-linux")
    sys.stdout.flush()
    os.execvp(argv[0], argv)
    return 127  # not reached
