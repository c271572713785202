"""`kpx bench --quick` end to end on a lab it builds: every runnable mode measured through the real
path, the results and the report complete (not the timings), skipped modes named with a reason,
bad input refused before any work, and no lab left behind (also after Ctrl-C)."""

from __future__ import annotations

import json
import secrets
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from bench import report
from bench.matrix import ALL_MODES
from netns.up import lab_leftovers

pytestmark = [pytest.mark.netns, pytest.mark.timeout(900)]  # --quick on a loaded 2-core machine

PER_CELL = ("first_packet_rtt_s", "full_sync_s", "endpoint_change_s", "add_service_s", "conn_per_s",
            "throughput_bps", "rss_bytes", "rules", "cpu_s")
DIRECT = ("first_packet_rtt_s", "conn_per_s", "throughput_bps")


def _kpx(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "kpx", *args], capture_output=True, text=True, timeout=timeout)


def _name() -> str:
    return "q" + secrets.token_hex(4)


@pytest.fixture(scope="module")
def quick(tmp_path_factory: pytest.TempPathFactory) -> Any:
    out = tmp_path_factory.mktemp("bench")
    lab = _name()
    try:
        p = _kpx("bench", "--quick", "--out", str(out), "--lab", lab, timeout=600)
    finally:
        _kpx("down", "--lab", lab, timeout=120)  # only does something if the bench failed to
    assert p.returncode == 0, p.stderr[-2000:]
    return out, lab, p, json.loads((out / "results.json").read_text())


def test_quick_measures_every_runnable_mode_at_every_size(quick: Any) -> None:
    _, _, p, doc = quick
    recs = doc["records"]
    skipped = {s["cell"] for s in doc["skipped"]}
    measured = {r["cell"] for r in recs if r["cell"]}
    assert measured | skipped == set(ALL_MODES)  # nothing silently dropped
    assert measured >= {"iptables-legacy", "iptables-nft", "nftables"}
    sizes = doc["machine"]["bench_settings"]["sizes"]
    assert sizes == [1, 100]
    for cell in measured:
        for n in sizes:
            got = {r["metric"]: r for r in recs if r["cell"] == cell and r["services"] == n and r["mode"] != "direct"}
            missing = [m for m in PER_CELL if m not in got]
            assert not missing, f"{cell} x {n}: missing {missing}"
            rtt = got["first_packet_rtt_s"]
            assert rtt["n"] >= 300 and 0 < rtt["p01"] <= rtt["p50"] <= rtt["p90"] <= rtt["p99"]
            for m in ("full_sync_s", "endpoint_change_s", "add_service_s"):
                assert got[m]["n"] >= 1 and got[m]["value"] > 0, (cell, n, m, got[m])
            assert got["rules"]["value"] > 0 and got["rss_bytes"]["value"] > 10 << 20
            assert got["throughput_bps"]["value"] > 1e6 and got["conn_per_s"]["value"] > 10
            direct = {r["metric"]: r for r in recs if r["cell"] == cell and r["services"] == n and r["mode"] == "direct"}
            assert set(DIRECT) <= set(direct)
            assert direct["first_packet_rtt_s"]["n"] >= 300
    # rules grow with the Services (100 fillers of 3 endpoints each)
    for cell in measured - {"userspace"}:
        r1, r100 = (next(r["value"] for r in recs if r["cell"] == cell and r["services"] == n and r["metric"] == "rules")
                    for n in sizes)
        assert r100 > r1 + 100, (cell, r1, r100)
    assert "records" in p.stdout and "report.md" in p.stdout


def test_quick_names_what_it_skipped_and_records_the_machine(quick: Any) -> None:
    _, _, _, doc = quick
    for s in doc["skipped"]:
        assert s["reason"] and s["mode"] in ("userspace", "iptables", "nftables", "ipvs")
    if "ipvs" in {s["cell"] for s in doc["skipped"]}:  # this host: no IPVS in the kernel
        assert "--vm" in next(s["reason"] for s in doc["skipped"] if s["cell"] == "ipvs")
    m = doc["machine"]
    for k in ("kernel", "cpus", "iptables_legacy", "iptables_nft", "nft", "loadavg_start", "loadavg_end",
              "proxy_settings", "bench_settings"):
        assert m.get(k) not in (None, ""), k
    assert all(isinstance(r["services"], int) and r["metric"] for r in doc["records"])


def test_quick_report_is_complete_and_the_lab_is_gone(quick: Any) -> None:
    out, lab, _, doc = quick
    md = (out / "report.md").read_text()
    for section in ("## Machine and settings", "## Findings", "## First-packet connection latency", "## Control plane",
                    "## Connections per second and throughput", "## Published anchors"):
        assert section in md
    for png in report.PLOTS:
        assert (out / png).stat().st_size > 1000
    for cell in {r["cell"] for r in doc["records"] if r["cell"]}:
        assert f"**{cell}: first-packet latency" in md and f"**{cell}: control plane.**" in md
    for s in doc["skipped"]:
        assert s["reason"] in md
    assert lab_leftovers(lab) == []


def test_bad_input_is_one_line_before_any_work(tmp_path: Path) -> None:
    lab = _name()
    cases = [
        (["--modes", "ipvs"], "IPVS"),
        (["--modes", "ebpf"], "unknown mode"),
        (["--services", "1,100000"], "more than"),
        (["--services", "1,50000", "--endpoints", "1000"], "available"),
        (["--reuse"], "is not up"),
    ]
    for args, msg in cases:
        t0 = time.monotonic()
        p = _kpx("bench", "--out", str(tmp_path), "--lab", lab, *args)
        assert p.returncode == 1, (args, p.stderr)
        err = p.stderr.strip()
        assert len(err.splitlines()) == 1 and msg in err and "Traceback" not in err, (args, err)
        assert time.monotonic() - t0 < 30
        assert lab_leftovers(lab) == []
    assert not (tmp_path / "results.json").exists()


def test_an_existing_lab_in_the_way_is_refused(tmp_path: Path) -> None:
    from netns.lab import Lab

    lab = _name()
    n = secrets.randbelow(512)
    Lab.create(lab, nodes=1, subnet=f"198.{18 + n // 256}.{n % 256}.0/24")
    try:
        p = _kpx("bench", "--quick", "--out", str(tmp_path), "--lab", lab)
        assert p.returncode == 1 and f"lab {lab} is already up" in p.stderr and "--reuse" in p.stderr
        assert Lab.exists(lab)  # the user's lab is left alone
    finally:
        _kpx("down", "--lab", lab, timeout=120)


def test_ctrl_c_leaves_no_lab_behind(tmp_path: Path) -> None:
    from netns.lab import state_root

    lab = _name()
    proc = subprocess.Popen([sys.executable, "-m", "kpx", "bench", "--quick", "--out", str(tmp_path), "--lab", lab],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            # as from a terminal, even when this pytest runs in the background (SIGINT ignored)
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        deadline = time.monotonic() + 120
        while not (state_root() / lab / "up.json").exists():  # the lab is being built
            assert proc.poll() is None, proc.communicate()[1]
            assert time.monotonic() < deadline
            time.sleep(0.2)
        time.sleep(3)
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=180)
        assert proc.returncode == 130, err[-1000:]
        assert "interrupted" in err
        assert lab_leftovers(lab) == []
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        _kpx("down", "--lab", lab, timeout=120)
