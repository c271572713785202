"""kpx bench's report: results.json -> report.md + PNGs, every figure computed from the records."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from bench import report
from bench.matrix import repeats_summary, summary

pytestmark = pytest.mark.unit


def _records() -> list[dict[str, Any]]:
    recs: list[dict[str, Any]] = []

    def add(cell: str, mode: str, backend: str, n: int, metric: str, s: dict[str, Any]) -> None:
        recs.append({"mode": mode, "backend": backend, "cell": cell, "services": n, "endpoints": 10,
                     "metric": metric, **s})

    for cell, mode, backend, slope in (("iptables-legacy", "iptables", "legacy", 20e-9), ("nftables", "nftables", "", 0)):
        for n in (1, 1000, 5000):
            base = 40e-6 + slope * n
            add(cell, mode, backend, n, "first_packet_rtt_s", summary([base + i * 1e-7 for i in range(100)]))
            add(cell, "direct", backend, n, "first_packet_rtt_s", summary([30e-6 + i * 1e-7 for i in range(100)]))
            add(cell, mode, backend, n, "full_sync_s", repeats_summary([0.01 * n / 100 + 0.01] * 5))
            add(cell, mode, backend, n, "endpoint_change_s", repeats_summary([0.2, 0.3, 0.25, 0.22, 0.21]))
            add(cell, mode, backend, n, "add_service_s", repeats_summary([0.3] * 5))
            add(cell, mode, backend, n, "conn_per_s", repeats_summary([5000.0] * 5))
            add(cell, "direct", backend, n, "conn_per_s", repeats_summary([6000.0] * 5))
            add(cell, mode, backend, n, "throughput_bps", repeats_summary([3e9] * 5))
            add(cell, mode, backend, n, "rules", {"value": 10 * n, "n": 1})
            add(cell, mode, backend, n, "cpu_s", {"value": 1.5, "n": 1})
            add(cell, mode, backend, n, "rss_bytes", {"value": 80e6, "n": 1})
    recs.append({"mode": "client", "backend": "", "cell": "", "services": 0, "endpoints": 0,
                 "metric": "tool_floor_s", **summary([20e-6] * 50)})
    return recs


def _write(tmp: Path, records: list[dict[str, Any]]) -> str:
    doc = {"machine": {"cpu": "test", "cpus": 2, "kernel": "6.1", "loadavg_start": [7.5, 7, 7],
                       "loadavg_end": [8.25, 7, 7]},
           "records": records,
           "skipped": [{"mode": "ipvs", "backend": "", "cell": "ipvs", "reason": "this kernel has no IPVS"}]}
    (tmp / "results.json").write_text(json.dumps(doc))
    report.write(tmp)
    return (tmp / "report.md").read_text()


def test_report_has_every_section_plot_and_skip_reason(tmp_path: Path) -> None:
    md = _write(tmp_path, _records())
    for section in ("## Machine and settings", "## Summary", "## Skipped or failed", "## Findings", "## First-packet connection latency",
                    "## Control plane", "## Connections per second and throughput", "## Published anchors"):
        assert section in md
    for png in report.PLOTS:
        assert (tmp_path / png).stat().st_size > 1000
        assert f"]({png})" in md
    assert "**ipvs**: this kernel has no IPVS" in md
    assert "load average was 7.5 at the start and 8.2 at the end" in md


def test_findings_follow_the_numbers(tmp_path: Path) -> None:
    md = _write(tmp_path, _records())
    # iptables: 40 us + 20 ns/Service -> p50 at 5000 = 140 us (+100); nftables flat at 45 us
    assert "**iptables-legacy: first-packet latency grows with the number of Services.** p50 is 45 µs at 1" in md
    assert "and 145 µs at 5000 (+100 µs)" in md
    assert "**nftables: first-packet latency stays flat" in md
    # ratio to the direct baseline (p50 35 us) in the table and the finding
    assert "a ratio of 4.15×" in md
    assert "| iptables-legacy | 5000 | 100 | 140 | 145 | 149 | 150 |" in md
    # the anchors table shows kpx's own p50 beside KEP-3866's
    assert "| iptables | 5000 | 0.016 | 0.047 | 0.118 | 0.154 | 0.145 |" in md
    assert "p50 20 µs" in md  # the client's own floor
    # the summary: p50 per size, ratio to direct, full sync per size, endpoint change at the largest
    assert "| iptables-legacy | 45 | 65 | 145 | 4.15× | 10 ms | 110 ms | 510 ms | 220 ms |" in md


def test_the_same_records_reversed_give_the_opposite_finding(tmp_path: Path) -> None:
    recs = _records()
    for r in recs:  # make nftables grow and iptables flat: the text must follow
        if r["metric"] == "first_packet_rtt_s" and r["mode"] in ("iptables", "nftables"):
            r["cell"] = {"iptables-legacy": "nftables", "nftables": "iptables-legacy"}[r["cell"]]
    md = _write(tmp_path, [r for r in recs if r["mode"] != "direct"])
    assert "**nftables: first-packet latency grows" in md
    assert "**iptables-legacy: first-packet latency stays flat" in md
