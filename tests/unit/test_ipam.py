"""IPAM leases on disk (host-local style): pure file logic, no root."""

from __future__ import annotations

from pathlib import Path

import pytest

from netns.ipam import Ipam, IpamExhausted

pytestmark = pytest.mark.unit


def test_allocate_skips_gateway_and_is_idempotent(tmp_path: Path) -> None:
    ipam = Ipam(tmp_path, "10.244.1.0/24")
    a = ipam.allocate("default/a")
    assert a == "10.244.1.2"  # .0 network, .1 cni0
    assert ipam.allocate("default/a") == a
    assert ipam.allocate("default/b") == "10.244.1.3"
    assert ipam.leases() == {"10.244.1.2": "default/a", "10.244.1.3": "default/b"}
    assert (tmp_path / "10.244.1.2").read_text() == "default/a"


def test_round_robin_never_reuses_a_leased_ip(tmp_path: Path) -> None:
    ipam = Ipam(tmp_path, "10.244.1.0/29")  # hosts .1-.6, .1 reserved -> 5 IPs
    ips = [ipam.allocate(f"ns/p{i}") for i in range(5)]
    assert ips == [f"10.244.1.{i}" for i in range(2, 7)]
    with pytest.raises(IpamExhausted):
        ipam.allocate("ns/p5")
    assert ipam.release("ns/p1") == "10.244.1.3"
    assert ipam.release("ns/p1") is None
    assert ipam.allocate("ns/new") == "10.244.1.3"  # the only free one
    ipam.release("ns/p3")
    ipam.release("ns/p0")
    # after .3 the walk continues upwards: .5 (p3's) before wrapping round to .2
    assert ipam.allocate("ns/x") == "10.244.1.5"
    assert ipam.allocate("ns/y") == "10.244.1.2"
    assert len(set(ipam.leases())) == 5


def test_two_allocators_share_the_directory(tmp_path: Path) -> None:
    """Leases are O_EXCL files: a second Ipam (e.g. a restarted agent) sees and respects them."""
    first = Ipam(tmp_path, "10.244.2.0/24")
    taken = {first.allocate(f"ns/p{i}") for i in range(10)}
    second = Ipam(tmp_path, "10.244.2.0/24")
    assert second.lookup("ns/p3") in taken
    fresh = {second.allocate(f"other/q{i}") for i in range(10)}
    assert not fresh & taken


def test_release_ip_checks_owner(tmp_path: Path) -> None:
    ipam = Ipam(tmp_path, "10.244.3.0/24")
    ip = ipam.allocate("ns/a")
    assert not ipam.release_ip(ip, "ns/b")
    assert ipam.release_ip(ip, "ns/a")
    assert ipam.leases() == {}
