"""Compaction policy: history is kept >= retain_revisions AND >= retain_seconds."""

from __future__ import annotations

import pytest

from controlplane.store.compactor import CompactionPolicy
from controlplane.store.keys import prefix_end, prefix_end_bytes

pytestmark = pytest.mark.unit


def test_nothing_is_compacted_before_retain_seconds() -> None:
    p = CompactionPolicy(retain_revisions=1000, retain_seconds=300)
    p.observe(0, 5000)
    assert p.target(299, 9000, 0) == 0
    assert p.target(300, 9000, 0) == 5000  # the revision seen 300 s ago


def test_the_newest_retain_revisions_are_always_kept() -> None:
    p = CompactionPolicy(retain_revisions=1000, retain_seconds=300)
    p.observe(0, 5000)
    assert p.target(600, 5500, 0) == 4500  # 5 min passed but only 500 revisions since: keep 1000


def test_target_advances_with_samples_and_never_repeats() -> None:
    p = CompactionPolicy(retain_revisions=10, retain_seconds=60)
    for t, rev in [(0, 100), (60, 200), (120, 300), (180, 400)]:
        p.observe(t, rev)
    assert p.target(130, 400, 0) == 200  # newest sample at least 60 s old
    assert p.target(130, 400, 200) == 0  # already compacted there
    assert p.target(240, 400, 200) == 390  # capped by retain_revisions


def test_an_idle_store_is_not_compacted_twice() -> None:
    p = CompactionPolicy(retain_revisions=10, retain_seconds=60)
    p.observe(0, 50)
    p.observe(30, 50)
    assert p.target(61, 50, 0) == 40
    assert p.target(200, 50, 40) == 0


@pytest.mark.parametrize(
    ("prefix", "end"),
    [("/registry/services/", "/registry/services0"), ("a", "b"), ("", ""), ("x\U0010ffff", "y")],
)
def test_prefix_end(prefix: str, end: str) -> None:
    assert prefix_end(prefix) == end
    if prefix:
        assert prefix + "zzz" < end and not (prefix + "zzz").startswith(end)


def test_prefix_end_bytes() -> None:
    assert prefix_end_bytes(b"/a/") == b"/a0"
    assert prefix_end_bytes(b"a\xff") == b"b"
    assert prefix_end_bytes(b"") == b"\0"
