"""kpx bench's pure logic: the matrix, the checks made before any work, percentiles, metrics parsing."""

from __future__ import annotations

import pytest

from bench.control import parse_metrics
from bench.lab import filler_ip, slice_body
from bench.matrix import Cell, check_capacity, parse_modes, parse_sizes, repeats_summary, summary
from kpx.errors import UserError

pytestmark = pytest.mark.unit


def test_iptables_means_both_backends_and_cells_carry_proxy_flags() -> None:
    cells = parse_modes("iptables,nftables")
    assert [c.key for c in cells] == ["iptables-legacy", "iptables-nft", "nftables"]
    assert cells[1] == Cell("iptables-nft", "iptables", "nft")
    assert cells[1].proxy_args == ["--proxy-mode", "iptables", "--iptables-backend", "nft"]
    assert cells[2].proxy_args == ["--proxy-mode", "nftables"]
    assert parse_modes("ipvs")[0].backend == ""


def test_unknown_mode_and_empty_list_are_one_line_errors() -> None:
    with pytest.raises(UserError, match="unknown mode 'ebpf'"):
        parse_modes("nftables,ebpf")
    with pytest.raises(UserError, match="at least one"):
        parse_modes(" , ")


def test_sizes_are_sorted_unique_and_validated() -> None:
    assert parse_sizes("5000,1,1000,1", 10) == [1, 1000, 5000]
    for bad in ("0,10", "ten", ""):
        with pytest.raises(UserError):
            parse_sizes(bad, 10)


def test_counts_the_machine_cannot_hold_fail_before_work() -> None:
    with pytest.raises(UserError, match="MiB available"):
        check_capacity(30000, 10, available=100 << 20)
    check_capacity(30000, 10, available=8 << 30)
    with pytest.raises(UserError, match="more than"):
        check_capacity(10**6, 10, available=1 << 50)
    with pytest.raises(UserError, match="--endpoints"):
        check_capacity(10, 0, available=1 << 40)


def test_summary_percentiles_nearest_rank() -> None:
    s = summary([float(i) for i in range(1, 101)])  # 1..100
    assert (s["n"], s["p01"], s["p50"], s["p90"], s["p99"]) == (100, 1.0, 50.0, 90.0, 99.0)
    assert s["min"] == 1.0 and s["max"] == 100.0
    assert summary([]) == {"n": 0}
    r = repeats_summary([3.0, 1.0, 2.0, 10.0, 2.5])
    assert r["value"] == 2.5 and r["min"] == 1.0 and r["max"] == 10.0 and r["n"] == 5


def test_parse_metrics_keeps_labels_and_skips_comments() -> None:
    text = ("# HELP x y\n# TYPE x histogram\n"
            'kubeproxy_network_programming_duration_seconds_count 3.0\n'
            'kubeproxy_sync_proxy_rules_iptables_total{table="nat"} 1234.0\n'
            "process_cpu_seconds_total 1.5e+01\n")
    m = parse_metrics(text)
    assert m["kubeproxy_network_programming_duration_seconds_count"] == 3.0
    assert m['kubeproxy_sync_proxy_rules_iptables_total{table="nat"}'] == 1234.0
    assert m["process_cpu_seconds_total"] == 15.0
    assert len(m) == 3


def test_filler_endpoints_are_distinct_addresses_outside_the_lab() -> None:
    ips = {filler_ip(i, k, 10) for i in range(300) for k in range(10)}
    assert len(ips) == 3000
    assert all(ip.startswith(("100.64.", "100.65.")) for ip in ips)
    body = slice_body("svc-00001-bench", "svc-00001", ["100.64.0.2"], trigger="2026-01-01T00:00:00.000001Z")
    assert body["metadata"]["labels"]["kubernetes.io/service-name"] == "svc-00001"
    assert body["metadata"]["annotations"]["endpoints.kubernetes.io/last-change-trigger-time"].endswith("Z")
