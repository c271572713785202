"""One container's life inside a pod sandbox: start, watch, restart with back-off, stop.

A container is a process that joined the sandbox's net/uts/ipc namespaces (netns.sandbox starts
it in its own session, so it outlives an agent restart). Its exit is watched through a pidfd:
for a process this agent started, the exit code is then reaped; for one adopted from a previous
agent (not our child) the code is unknown and reported as kubelet reports a vanished container.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import subprocess
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from netns import ns
from netns.podspec import Backoff, ContainerStatus, ImageError, container_argv, now_rfc3339, should_restart

if TYPE_CHECKING:
    from netns.sandbox import Sandbox

log = logging.getLogger("kpx.node.containers")

UNKNOWN_EXIT = 137  # what kubelet reports for a container it lost track of (ContainerStatusUnknown)


async def wait_exit(pid: int, popen: subprocess.Popen[bytes] | None) -> int | None:
    """Wait until pid exits; its exit code if it is our child (popen), else None."""
    loop = asyncio.get_running_loop()
    try:
        fd = os.pidfd_open(pid)
    except ProcessLookupError:
        fd = -1
    if fd >= 0:
        fut: asyncio.Future[None] = loop.create_future()
        loop.add_reader(fd, lambda: None if fut.done() else fut.set_result(None))
        try:
            await fut
        finally:
            loop.remove_reader(fd)
            os.close(fd)
    if popen is None:
        return None
    rc = popen.wait()
    return 128 + (-rc) if rc < 0 else rc  # killed by signal N -> 128+N, as container runtimes report


def signal_group(pid: int, start: int | None, sig: int) -> None:
    """Signal the container's process group (its session), only if pid is still that process."""
    if start is not None and not ns.proc_is(pid, start):
        return
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pid, sig)
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, sig)


class ContainerRunner:
    """Runs one container of a pod until stopped, restarting it per the pod's restartPolicy."""

    def __init__(
        self,
        *,
        sandbox: Sandbox,
        pod: Mapping[str, Any],
        spec: Mapping[str, Any],
        env: dict[str, str],
        log_path: Path,
        backoff: Backoff,
        on_change: Callable[[], None],
        on_event: Callable[[str, str, str], None] | None = None,
        restart_count: int = 0,
        last_terminated: dict[str, Any] | None = None,
    ) -> None:
        self.sandbox = sandbox
        self.pod = pod
        self.spec = spec
        self.name = str(spec["name"])
        self.env = env
        self.log_path = log_path
        self.backoff = backoff
        self.on_change = on_change
        self.on_event = on_event or (lambda typ, reason, message: None)  # Warning events for kubectl
        self.restart_policy = str((pod.get("spec") or {}).get("restartPolicy") or "Always")
        self.status = ContainerStatus(
            name=self.name, image=str(spec.get("image") or ""), restart_count=restart_count, last_terminated=last_terminated
        )
        self.pid: int | None = None
        self.start: int | None = None
        self.popen: subprocess.Popen[bytes] | None = None
        self.stopping = asyncio.Event()
        self.exited = asyncio.Event()  # set whenever no process is running
        self.exited.set()
        self.first_attempt = asyncio.Event()  # the first start was tried (or it was adopted)
        self._started_mono = 0.0

    @property
    def running(self) -> bool:
        return self.pid is not None

    def _container_id(self, pid: int) -> str:
        return f"kpx://{self.sandbox.netns}/{self.name}/{pid}"

    def adopt(self, pid: int, start: int | None, started_at: str | None) -> None:
        """Take over a process a previous agent started (still alive)."""
        self.pid, self.start, self.popen = pid, start, None
        self.status.state = "running"
        self.status.started_at = started_at or now_rfc3339()
        self.status.container_id = self._container_id(pid)
        self._started_mono = time.monotonic()
        self.exited.clear()

    async def _spawn(self) -> bool:
        """Start the process (fork+exec in a worker thread: the agent's loop never blocks on
        it); False (status says why) when it cannot start."""
        from netns.sandbox import SandboxError

        try:
            argv = container_argv(self.spec)
        except ImageError as e:
            self.status.state, self.status.reason, self.status.message = "waiting", "ErrImagePull", str(e)
            self.on_event("Warning", "Failed", f"Error: ErrImagePull: {e}")
            return False
        try:
            p = await asyncio.to_thread(self.sandbox.start_container, self.name, argv, env=self.env,
                                        log_path=self.log_path)
        except OSError as e:  # nsenter itself missing; the argv's own ENOENT shows up as exit 127
            self._terminated(128, "StartError", f"failed to start {argv[0]}: {e.strerror}")
            return False
        except SandboxError as e:  # the holder died under us
            self._terminated(128, "StartError", str(e))
            return False
        self.pid, self.popen = p.pid, p
        self.start = self.sandbox.containers.get(self.name, {}).get("start") or ns.proc_starttime(p.pid)
        self.status.state, self.status.reason, self.status.message = "running", "", ""
        self.status.started_at = now_rfc3339()
        self.status.container_id = self._container_id(p.pid)
        self._started_mono = time.monotonic()
        self.exited.clear()
        return True

    def _terminated(self, code: int, reason: str, message: str = "") -> None:
        st = self.status
        st.state, st.exit_code, st.reason, st.message = "terminated", code, reason, message
        st.finished_at = now_rfc3339()
        st.ready = False

    async def run(self) -> None:
        """Start/watch/restart loop; returns when stopped or when the policy says no restart."""
        # A fresh container's first start is not a restart; an adopted running one, or one a
        # previous agent already ran (restartCount/lastState from the API), restarts count.
        first = self.pid is None and self.status.restart_count == 0 and self.status.last_terminated is None
        while not self.stopping.is_set():
            if not self.running:
                if not first:
                    self.status.restart_count += 1
                first = False
                started = await self._spawn()
                self.first_attempt.set()
                if not started:
                    self.on_change()
                    if self.status.reason == "ErrImagePull":
                        await self.stopping.wait()  # an image never appears later: wait for deletion
                        return
                    if not await self._backoff_or_stop(0.0):
                        return
                    continue
                self.on_change()
            self.first_attempt.set()
            assert self.pid is not None
            code = await wait_exit(self.pid, self.popen)
            ran = time.monotonic() - self._started_mono
            pid = self.pid
            self.pid, self.popen = None, None
            self.sandbox.containers.pop(self.name, None)
            if code is None:
                self._terminated(UNKNOWN_EXIT, "ContainerStatusUnknown", "exited while the node agent was not watching")
            else:
                self._terminated(code, "Completed" if code == 0 else "Error")
            self.exited.set()
            log.info("container exited pod=%s/%s container=%s pid=%d code=%s",
                     self.sandbox.namespace, self.sandbox.pod, self.name, pid, code)
            self.on_change()
            if self.stopping.is_set() or not should_restart(self.restart_policy, self.status.exit_code):
                return
            if not await self._backoff_or_stop(ran):
                return

    async def _backoff_or_stop(self, ran: float) -> bool:
        """Wait the back-off delay (CrashLoopBackOff while waiting); False if stopped meanwhile."""
        delay = self.backoff.next_delay(ran)
        st = self.status
        st.last_terminated = st.terminated_json() if st.state == "terminated" else st.last_terminated
        if delay > 0:
            st.state, st.reason = "waiting", "CrashLoopBackOff"
            self.on_event("Warning", "BackOff", f"Back-off restarting failed container {self.name} in pod "
                          f"{self.sandbox.pod}_{self.sandbox.namespace}")
            st.message = f"back-off {delay:g}s restarting failed container={self.name} pod={self.sandbox.pod}"
            self.on_change()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.stopping.wait(), delay)
        return not self.stopping.is_set()

    async def stop(self, grace: float) -> None:
        """SIGTERM, wait up to grace, SIGKILL; returns when the process is gone."""
        self.stopping.set()
        if self.pid is None:
            return
        signal_group(self.pid, self.start, signal.SIGTERM)
        try:
            await asyncio.wait_for(self.exited.wait(), grace)
        except TimeoutError:
            if self.pid is not None:
                signal_group(self.pid, self.start, signal.SIGKILL)
            await self.exited.wait()
