"""Node IPAM: block allocation, rebuild, release, exhaustion, dual-stack."""

from __future__ import annotations

import pytest

from controlplane.controllers.nodeipam import CIDRSet, NodeAllocator

pytestmark = pytest.mark.unit


def test_blocks_in_order_and_no_reuse_right_after_release() -> None:
    a = NodeAllocator(["10.244.0.0/16"])
    assert a.allocate_node("n1") == ["10.244.0.0/24"]
    assert a.allocate_node("n2") == ["10.244.1.0/24"]
    a.release_node("n1", ["10.244.0.0/24"])
    assert a.allocate_node("n3") == ["10.244.2.0/24"]  # continues after the last handed out


def test_rebuild_keeps_existing_assignments() -> None:
    a = NodeAllocator(["10.244.0.0/16"])
    assert a.occupy_node("n1", ["10.244.0.0/24"]) == []
    assert a.occupy_node("n2", ["10.244.1.0/24"]) == []
    assert a.occupy_node("n3", ["10.244.1.0/24"]) == ["10.244.1.0/24"]  # clash reported, not taken
    got = a.allocate_node("n4")
    assert got is not None and got[0] not in ("10.244.0.0/24", "10.244.1.0/24")
    # a CIDR outside the cluster range is ignored, not fatal
    assert a.occupy_node("n5", ["192.168.0.0/24"]) == []


def test_release_only_by_owner() -> None:
    a = NodeAllocator(["10.244.0.0/23"])
    assert a.allocate_node("n1") == ["10.244.0.0/24"]
    a.release_node("other", ["10.244.0.0/24"])
    assert a.allocate_node("n2") == ["10.244.1.0/24"]
    assert a.allocate_node("n3") is None  # full
    a.release_node("n1", ["10.244.0.0/24"])
    assert a.allocate_node("n3") == ["10.244.0.0/24"]


def test_dual_stack_all_or_nothing() -> None:
    a = NodeAllocator(["10.244.0.0/24", "fd00:10:244::/63"])
    assert a.allocate_node("n1") == ["10.244.0.0/24", "fd00:10:244::/64"]
    assert a.allocate_node("n2") is None  # v4 set full: nothing taken from v6 either
    assert len(a.sets[1].used) == 1
    with pytest.raises(ValueError):
        NodeAllocator(["10.244.0.0/16", "10.245.0.0/16"])


def test_cidr_set_validation() -> None:
    with pytest.raises(ValueError):
        CIDRSet("10.244.0.0/16", 8)
    s = CIDRSet("10.244.0.0/16", 24)
    assert s.size == 256 and s.index_of("10.244.7.0/24") == 7 and s.index_of("10.244.7.0/25") is None
