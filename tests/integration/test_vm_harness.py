"""The VM harness (kpx.vm): output streams, exit status propagates, and no qemu is ever left."""

import os
import signal
import subprocess
import sys
import time

import pytest

pytestmark = pytest.mark.netns

VM = [sys.executable, "-m", "kpx.vm", "--"]


def qemu_pids() -> set[int]:
    r = subprocess.run(["pgrep", "-f", "qemu-system-x86_64.*kpxvm.run="], capture_output=True, text=True)
    return {int(p) for p in r.stdout.split()}


def test_output_and_exit_status_come_back():
    before = qemu_pids()
    r = subprocess.run([*VM, "echo hello-from-$(uname -r); test $KPX_IN_VM = 1 && exit 7"],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 7, r.stderr
    assert "hello-from-6." in r.stdout
    assert qemu_pids() == before


def test_timeout_is_124_and_leaves_no_qemu():
    before = qemu_pids()
    env = dict(os.environ, KPX_VM_TIMEOUT="25")
    r = subprocess.run([*VM, "sleep 600"], capture_output=True, text=True, timeout=300, env=env)
    assert r.returncode == 124, r.stderr
    assert qemu_pids() == before


def test_killed_caller_takes_the_vm_down():
    before = qemu_pids()
    p = subprocess.Popen([*VM, "sleep 600"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while not (qemu_pids() - before) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert qemu_pids() - before, "qemu never started"
    os.kill(p.pid, signal.SIGKILL)
    p.wait()
    deadline = time.monotonic() + 20
    while qemu_pids() - before and time.monotonic() < deadline:
        time.sleep(0.2)
    assert qemu_pids() == before
