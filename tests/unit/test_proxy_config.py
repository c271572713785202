"""proxy.config: kube-proxy flags, KubeProxyConfiguration files, precedence and one-line errors;
and the `kpx proxy` CLI's error paths (no apiserver needed)."""

from __future__ import annotations

import argparse
import dataclasses
import subprocess
import sys

import pytest

from kpx.errors import UserError
from proxy.config import add_flags, parse_bind, parse_duration, resolve

pytestmark = pytest.mark.unit


def opts(*argv: str):
    p = argparse.ArgumentParser()
    add_flags(p)
    return resolve(p.parse_args(list(argv)))


def test_defaults_are_upstreams():
    o = opts()
    assert o.mode == "iptables" and o.sync_period == 30 and o.min_sync_period == 1
    assert o.metrics_bind_address == "127.0.0.1:10249" and o.healthz_bind_address == "0.0.0.0:10256"
    assert o.masquerade_bit == 14 and o.localhost_nodeports and o.iptables_backend == "auto"


def test_flags():
    o = opts("--proxy-mode", "nftables", "--hostname-override", "node1", "--cluster-cidr", "10.244.0.0/16,fd00::/48",
             "--nodeport-addresses", "192.168.56.0/24", "--masquerade-all", "--iptables-sync-period", "1m0s",
             "--iptables-min-sync-period", "250ms", "--iptables-backend", "legacy")
    assert o.mode == "nftables" and o.hostname_override == "node1"
    assert o.cluster_cidr == "10.244.0.0/16"  # the IPv4 one
    assert o.nodeport_addresses == ("192.168.56.0/24",) and o.masquerade_all
    assert o.sync_period == 60 and o.min_sync_period == 0.25 and o.iptables_backend == "legacy"


@pytest.mark.parametrize("value,secs", [("30s", 30), ("1m0s", 60), ("2h22m", 8520), ("250ms", 0.25), ("5", 5)])
def test_durations(value, secs):
    assert parse_duration(value, "x") == pytest.approx(secs)


@pytest.mark.parametrize("argv,msg", [
    (["--proxy-mode", "bogus"], "unknown mode"),
    (["--iptables-sync-period", "3x"], "invalid duration"),
    (["--iptables-min-sync-period", "0s"], "greater than 0"),
    (["--iptables-sync-period", "1s", "--iptables-min-sync-period", "5s"], "must not exceed"),
    (["--cluster-cidr", "10.244.0.0/99"], "not a CIDR"),
    (["--metrics-bind-address", "localhost:x"], "IP:PORT"),
    (["--iptables-masquerade-bit", "40"], "0-31"),
    (["--bind-address", "nope"], "not an IP"),
])
def test_bad_values_are_one_line_user_errors(argv, msg):
    with pytest.raises(UserError, match=msg) as ei:
        opts(*argv)
    assert "\n" not in str(ei.value)


CONFIG = """\
apiVersion: kubeproxy.config.k8s.io/v1alpha1
kind: KubeProxyConfiguration
mode: nftables
clusterCIDR: 10.244.0.0/16
hostnameOverride: cfg-node
metricsBindAddress: 127.0.0.1:20249
clientConnection:
  kubeconfig: /etc/kube/proxy.conf
  qps: 5
iptables:
  syncPeriod: 10s
  minSyncPeriod: 2s
  masqueradeAll: true
nftables:
  syncPeriod: 20s
  minSyncPeriod: 3s
conntrack:
  maxPerCore: 32768
featureGates: {}
"""


def test_config_file_and_flag_precedence(tmp_path):
    f = tmp_path / "kp.yaml"
    f.write_text(CONFIG)
    o = opts("--config", str(f))
    assert o.mode == "nftables" and o.hostname_override == "cfg-node" and o.kubeconfig == "/etc/kube/proxy.conf"
    assert o.sync_period == 20 and o.min_sync_period == 3  # the nftables section, for nftables mode
    assert o.metrics_bind_address == "127.0.0.1:20249" and o.cluster_cidr == "10.244.0.0/16"
    o = opts("--config", str(f), "--proxy-mode", "iptables", "--hostname-override", "flag-node")
    assert o.mode == "iptables" and o.hostname_override == "flag-node"  # flags win
    assert o.sync_period == 10 and o.min_sync_period == 2 and o.masquerade_all


@pytest.mark.parametrize("text,msg", [
    ("apiVersion: v1\nkind: Pod\n", "need apiVersion kubeproxy.config.k8s.io/v1alpha1"),
    (CONFIG + "bogusField: 1\n", "unknown field 'bogusField'"),
    ("a: [1\n", "not valid YAML"),
    (CONFIG.replace("syncPeriod: 10s", "syncPeriod: soon"), "iptables.syncPeriod: invalid duration"),
])
def test_bad_config_files(tmp_path, text, msg):
    f = tmp_path / "kp.yaml"
    f.write_text(text)
    with pytest.raises(UserError, match=msg):
        opts("--config", str(f))


def test_missing_config_file(tmp_path):
    with pytest.raises(UserError, match="No such file"):
        opts("--config", str(tmp_path / "none.yaml"))


def test_parse_bind():
    assert parse_bind("127.0.0.1:10249", 10249, "x") == ("127.0.0.1", 10249)
    assert parse_bind("0.0.0.0", 10256, "x") == ("0.0.0.0", 10256)
    assert parse_bind(":9000", 1, "x") == ("0.0.0.0", 9000)
    assert parse_bind("", 1, "x") is None


def kpx(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "kpx", *args], capture_output=True, text=True, timeout=60)


@pytest.mark.parametrize("argv,msg", [
    (["proxy", "--proxy-mode", "bogus"], "unknown mode"),
    (["proxy", "--kubeconfig", "/nonexistent/kubeconfig"], "cannot read kubeconfig"),
    (["proxy", "--no-such-flag"], "unrecognized arguments"),
    (["proxy", "--iptables-backend", "xx"], "invalid choice"),
])
def test_cli_errors_are_one_line(argv, msg):
    r = kpx(*argv)
    assert r.returncode != 0 and msg in r.stderr
    assert r.stderr.count("\n") == 1 and "Traceback" not in r.stderr


def test_write_config_to_round_trips(tmp_path):
    out = tmp_path / "written.yaml"
    argv = ["--proxy-mode", "nftables", "--hostname-override", "n7", "--cluster-cidr", "10.244.0.0/16",
            "--iptables-sync-period", "1m30s", "--iptables-min-sync-period", "250ms", "--masquerade-all",
            "--nodeport-addresses", "192.168.56.0/24,primary", "--kubeconfig", "/etc/kpx/kc"]
    r = kpx("proxy", *argv, "--write-config-to", str(out))
    assert r.returncode == 0, r.stderr
    text = out.read_text()
    assert "kind: KubeProxyConfiguration" in text and "syncPeriod: 1m30s" in text and "minSyncPeriod: 250ms" in text
    from_file = opts("--config", str(out))
    from_flags = opts(*argv)
    assert from_file == dataclasses.replace(from_flags, config_file=str(out), bind_address="0.0.0.0")
