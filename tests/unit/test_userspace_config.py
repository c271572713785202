"""userspace mode's own settings: --udp-timeout / udpIdleTimeout and --proxy-port-range /
portRange, from flags and from a KubeProxyConfiguration file, and their validation."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest

from proxy.config import add_flags, resolve
from proxy.modes.base import ModeUnavailable
from proxy.modes.userspace import parse_port_range
from proxy.userspace.portals import DEFAULT_PORT_RANGE

pytestmark = pytest.mark.unit


def opts(*argv: str):  # type: ignore[no-untyped-def]
    p = argparse.ArgumentParser()
    add_flags(p)
    return resolve(p.parse_args(list(argv)))


def test_defaults_are_upstreams() -> None:
    o = opts("--proxy-mode", "userspace")
    assert o.udp_idle_timeout == 0.25 and o.proxy_port_range == ""
    assert parse_port_range(o.proxy_port_range) == DEFAULT_PORT_RANGE


def test_flags_and_config_file(tmp_path: Path) -> None:
    o = opts("--proxy-mode", "userspace", "--udp-timeout", "1s500ms", "--proxy-port-range", "30000+10")
    assert o.udp_idle_timeout == 1.5 and parse_port_range(o.proxy_port_range) == (30000, 30009)
    cfg = tmp_path / "c.yaml"
    cfg.write_text("apiVersion: kubeproxy.config.k8s.io/v1alpha1\nkind: KubeProxyConfiguration\n"
                   "mode: userspace\nudpIdleTimeout: 2s\nportRange: 40000-40100\n")
    o = opts("--config", str(cfg))
    assert o.mode == "userspace" and o.udp_idle_timeout == 2.0
    assert parse_port_range(o.proxy_port_range) == (40000, 40100)
    assert opts("--config", str(cfg), "--udp-timeout", "100ms").udp_idle_timeout == 0.1  # flags win


@pytest.mark.parametrize("bad", ["abc", "30000", "2-1", "0-10", "65000+1000"])
def test_bad_port_range_is_one_line(bad: str) -> None:
    with pytest.raises(ModeUnavailable, match="--proxy-port-range"):
        parse_port_range(bad)
