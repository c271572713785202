"""The IPVS pass of `kpx bench --vm`: the same bench, run inside the qemu VM (kpx/vm.py, Debian's
kernel, which has IPVS) on a lab built there, for ipvs and a reference mode. The VM is emulated
(TCG, one vCPU), so its records are marked `emulated` and their cells prefixed `vm:`: compare
them only as ratios among themselves (ipvs vs iptables in the same VM), never with host figures.
"""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
from pathlib import Path
from typing import Any

from kpx.errors import UserError

MARK = "KPX-BENCH-RESULTS-FOLLOW"


def run_in_vm(modes: list[str], sizes: list[int], endpoints: int, repeats: int, samples: int,
              timeout: float = 1500) -> dict[str, Any]:
    """results.json of a bench run inside the VM (the guest's files vanish: it comes back on stdout)."""
    root = Path(__file__).resolve().parent.parent
    inner = [str(root / ".venv" / "bin" / "kpx"), "bench", "--in-vm", "--modes", ",".join(modes),
             "--services", ",".join(map(str, sizes)), "--endpoints", str(endpoints), "--repeats", str(repeats),
             "--samples", str(samples), "--out", "/tmp/kpx-bench-vm", "--lab", "benchvm"]
    script = f"cd {shlex.quote(str(root))} && {shlex.join(inner)} </dev/null >&2 && echo {MARK} && " \
             "cat /tmp/kpx-bench-vm/results.json"
    env = {**os.environ, "KPX_VM_MEM": os.environ.get("KPX_VM_MEM", "3G"), "KPX_VM_TIMEOUT": str(int(timeout))}
    p = subprocess.run([sys.executable, "-m", "kpx.vm", "--", "sh", "-c", script], capture_output=True, text=True,
                       env=env, timeout=timeout + 120)
    if MARK not in p.stdout:
        tail = (p.stderr.strip().splitlines() or [f"exit {p.returncode}"])[-1]
        raise UserError(f"kpx bench --vm: the VM run failed ({tail[-200:]})")
    doc: dict[str, Any] = json.loads(p.stdout.split(MARK, 1)[1])
    return doc


def merge(host: dict[str, Any], vm: dict[str, Any]) -> None:
    """VM records into the host's document, cells prefixed `vm:`, machine under machine.vm."""
    for r in vm["records"]:
        r = dict(r, emulated=True)
        if r.get("cell"):
            r["cell"] = "vm:" + r["cell"]
        else:
            r["mode"] = "vm:" + r["mode"]
        host["records"].append(r)
    host["machine"]["vm"] = vm["machine"]
    host["skipped"] = [s for s in host.get("skipped", []) if s["cell"] != "ipvs"] + [
        dict(s, cell="vm:" + s["cell"]) for s in vm.get("skipped", [])]
