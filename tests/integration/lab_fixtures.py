"""Lab fixtures for everyone's integration tests (real netns, real veths, real packets).

`lab`: a session-scoped 2-node lab with a unique name and its own underlay subnet (from the
benchmark range 198.18.0.0/15, so parallel sessions and a user's 192.168.56.0/24 lab never put
the same address on two root links). Destroyed at the end of the session even on failure.

    def test_x(lab):
        ip = lab.add_pod(1, "default", "web-1", image="kpx/echo")   # echo pod on node1
        lab.delete_pod("default", "web-1")

Pod names must be unique across the session (the lab is shared): use `unique_pod(prefix)`.
"""

from __future__ import annotations

import itertools
import os
import random
import secrets
from collections.abc import Iterator

import pytest

from kpx.errors import UserError
from netns import ns
from netns.lab import Lab

_pod_counter = itertools.count(1)


def unique_lab_name(prefix: str = "t") -> str:
    """A lab name no other session uses: prefix + random hex, ≤ 10 chars."""
    return (prefix + secrets.token_hex(5))[:10]


def _random_subnet(rng: random.Random) -> str:
    n = rng.randrange(512)
    return f"198.{18 + n // 256}.{n % 256}.0/24"


def free_subnet() -> str:
    """A /24 of 198.18.0.0/15 that no root-netns link uses right now."""
    used = {
        a["local"].rsplit(".", 1)[0] for link in ns.ip_json(["-4", "addr", "show"]) for a in link["addr_info"]
    }
    rng = random.Random(secrets.randbits(32))
    while True:
        subnet = _random_subnet(rng)
        if subnet.rsplit(".", 1)[0] not in used:
            return subnet


def make_lab(nodes: int = 2, prefix: str = "t") -> Lab:
    """Create a lab with a unique name on a free /24 of 198.18.0.0/15 (retries on overlap)."""
    rng = random.Random(os.getpid() ^ secrets.randbits(32))
    last: UserError | None = None
    for _ in range(20):
        subnet = _random_subnet(rng)
        try:
            return Lab.create(unique_lab_name(prefix), nodes=nodes, subnet=subnet)
        except UserError as e:
            if "overlaps" not in str(e):
                raise
            last = e
    raise RuntimeError(f"no free test subnet in 198.18.0.0/15: {last}")


def unique_pod(prefix: str = "pod") -> str:
    return f"{prefix}-{os.getpid() % 10000}-{next(_pod_counter)}"


@pytest.fixture(scope="session")
def lab() -> Iterator[Lab]:
    created = make_lab(nodes=2)
    try:
        yield created
    finally:
        created.destroy()
