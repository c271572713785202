"""The vm tier runs INSIDE the qemu VM (`make test-vm` boots it once for the whole tier).

Outside the VM every test here fails on purpose: the tier must never pass by skipping.
"""

import os
import subprocess

import pytest


@pytest.fixture(scope="session", autouse=True)
def inside_vm_with_ipvs():
    if os.environ.get("KPX_IN_VM") != "1":
        pytest.fail("the vm tier runs inside the VM: use `make test-vm` (python -m kpx.vm -- pytest -m vm tests/vm)")
    r = subprocess.run(["ipvsadm", "-Ln"], capture_output=True, text=True)
    if r.returncode != 0:
        pytest.fail(f"IPVS is missing in the VM kernel: {r.stderr.strip()}")
