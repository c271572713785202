"""IPVS mode on the host kernel: where IPVS is missing (this machine), `kpx proxy` stops at once
with one line that says how to run it; where it exists, the kernel check passes."""

import os
import subprocess
import sys

import pytest

from proxy.modes.base import ModeUnavailable
from proxy.modes.ipvs import IpvsMode

pytestmark = pytest.mark.netns


def test_ipvs_mode_on_this_kernel(tmp_path):
    kc = tmp_path / "kubeconfig"
    kc.write_text(
        "apiVersion: v1\nkind: Config\ncurrent-context: c\n"
        "clusters: [{name: c, cluster: {server: 'https://127.0.0.1:1'}}]\n"
        "users: [{name: u, user: {token: t}}]\ncontexts: [{name: c, context: {cluster: c, user: u}}]\n"
    )
    if os.path.isdir("/proc/sys/net/ipv4/vs"):
        IpvsMode.check_kernel()  # must not raise
        return
    with pytest.raises(ModeUnavailable):
        IpvsMode.check_kernel()
    r = subprocess.run([sys.executable, "-m", "kpx", "proxy", "--proxy-mode", "ipvs", "--kubeconfig", str(kc)],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 1
    assert r.stderr.count("\n") == 1 and "Traceback" not in r.stderr
    assert "no IPVS" in r.stderr and "make test-vm" in r.stderr
