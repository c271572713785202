"""The node agent (`kpx node`): kpx's kubelet.

    Node object  <- register (addresses, capacity, nodeInfo, Ready) + heartbeat every 10 s
    spec.podCIDR <- preset with --pod-cidr, or wait for the apiserver's node IPAM
    Nodes        -> host-gw routes: every other node's podCIDR via its InternalIP
    Pods (spec.nodeName=N) -> sandboxes (netns + holder + veth + IP) -> containers
                           <- status (phase, podIP, conditions, containerStatuses)
    deletionTimestamp      -> SIGTERM, grace, SIGKILL, sandbox gone, IP released, DELETE grace 0

A restarted agent adopts the sandboxes (and live containers) recorded on disk, so nothing is
duplicated or orphaned and no IP is reused; sandboxes whose pod is gone are removed.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import functools
import logging
import os
import platform
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from kpx.errors import UserError
from kpx.kubeclient import ApiError, Informer, KubeClient, KubeError, object_key
from netns.containers import ContainerRunner
from netns.podspec import Backoff, Conditions, ContainerStatus, container_env, now_rfc3339, pod_status
from netns.probes import Prober, parse_probe

if TYPE_CHECKING:
    from netns.lab import Lab, LabNode
    from netns.sandbox import Sandbox

log = logging.getLogger("kpx.node")

KPX_VERSION = "0.1.0"
KUBELET_VERSION = "v1.33.0-kpx"  # kubectl get nodes VERSION column; kpx mimics a 1.33 node


@dataclass
class AgentOptions:
    node_name: str
    node_ip: str
    state_dir: Path
    pod_cidr: str | None = None
    heartbeat: float = 10.0
    max_pods: int = 250
    backoff_initial: float = 10.0


# --------------------------------------------------------------------------- lock


class AgentLock:
    """One agent per node: an flock on STATE_DIR/agent.lock, holding the owner's pid."""

    def __init__(self, state_dir: Path, node: str) -> None:
        self.path = state_dir / "agent.lock"
        self.node = node
        self.fd: int | None = None

    def acquire(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            owner = os.read(fd, 32).decode(errors="replace").strip() or "?"
            os.close(fd)
            raise UserError(
                f"a node agent for {self.node} is already running (pid {owner}, lock {self.path}): stop it first"
            ) from None
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        self.fd = fd

    def release(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None


# --------------------------------------------------------------------------- node object


def _meminfo_kib() -> int:
    with contextlib.suppress(OSError), open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemTotal:"):
                return int(line.split()[1])
    return 0


def _os_image() -> str:
    with contextlib.suppress(OSError), open("/etc/os-release") as f:
        for line in f:
            if line.startswith("PRETTY_NAME="):
                return line.split("=", 1)[1].strip().strip('"')
    return "Linux"


def _read(path: str) -> str:
    try:
        return Path(path).read_text().strip()
    except OSError:
        return ""


def node_status(opts: AgentOptions, ready: bool, message: str, transition: dict[str, str]) -> dict[str, Any]:
    """The Node status the agent posts (kubelet's shape: what kubectl get/describe nodes read)."""
    now = now_rfc3339()
    cap = {"cpu": str(os.cpu_count() or 1), "memory": f"{_meminfo_kib()}Ki", "pods": str(opts.max_pods),
           "ephemeral-storage": "0"}

    def cond(typ: str, status: str, reason: str, msg: str) -> dict[str, Any]:
        key = f"{typ}={status}"
        prev = transition.get(typ)
        if prev is None or not prev.startswith(key + "@"):
            transition[typ] = f"{key}@{now}"
        return {"type": typ, "status": status, "reason": reason, "message": msg,
                "lastHeartbeatTime": now, "lastTransitionTime": transition[typ].split("@", 1)[1]}

    return {
        "addresses": [{"type": "InternalIP", "address": opts.node_ip}, {"type": "Hostname", "address": opts.node_name}],
        "capacity": cap,
        "allocatable": dict(cap),
        "conditions": [
            cond("MemoryPressure", "False", "KubeletHasSufficientMemory", "kpx node agent has sufficient memory available"),
            cond("DiskPressure", "False", "KubeletHasNoDiskPressure", "kpx node agent has no disk pressure"),
            cond("PIDPressure", "False", "KubeletHasSufficientPID", "kpx node agent has sufficient PID available"),
            cond("Ready", "True" if ready else "False", "KubeletReady" if ready else "KubeletNotReady", message),
        ],
        "daemonEndpoints": {"kubeletEndpoint": {"Port": 0}},
        "nodeInfo": {
            "machineID": _read("/etc/machine-id"),
            "systemUUID": _read("/sys/class/dmi/id/product_uuid"),
            "bootID": _read("/proc/sys/kernel/random/boot_id"),
            "kernelVersion": platform.release(),
            "osImage": _os_image(),
            "containerRuntimeVersion": f"kpx://{KPX_VERSION}",
            "kubeletVersion": KUBELET_VERSION,
            "kubeProxyVersion": KUBELET_VERSION,
            "operatingSystem": "linux",
            "architecture": {"x86_64": "amd64", "aarch64": "arm64"}.get(platform.machine(), platform.machine()),
        },
    }


def node_object(opts: AgentOptions) -> dict[str, Any]:
    arch = {"x86_64": "amd64", "aarch64": "arm64"}.get(platform.machine(), platform.machine())
    obj: dict[str, Any] = {
        "apiVersion": "v1",
        "kind": "Node",
        "metadata": {
            "name": opts.node_name,
            "labels": {
                "kubernetes.io/hostname": opts.node_name,
                "kubernetes.io/os": "linux",
                "kubernetes.io/arch": arch,
                "beta.kubernetes.io/os": "linux",
                "beta.kubernetes.io/arch": arch,
            },
            "annotations": {"kpx.dev/node-agent": f"pid={os.getpid()}"},
        },
        "spec": {},
    }
    if opts.pod_cidr:
        obj["spec"] = {"podCIDR": opts.pod_cidr, "podCIDRs": [opts.pod_cidr]}
    return obj


def node_routes(nodes: Mapping[str, Mapping[str, Any]], me: str) -> list[tuple[str, str]]:
    """(podCIDR, InternalIP) of every other node that has both: flannel host-gw routes."""
    out = []
    for n in nodes.values():
        if (n.get("metadata") or {}).get("name") == me:
            continue
        cidr = (n.get("spec") or {}).get("podCIDR")
        ip = next((a.get("address") for a in (n.get("status") or {}).get("addresses") or []
                   if a.get("type") == "InternalIP"), None)
        if cidr and ip:
            out.append((str(cidr), str(ip)))
    return sorted(out)


def pod_path(namespace: str, name: str, sub: str = "") -> str:
    return f"/api/v1/namespaces/{namespace}/pods/{name}" + (f"/{sub}" if sub else "")


# --------------------------------------------------------------------------- pod worker


class PodWorker:
    """Owns one pod on this node: its sandbox, containers, probes and status."""

    def __init__(self, agent: Agent, pod: dict[str, Any], sandbox: Sandbox | None = None) -> None:
        self.agent = agent
        self.pod = pod
        md = pod["metadata"]
        self.namespace, self.name, self.uid = md["namespace"], md["name"], md.get("uid", "")
        self.key = f"{self.namespace}/{self.name}"
        self.sandbox = sandbox
        self.runners: list[ContainerRunner] = []
        self.probe_ready: dict[str, bool] = {}
        self.conditions = Conditions()
        self.start_time = ((pod.get("status") or {}).get("startTime")) or now_rfc3339()
        self.dirty = asyncio.Event()
        self.deleting = asyncio.Event()
        self.gone = False  # the apiserver no longer has the pod (force-deleted)
        self.last_sent: dict[str, Any] | None = None
        self.tasks: list[asyncio.Task[Any]] = []
        self.error = ""
        self.task: asyncio.Task[None] | None = None
        self.events_sent: set[tuple[str, str | None]] = set()
        self.after: asyncio.Task[None] | None = None  # worker of the previous pod with this name
        self.stale: Sandbox | None = None  # that pod's sandbox found on disk, to remove first

    # -- events from the informer ------------------------------------------------------------

    def update(self, pod: dict[str, Any]) -> None:
        self.pod = pod
        if (pod.get("metadata") or {}).get("deletionTimestamp"):
            self.deleting.set()

    def removed(self) -> None:
        self.gone = True
        self.deleting.set()

    def changed(self) -> None:
        self.dirty.set()

    def container_event(self, container: str, typ: str, reason: str, message: str) -> None:
        self.event(typ, reason, message, container)

    def event(self, typ: str, reason: str, message: str, container: str | None = None) -> None:
        """Post a v1 Event about this pod (like kubelet; `kubectl describe pod` lists them). Each
        reason is sent once per container and pod start, so a crash loop does not flood."""
        key = (reason, container)
        if key in self.events_sent or self.gone:
            return
        self.events_sent.add(key)
        t = asyncio.get_running_loop().create_task(self.agent.post_event(self, typ, reason, message, container))
        self.tasks.append(t)

    # -- lifecycle ---------------------------------------------------------------------------

    async def run(self) -> None:
        try:
            if self.after is not None:  # the previous pod of this name must be gone first
                await asyncio.wait([self.after])
            if self.stale is not None:  # a sandbox of an older pod with this name
                await self.agent.destroy_sandbox_soon(self.stale)
                self.stale = None
            if not self.deleting.is_set():
                await self._start()
            writer = asyncio.create_task(self._status_loop())
            await self.deleting.wait()
            await self._terminate()
            writer.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await writer
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("pod worker failed pod=%s", self.key)
        finally:
            self.agent.workers.pop(self.key, None) if self.agent.workers.get(self.key) is self else None

    async def _start(self) -> None:
        a = self.agent
        if self.sandbox is not None and not self.sandbox.alive():
            # holder died (e.g. killed): tear the dead one down, make a new one
            await a.destroy_sandbox_soon(self.sandbox)
            self.sandbox = None
        delay = 1.0
        while self.sandbox is None:
            async with a.sandbox_slots:
                try:
                    self.sandbox = await asyncio.to_thread(a.create_sandbox, self.namespace, self.name)
                    self.error = ""
                except Exception as e:
                    self.error = f"failed to create pod sandbox: {e}"
                    self.event("Warning", "FailedCreatePodSandBox", self.error)
            if self.sandbox is None:  # kubelet retries sandbox creation; so do we, backing off
                log.error("pod=%s %s; retrying in %gs", self.key, self.error, delay)
                await self._post_status(force=True)
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self.deleting.wait(), delay)
                if self.deleting.is_set():
                    return
                delay = min(delay * 2, 30.0)
        a.record_uid(self.sandbox, self.uid)
        sb = self.sandbox
        prev = {c.get("name"): c for c in (self.pod.get("status") or {}).get("containerStatuses") or []}
        host_ip = a.opts.node_ip
        for spec in (self.pod.get("spec") or {}).get("containers") or []:
            name = spec["name"]
            p = prev.get(name) or {}
            r = ContainerRunner(
                sandbox=sb,
                pod=self.pod,
                spec=spec,
                env=container_env(spec, self.pod, sb.ip, host_ip),
                log_path=a.opts.state_dir / "logs" / f"{self.namespace}_{self.name}" / f"{name}.log",
                backoff=Backoff(initial=a.opts.backoff_initial, cap=max(a.opts.backoff_initial, 300.0)),
                on_change=self.changed,
                on_event=functools.partial(self.container_event, name),
                restart_count=int(p.get("restartCount") or 0),
                last_terminated=(p.get("lastState") or {}).get("terminated"),
            )
            rec = sb.containers.get(name)
            if rec and sb.container_alive(name):
                started = ((p.get("state") or {}).get("running") or {}).get("startedAt")
                r.adopt(rec["pid"], rec["start"], started)
            self.runners.append(r)
            self.tasks.append(asyncio.create_task(r.run(), name=f"container {self.key}/{name}"))
            probe = spec.get("readinessProbe")
            if probe:
                self.probe_ready[name] = False
                self.tasks.append(asyncio.create_task(self._probe(r, spec, probe)))
        # One status write with the containers already started (not a ContainerCreating one first):
        # half the writes per pod start, which is what bounds pods/s on a busy apiserver.
        if self.runners:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(asyncio.gather(*(r.first_attempt.wait() for r in self.runners)), 5.0)
        self.changed()

    async def _probe(self, r: ContainerRunner, spec: dict[str, Any], probe: dict[str, Any]) -> None:
        try:
            ps = parse_probe(self.pod, spec, probe)
        except ValueError as e:
            r.status.message = f"readiness probe invalid: {e}"
            self.changed()
            return
        assert self.sandbox is not None
        sb = self.sandbox

        async def on_change(ok: bool, msg: str) -> None:
            self.probe_ready[r.name] = ok
            if not ok:
                self.event("Warning", "Unhealthy", f"Readiness probe failed: {msg}", r.name)
            self.changed()

        while not r.stopping.is_set():
            # (Re)start probing each time the container (re)starts; a new process starts unready.
            while not r.running and not r.stopping.is_set():
                await asyncio.sleep(0.1)
            if r.stopping.is_set():
                return
            self.probe_ready[r.name] = False
            prober = Prober(ps, sb.ip, sb.enter_argv, on_change)
            t = asyncio.create_task(prober.run())
            ex = asyncio.create_task(r.exited.wait())
            try:
                await asyncio.wait([t, ex], return_when=asyncio.FIRST_COMPLETED)
            finally:  # also when _probe itself is cancelled: never leave a prober behind
                t.cancel()
                ex.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await asyncio.wait_for(t, 2.0)
            self.probe_ready[r.name] = False
            self.changed()
            await asyncio.sleep(0.05)

    def _statuses(self) -> list[ContainerStatus]:
        out = []
        for r in self.runners:
            st = r.status
            st.ready = r.running and self.probe_ready.get(r.name, True)
            out.append(st)
        return out

    def render_status(self) -> dict[str, Any]:
        sb = self.sandbox
        containers = self._statuses()
        if not self.runners:  # sandbox not made (yet, or failed)
            containers = [
                ContainerStatus(name=c["name"], image=str(c.get("image") or ""), reason="ContainerCreating")
                for c in (self.pod.get("spec") or {}).get("containers") or []
            ]
        st = pod_status(
            pod=self.pod,
            containers=containers,
            conditions=self.conditions,
            sandbox_ready=sb is not None and bool(self.runners),
            pod_ip=sb.ip if sb else None,
            host_ip=self.agent.opts.node_ip,
            start_time=self.start_time,
        )
        if self.error:
            st["message"] = self.error
            st["reason"] = "FailedCreatePodSandBox"
        return st

    async def _status_loop(self) -> None:
        while True:
            await self.dirty.wait()
            self.dirty.clear()
            await self._post_status()
            await asyncio.sleep(0.05)  # coalesce bursts (start + probe) into one write

    async def _post_status(self, force: bool = False) -> None:
        if self.gone:
            return
        st = self.render_status()
        if not force and st == self.last_sent:
            return
        try:
            await self.agent.kc.patch(pod_path(self.namespace, self.name, "status"), {"status": st})
            self.last_sent = st
        except ApiError as e:
            if e.code == 404:
                self.gone = True
                self.deleting.set()
            else:
                log.warning("pod=%s status update failed: %s", self.key, e)
                self.dirty.set()
                await asyncio.sleep(1)
        except KubeError as e:
            log.warning("pod=%s status update failed: %s", self.key, e)
            self.dirty.set()
            await asyncio.sleep(1)

    def _grace(self) -> float:
        md = self.pod.get("metadata") or {}
        g = md.get("deletionGracePeriodSeconds")
        if g is None:
            g = (self.pod.get("spec") or {}).get("terminationGracePeriodSeconds", 30)
        return 0.0 if self.gone else float(g or 0)

    async def _terminate(self) -> None:
        grace = self._grace()
        log.info("stopping pod=%s grace=%gs", self.key, grace)
        await asyncio.gather(*(r.stop(grace) for r in self.runners))
        for t in self.tasks:
            t.cancel()
        # bounded: a task that does not unwind must not keep the sandbox (and its IP) forever
        if self.tasks:
            await asyncio.wait(self.tasks, timeout=5.0)
        if not self.gone and grace > 0:  # a graceful stop shows the terminated containers
            with contextlib.suppress(Exception):
                await self._post_status()
        if self.sandbox is not None:
            await self.agent.destroy_sandbox_soon(self.sandbox)
        if not self.gone:
            await self.agent.confirm_delete(self.namespace, self.name, self.uid)
        log.info("pod removed pod=%s", self.key)


# --------------------------------------------------------------------------- agent


class Agent:
    """lab/node None: the agent runs on a machine of its own (netns.hostnode), set up once the
    Node has a podCIDR."""

    def __init__(self, kc: KubeClient, opts: AgentOptions, lab: Lab | None, node: LabNode | None) -> None:
        self.kc = kc
        self.opts = opts
        self.lab = lab
        self.node = node
        self.workers: dict[str, PodWorker] = {}
        self.adoptable: dict[str, Sandbox] = {}  # "ns/name" -> sandbox found on disk at start
        self.node_transitions: dict[str, str] = {}
        self.nodes_inf: Informer | None = None
        self.pods_inf: Informer | None = None
        self.routes_dirty = asyncio.Event()
        self.ready = False
        self.not_ready_msg = "waiting for spec.podCIDR"
        self.sandbox_slots = asyncio.Semaphore(8)
        self._destroy_q: list[tuple[Sandbox, asyncio.Future[None]]] = []
        self._destroy_wake = asyncio.Event()

    # -- sandboxes ---------------------------------------------------------------------------

    def create_sandbox(self, namespace: str, name: str) -> Sandbox:
        from netns.sandbox import Sandbox

        assert self.lab is not None and self.node is not None  # set before pods are watched
        return Sandbox.create(self.lab, self.node, namespace, name)

    def destroy_sandbox(self, sb: Sandbox) -> None:
        self.destroy_sandboxes([sb])

    def destroy_sandboxes(self, sbs: list[Sandbox]) -> None:
        from netns.sandbox import destroy_many

        destroy_many(sbs, grace=0.5)
        for sb in sbs:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self._uid_path(sb))

    async def destroy_sandbox_soon(self, sb: Sandbox) -> None:
        """Queue sb for the destroyer, which removes every sandbox queued within 20 ms in one
        batch (one kill round, one /proc scan, one link delete per node); returns when done."""
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._destroy_q.append((sb, fut))
        self._destroy_wake.set()
        await fut

    async def destroyer(self) -> None:
        while True:
            await self._destroy_wake.wait()
            await asyncio.sleep(0.02)
            self._destroy_wake.clear()
            batch, self._destroy_q = self._destroy_q, []
            if not batch:
                continue
            try:
                await asyncio.to_thread(self.destroy_sandboxes, [sb for sb, _ in batch])
            except Exception as e:
                log.error("removing %d sandboxes failed: %s", len(batch), e)
                for _, f in batch:
                    if not f.done():
                        f.set_exception(e)
                continue
            for _, f in batch:
                if not f.done():
                    f.set_result(None)

    def _uid_path(self, sb: Sandbox) -> Path:
        return self.opts.state_dir / "pods" / f"{sb.netns}.uid"

    def record_uid(self, sb: Sandbox, uid: str) -> None:
        p = self._uid_path(sb)
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(uid)

    def sandbox_uid(self, sb: Sandbox) -> str:
        return _read(str(self._uid_path(sb)))

    def load_sandboxes(self) -> None:
        from netns.sandbox import Sandbox

        assert self.lab is not None and self.node is not None
        for sb in Sandbox.list(self.lab, self.node.name):
            self.adoptable[f"{sb.namespace}/{sb.pod}"] = sb
        if self.adoptable:
            log.info("found %d sandboxes from a previous run", len(self.adoptable))

    # -- node --------------------------------------------------------------------------------

    async def register(self) -> dict[str, Any]:
        path = f"/api/v1/nodes/{self.opts.node_name}"
        while True:
            try:
                try:
                    node = await self.kc.create("/api/v1/nodes", node_object(self.opts))
                    log.info("registered node %s", self.opts.node_name)
                except ApiError as e:
                    if e.code != 409:
                        raise
                    node = await self.kc.get(path)
                    log.info("node %s already registered; taking it over", self.opts.node_name)
                    if self.opts.pod_cidr and not (node.get("spec") or {}).get("podCIDR"):
                        node = await self.kc.patch(path, {"spec": {"podCIDR": self.opts.pod_cidr,
                                                                   "podCIDRs": [self.opts.pod_cidr]}})
                await self.post_node_status()
                return node
            except (ApiError, KubeError) as e:
                log.warning("registering node failed (%s); retrying in 2s", e)
                await asyncio.sleep(2)

    async def post_node_status(self) -> None:
        st = node_status(self.opts, self.ready, self.ready and "kpx node agent is posting ready status"
                         or self.not_ready_msg, self.node_transitions)
        await self.kc.patch(f"/api/v1/nodes/{self.opts.node_name}/status", {"status": st})

    async def heartbeat(self) -> None:
        while True:
            await asyncio.sleep(self.opts.heartbeat)
            try:
                await self.post_node_status()
            except ApiError as e:
                if e.code == 404:  # someone deleted our Node: register it again
                    log.warning("node object was deleted; registering again")
                    await self.register()
                else:
                    log.warning("heartbeat failed: %s", e)
            except KubeError as e:
                log.warning("heartbeat failed: %s", e)

    def own_node(self) -> dict[str, Any] | None:
        return self.nodes_inf.store.get(self.opts.node_name) if self.nodes_inf else None

    async def wait_pod_cidr(self) -> str:
        while True:
            n = self.own_node()
            cidr = ((n or {}).get("spec") or {}).get("podCIDR")
            if cidr:
                return str(cidr)
            await asyncio.sleep(0.1)

    def on_node_event(self, typ: str, old: dict[str, Any] | None, new: dict[str, Any] | None) -> None:
        self.routes_dirty.set()

    async def route_loop(self) -> None:
        from netns.lab import sync_node_routes

        while True:
            await self.routes_dirty.wait()
            self.routes_dirty.clear()
            assert self.nodes_inf is not None
            routes = node_routes(self.nodes_inf.store, self.opts.node_name)
            try:
                await asyncio.to_thread(sync_node_routes, None, routes)
            except Exception as e:
                log.error("syncing host-gw routes failed: %s", e)
                await asyncio.sleep(1)
                self.routes_dirty.set()
            await asyncio.sleep(0.05)

    # -- pods --------------------------------------------------------------------------------

    def on_pod_event(self, typ: str, old: dict[str, Any] | None, new: dict[str, Any] | None) -> None:
        obj = new if new is not None else old
        if obj is None:
            return
        key = object_key(obj)
        w = self.workers.get(key)
        if typ == "DELETED":
            if w is not None and w.uid == obj["metadata"].get("uid"):
                w.removed()
            return
        assert new is not None
        after = None
        if w is not None and w.uid != new["metadata"].get("uid"):
            w.removed()  # same name, new pod: the old worker cleans up, a new one starts after
            after, w = w.task, None
        if w is None:
            finished = (new.get("status") or {}).get("phase") in ("Succeeded", "Failed")
            if finished and key not in self.adoptable and not new["metadata"].get("deletionTimestamp"):
                return  # a finished pod we never ran (or already cleaned up)
            sb = self.adoptable.pop(key, None)
            stale = None
            if sb is not None and self.sandbox_uid(sb) not in ("", new["metadata"].get("uid")):
                stale, sb = sb, None
            w = PodWorker(self, new, sb)
            w.after, w.stale = after, stale
            w.update(new)
            self.workers[key] = w
            w.task = asyncio.create_task(w.run(), name=f"pod {key}")
        else:
            w.update(new)

    async def post_event(self, w: PodWorker, typ: str, reason: str, message: str, container: str | None) -> None:
        now = now_rfc3339()
        involved: dict[str, Any] = {"apiVersion": "v1", "kind": "Pod", "namespace": w.namespace, "name": w.name,
                                    "uid": w.uid}
        if container:
            involved["fieldPath"] = f"spec.containers{{{container}}}"
        body = {
            "apiVersion": "v1", "kind": "Event",
            "metadata": {"name": f"{w.name}.{os.urandom(8).hex()}", "namespace": w.namespace},
            "involvedObject": involved, "reason": reason, "message": message[:1024], "type": typ,
            "source": {"component": "kubelet", "host": self.opts.node_name},
            "reportingComponent": "kubelet", "reportingInstance": self.opts.node_name,
            "firstTimestamp": now, "lastTimestamp": now, "count": 1,
        }
        try:
            await self.kc.create(f"/api/v1/namespaces/{w.namespace}/events", body)
        except KubeError as e:
            log.debug("event %s for pod=%s not posted: %s", reason, w.key, e)

    async def confirm_delete(self, namespace: str, name: str, uid: str) -> None:
        body = {"kind": "DeleteOptions", "apiVersion": "v1", "gracePeriodSeconds": 0, "preconditions": {"uid": uid}}
        for _ in range(5):
            try:
                await self.kc.delete(pod_path(namespace, name), body, gracePeriodSeconds=0)
                return
            except ApiError as e:
                if e.code in (404, 409):
                    return
                log.warning("confirming deletion of %s/%s failed: %s", namespace, name, e)
            except KubeError as e:
                log.warning("confirming deletion of %s/%s failed: %s", namespace, name, e)
            await asyncio.sleep(1)

    async def cleanup_orphans(self) -> None:
        """Sandboxes left from a previous run whose pod no longer exists (or is another pod now)."""
        orphans = list(self.adoptable.values())
        self.adoptable.clear()
        for sb in orphans:
            log.info("removing orphan sandbox %s", sb.netns)
        if orphans:
            await asyncio.to_thread(self.destroy_sandboxes, orphans)

    # -- main --------------------------------------------------------------------------------

    def dump_tasks(self) -> None:
        """SIGUSR1: log every asyncio task and where it waits (for 'why is this pod stuck')."""
        import io

        for t in asyncio.all_tasks():
            buf = io.StringIO()
            t.print_stack(limit=6, file=buf)
            log.info("task %s: %s", t.get_name(), buf.getvalue().replace("\n", " | "))

    async def run(self) -> None:
        o = self.opts
        import signal

        with contextlib.suppress(NotImplementedError, RuntimeError):
            asyncio.get_running_loop().add_signal_handler(signal.SIGUSR1, self.dump_tasks)
        if self.lab is not None:
            self.load_sandboxes()
        await self.register()
        self.nodes_inf = Informer(self.kc, "/api/v1/nodes", on_event=self.on_node_event, name="nodes")
        tasks = [asyncio.create_task(self.nodes_inf.run(), name="nodes informer"),
                 asyncio.create_task(self.heartbeat(), name="heartbeat"),
                 asyncio.create_task(self.destroyer(), name="sandbox destroyer")]
        try:
            cidr = await self.wait_pod_cidr()
            if self.lab is None:
                from netns.hostnode import host_lab, setup_node_network

                lab, node = await asyncio.to_thread(host_lab, o.node_name, o.node_ip, cidr, o.state_dir)
                await asyncio.to_thread(setup_node_network, node)
                self.lab, self.node = lab, node
                self.load_sandboxes()
            assert self.node is not None
            if cidr != self.node.pod_cidr:
                self.not_ready_msg = (f"spec.podCIDR {cidr} differs from this node's bridge network "
                                      f"{self.node.pod_cidr}; restart the agent with --pod-cidr {self.node.pod_cidr}")
                log.error(self.not_ready_msg)
                await self.post_node_status()
                await asyncio.gather(*tasks)
                return
            log.info("pod CIDR %s", cidr)
            tasks.append(asyncio.create_task(self.route_loop(), name="routes"))
            self.pods_inf = Informer(self.kc, "/api/v1/pods", field_selector=f"spec.nodeName={o.node_name}",
                                     on_event=self.on_pod_event, name="pods")
            tasks.append(asyncio.create_task(self.pods_inf.run(), name="pods informer"))
            await self.pods_inf.wait_synced()
            await self.cleanup_orphans()
            self.ready = True
            await self.post_node_status()
            log.info("node %s is Ready", o.node_name)
            await asyncio.gather(*tasks)
        finally:
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)


async def run_agent(kubeconfig: str, opts: AgentOptions, lab: Lab | None, node: LabNode | None) -> None:
    from kpx.kubeclient import KubeConfig

    try:
        cfg = KubeConfig.load(kubeconfig)
    except KubeError as e:
        raise UserError(str(e)) from None
    async with KubeClient(cfg, user_agent=f"kpx-node/{KPX_VERSION} ({opts.node_name})") as kc:
        await Agent(kc, opts, lab, node).run()


def _lab_from_state(state_dir: Path) -> str | None:
    """/var/lib/kpx/<lab>/nodes/<node> -> <lab> (None when the state dir is not inside a lab)."""
    p = state_dir.resolve()
    if p.parent.name == "nodes" and (p.parent.parent / "lab.json").exists():
        return p.parent.parent.name
    return None


def main(args: Any) -> int:
    """Entry of `kpx node` (foreground until SIGTERM/SIGINT)."""
    import signal

    from kpx import log as kpxlog
    from netns.lab import Lab, state_root

    lab_name = args.lab or (_lab_from_state(Path(args.state_dir)) if args.state_dir else None)
    lab: Lab | None = None
    node: LabNode | None = None
    if lab_name:
        lab = Lab.load(lab_name)
        node = lab.node(args.node_name)
        state_dir = Path(args.state_dir) if args.state_dir else state_root() / lab_name / "nodes" / node.name
        node_ip, pod_cidr = args.node_ip or node.ip, args.pod_cidr or node.pod_cidr
    else:  # a machine of its own (Vagrant VM): its current netns is the node
        if not args.node_ip:
            raise UserError("--node-ip is required outside a lab (the address other nodes reach this one at)")
        state_dir = Path(args.state_dir) if args.state_dir else state_root() / "node" / args.node_name
        node_ip, pod_cidr = args.node_ip, args.pod_cidr
    lock = AgentLock(state_dir, args.node_name)
    lock.acquire()
    kpxlog.setup("node", args.log_level, node=args.node_name)
    opts = AgentOptions(
        node_name=args.node_name,
        node_ip=node_ip,
        state_dir=state_dir,
        pod_cidr=pod_cidr,
        heartbeat=args.heartbeat,
        max_pods=args.max_pods,
        backoff_initial=args.restart_backoff,
    )

    def _term(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, _term)
    t0 = time.monotonic()
    try:
        try:
            import uvloop

            uvloop.run(run_agent(args.kubeconfig, opts, lab, node))
        except ImportError:
            asyncio.run(run_agent(args.kubeconfig, opts, lab, node))
    except KeyboardInterrupt:
        log.info("stopped after %.0fs (pods keep running; a new agent adopts them)", time.monotonic() - t0)
    finally:
        lock.release()
    return 0
