"""Pure pod logic for the node agent: what to run for a container, and the PodStatus to report.

Nothing here touches the kernel or the network, so the rules kubectl users rely on (phase,
conditions, container states, restart decisions, back-off) are unit-tested in isolation.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

JSON = dict[str, Any]

# Kubelet's container restart back-off: 10 s doubling to 5 min, reset after 10 min of running.
BACKOFF_INITIAL = 10.0
BACKOFF_MAX = 300.0
BACKOFF_RESET_AFTER = 600.0


def now_rfc3339() -> str:
    return dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


class ImageError(Exception):
    """The container's image is not one the agent can run (reported as ErrImagePull)."""


def container_argv(container: Mapping[str, Any]) -> list[str]:
    """The argv for a container, following Kubernetes' command/args vs entrypoint/cmd rules.

    `command` given: run it with `args` appended (the host's programs are the image, whatever
    `image` says); otherwise a built-in image (netns.images) with `args`; else ImageError.
    """
    from netns.images import UnknownImage, image_argv

    command = [str(c) for c in container.get("command") or []]
    args = [str(a) for a in container.get("args") or []]
    if command:
        return command + args
    image = str(container.get("image") or "")
    try:
        return image_argv(image, args)
    except UnknownImage as e:
        raise ImageError(f'Failed to pull image "{image}": {e}') from None


def container_env(container: Mapping[str, Any], pod: Mapping[str, Any], pod_ip: str, host_ip: str) -> dict[str, str]:
    """`env` entries with `value` or the downward-API `fieldRef`s kubelet supports for pods."""
    md = pod.get("metadata") or {}
    spec = pod.get("spec") or {}
    fields = {
        "metadata.name": md.get("name", ""),
        "metadata.namespace": md.get("namespace", ""),
        "metadata.uid": md.get("uid", ""),
        "spec.nodeName": spec.get("nodeName", ""),
        "spec.serviceAccountName": spec.get("serviceAccountName", ""),
        "status.podIP": pod_ip,
        "status.podIPs": pod_ip,
        "status.hostIP": host_ip,
        "status.hostIPs": host_ip,
    }
    env: dict[str, str] = {}
    for e in container.get("env") or []:
        name = e.get("name")
        if not name:
            continue
        if "value" in e:
            env[name] = str(e.get("value") or "")
        else:
            ref = ((e.get("valueFrom") or {}).get("fieldRef") or {}).get("fieldPath")
            if ref in fields:
                env[name] = str(fields[ref])
    return env


def should_restart(restart_policy: str, exit_code: int) -> bool:
    if restart_policy == "Never":
        return False
    if restart_policy == "OnFailure":
        return exit_code != 0
    return True  # Always (the default)


@dataclass
class Backoff:
    """Per-container restart back-off (kubelet: first restart at once, then 10 s, 20 s ... 5 min)."""

    initial: float = BACKOFF_INITIAL
    cap: float = BACKOFF_MAX
    reset_after: float = BACKOFF_RESET_AFTER
    _delay: float = 0.0

    def next_delay(self, ran_for: float) -> float:
        """Delay before restarting a container that exited after running `ran_for` seconds."""
        if ran_for >= self.reset_after:
            self._delay = 0.0
        delay = self._delay
        self._delay = self.initial if delay == 0.0 else min(delay * 2, self.cap)
        return delay


# --------------------------------------------------------------------------- status


@dataclass
class ContainerStatus:
    """What the agent knows about one container; rendered as a v1 ContainerStatus."""

    name: str
    image: str
    state: str = "waiting"  # waiting | running | terminated
    reason: str = "ContainerCreating"
    message: str = ""
    exit_code: int = 0
    started_at: str | None = None
    finished_at: str | None = None
    container_id: str = ""
    restart_count: int = 0
    ready: bool = False
    last_terminated: JSON | None = None

    def terminated_json(self) -> JSON:
        t: JSON = {"exitCode": self.exit_code, "reason": self.reason}
        if self.message:
            t["message"] = self.message
        if self.started_at:
            t["startedAt"] = self.started_at
        if self.finished_at:
            t["finishedAt"] = self.finished_at
        if self.container_id:
            t["containerID"] = self.container_id
        return t

    def to_json(self) -> JSON:
        if self.state == "running":
            state: JSON = {"running": {"startedAt": self.started_at}}
        elif self.state == "terminated":
            state = {"terminated": self.terminated_json()}
        else:
            w: JSON = {"reason": self.reason}
            if self.message:
                w["message"] = self.message
            state = {"waiting": w}
        out: JSON = {
            "name": self.name,
            "image": self.image,
            "imageID": "",
            "ready": self.ready and self.state == "running",
            "started": self.state == "running",
            "restartCount": self.restart_count,
            "state": state,
            "lastState": {"terminated": self.last_terminated} if self.last_terminated else {},
        }
        if self.container_id:
            out["containerID"] = self.container_id
        return out


def pod_phase(restart_policy: str, containers: Sequence[ContainerStatus]) -> str:
    """Kubelet's getPhase for pods without init containers."""
    if not containers:
        return "Pending"
    running = sum(c.state == "running" for c in containers)
    waiting = sum(c.state == "waiting" for c in containers)
    terminated = [c for c in containers if c.state == "terminated"]
    succeeded = sum(c.exit_code == 0 for c in terminated)
    failed = len(terminated) - succeeded
    # A waiting container that has run before (restarting) counts as running, like kubelet.
    restarting = sum(c.state == "waiting" and c.last_terminated is not None for c in containers)
    if waiting - restarting > 0:
        return "Pending"
    if running or restarting:
        return "Running"
    if restart_policy == "Always":
        return "Running"  # all exited; about to be restarted
    if failed == 0:
        return "Succeeded"
    if restart_policy == "OnFailure":
        return "Running"
    return "Failed"


@dataclass
class Conditions:
    """Pod conditions with lastTransitionTime kept across updates (only a change moves it)."""

    times: dict[str, tuple[str, str]] = field(default_factory=dict)  # type -> (status, time)

    def render(self, values: Mapping[str, tuple[bool, str, str]]) -> list[JSON]:
        """values: type -> (true?, reason, message) in display order."""
        out = []
        for typ, (ok, reason, message) in values.items():
            status = "True" if ok else "False"
            prev = self.times.get(typ)
            if prev is None or prev[0] != status:
                self.times[typ] = (status, now_rfc3339())
            c: JSON = {"type": typ, "status": status, "lastProbeTime": None, "lastTransitionTime": self.times[typ][1]}
            if reason:
                c["reason"] = reason
            if message:
                c["message"] = message
            out.append(c)
        return out


def pod_status(
    *,
    pod: Mapping[str, Any],
    containers: Sequence[ContainerStatus],
    conditions: Conditions,
    sandbox_ready: bool,
    pod_ip: str | None,
    host_ip: str,
    start_time: str,
) -> JSON:
    """The v1 PodStatus the agent reports for `pod`."""
    spec = pod.get("spec") or {}
    policy = str(spec.get("restartPolicy") or "Always")
    phase = pod_phase(policy, containers) if sandbox_ready else "Pending"
    not_ready = [c.name for c in containers if not (c.ready and c.state == "running")]
    all_ready = sandbox_ready and bool(containers) and not not_ready
    if phase == "Succeeded":
        cr_reason = "PodCompleted"
    elif not all_ready:
        cr_reason = "ContainersNotReady"
    else:
        cr_reason = ""
    cr_msg = f"containers with unready status: [{' '.join(not_ready)}]" if not_ready and cr_reason != "PodCompleted" else ""
    conds = conditions.render(
        {
            "PodReadyToStartContainers": (sandbox_ready, "", ""),
            "Initialized": (True, "", ""),
            "Ready": (all_ready, cr_reason, cr_msg),
            "ContainersReady": (all_ready, cr_reason, cr_msg),
            "PodScheduled": (True, "", ""),
        }
    )
    status: JSON = {
        "phase": phase,
        "conditions": conds,
        "hostIP": host_ip,
        "hostIPs": [{"ip": host_ip}],
        "startTime": start_time,
        "qosClass": "BestEffort",
        "containerStatuses": [c.to_json() for c in containers],
    }
    if pod_ip:
        status["podIP"] = pod_ip
        status["podIPs"] = [{"ip": pod_ip}]
    if phase in ("Failed", "Succeeded"):
        failed = [c for c in containers if c.state == "terminated" and c.exit_code != 0]
        if failed:
            status["reason"] = "Error"
            status["message"] = f"container {failed[0].name} exited with code {failed[0].exit_code}"
    return status


def container_port(pod: Mapping[str, Any], container: Mapping[str, Any], port: Any) -> int:
    """Resolve a probe port (number or the name of a containerPort)."""
    if isinstance(port, int):
        return port
    if isinstance(port, str) and port.isdigit():
        return int(port)
    for p in container.get("ports") or []:
        if p.get("name") == port:
            return int(p["containerPort"])
    for c in (pod.get("spec") or {}).get("containers") or []:
        for p in c.get("ports") or []:
            if p.get("name") == port:
                return int(p["containerPort"])
    raise ValueError(f"port {port!r} is not a number or a named containerPort")
