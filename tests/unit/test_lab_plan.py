"""The lab's address plan and name rules (pure: Lab.plan creates nothing)."""

from __future__ import annotations

import pytest

from kpx.errors import UserError
from netns.images import UnknownImage, image_argv, normalize
from netns.lab import Lab, host_gw_routes

pytestmark = pytest.mark.unit


def test_default_plan_matches_the_design() -> None:
    lab = Lab.plan("lab", nodes=2, state_dir="/nonexistent")
    assert (lab.host_link, lab.host_ip, lab.ext_ip) == ("kpx0-lab", "192.168.56.1", "192.168.56.200")
    assert (lab.net_netns, lab.ext_netns) == ("kpx-lab-net", "kpx-lab-ext")
    n1, n2 = lab.nodes
    assert (n1.name, n1.netns, n1.ip, n1.pod_cidr, n1.bridge_ip) == (
        "node1", "kpx-lab-node1", "192.168.56.11", "10.244.1.0/24", "10.244.1.1"
    )  # fmt: skip
    assert (n2.ip, n2.pod_cidr) == ("192.168.56.12", "10.244.2.0/24")
    assert lab.pod_netns("default", "web-1") == "kpx-lab-default-web-1"
    assert host_gw_routes(lab.nodes) == {
        "node1": [("10.244.2.0/24", "192.168.56.12")],
        "node2": [("10.244.1.0/24", "192.168.56.11")],
    }


def test_custom_subnets_and_limits() -> None:
    lab = Lab.plan("t1", nodes=3, subnet="198.18.7.0/24", pod_cidr="10.100.0.0/16", state_dir="/x")
    assert [n.ip for n in lab.nodes] == ["198.18.7.11", "198.18.7.12", "198.18.7.13"]
    assert lab.nodes[2].pod_cidr == "10.100.3.0/24"
    assert len(Lab.plan("big", nodes=189, state_dir="/x").nodes) == 189
    with pytest.raises(UserError, match="at most 189"):
        Lab.plan("big", nodes=190, state_dir="/x")
    with pytest.raises(UserError, match="at most 3"):
        Lab.plan("small", nodes=4, pod_cidr="10.0.0.0/22", state_dir="/x")


@pytest.mark.parametrize("name", ["", "UPPER", "with-dash", "elevenchars", "a_b"])
def test_bad_lab_names(name: str) -> None:
    with pytest.raises(UserError, match="invalid"):
        Lab.plan(name, state_dir="/x")


@pytest.mark.parametrize(
    ("subnet", "pods", "msg"),
    [("nope", "10.244.0.0/16", "not an IPv4 CIDR"), ("10.0.0.0/25", "10.244.0.0/16", "too small"),
     ("10.0.0.0/24", "10.244.0.0/16x", "not an IPv4 CIDR")],
)  # fmt: skip
def test_bad_cidrs(subnet: str, pods: str, msg: str) -> None:
    with pytest.raises(UserError, match=msg):
        Lab.plan("x", subnet=subnet, pod_cidr=pods, state_dir="/x")


def test_images() -> None:
    assert normalize("kpx/echo:latest") == normalize("docker.io/kpx/echo") == "kpx/echo"
    assert image_argv("kpx/echo", ["--port", "9"])[-3:] == [image_argv("kpx/echo")[-1], "--port", "9"]
    with pytest.raises(UnknownImage, match="kpx/echo, kpx/http"):
        image_argv("busybox")
