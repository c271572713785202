"""SIGKILL a process writing to the SQLite store at random moments: after reopening, every write it
acknowledged is there with its revision, and the revision never goes backwards."""

from __future__ import annotations

import asyncio
import os
import random
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from controlplane.store.sqlite import SQLiteStore
from tests.integration.store_fixtures import async_test

pytestmark = pytest.mark.integration

WRITER = r"""
import asyncio, sys
from controlplane.store.sqlite import SQLiteStore

async def main(path, tag):
    s = SQLiteStore(path, auto_compact=False)
    await s.start()
    print("ready", flush=True)

    async def client(c):
        i = 0
        while True:
            key = f"/registry/crash/{tag}-{c}-{i}"
            if i % 3 == 2:  # mix in updates and deletes of this client's own keys
                prev = f"/registry/crash/{tag}-{c}-{i - 1}"
                kv = await s.get(prev)
                if i % 2:
                    kv = await s.update(prev, b"updated", kv.mod_revision)
                    print("U", kv.mod_revision, prev, flush=True)
                else:
                    kv = await s.delete(prev, kv.mod_revision)
                    print("D", kv.mod_revision, prev, flush=True)
            kv = await s.create(key, b"created")
            print("C", kv.mod_revision, key, flush=True)
            i += 1

    await asyncio.gather(*(client(c) for c in range(8)))

asyncio.run(main(sys.argv[1], sys.argv[2]))
"""


def run_and_kill(path: Path, tag: str, acks_before_kill: int) -> list[tuple[str, int, str]]:
    root = Path(__file__).resolve().parents[2]
    proc = subprocess.Popen(
        [sys.executable, "-c", WRITER, str(path), tag],
        stdout=subprocess.PIPE,
        stdin=subprocess.DEVNULL,
        cwd=root,
        env={**os.environ, "PYTHONPATH": str(root)},
    )
    assert proc.stdout is not None
    try:
        assert proc.stdout.readline().strip() == b"ready"
        for _ in range(acks_before_kill):
            if not proc.stdout.readline():
                break
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)
    # everything printed before the kill was acknowledged (the pipe keeps what we did not read)
    rest = proc.stdout.read().decode().splitlines()
    proc.stdout.close()
    acks = []
    for line in rest:
        parts = line.split()
        if len(parts) == 3:
            acks.append((parts[0], int(parts[1]), parts[2]))
    return acks


def may_be_deleted_later(key: str) -> bool:
    j = int(key.rsplit("-", 1)[1]) + 1  # the writer deletes key j-1 at step j when j % 3 == 2, j even
    return j % 3 == 2 and j % 2 == 0


@async_test
async def test_acknowledged_writes_survive_sigkill(tmp_path: Path) -> None:
    path = tmp_path / "crash.db"
    expected: dict[str, tuple[int, bytes] | None] = {}
    last_rev = 0
    for it in range(8):
        acks = run_and_kill(path, f"i{it}", random.randint(20, 400))
        for op, rev, key in sorted(acks, key=lambda a: a[1]):
            expected[key] = None if op == "D" else (rev, b"created" if op == "C" else b"updated")
        s = SQLiteStore(str(path), auto_compact=False)
        await s.start()
        try:
            cur = await s.current_revision()
            assert cur >= last_rev and cur >= max((a[1] for a in acks), default=0)
            last_rev = cur
            for key, want in expected.items():
                kv = await s.get(key)
                if want is None:
                    assert kv is None, key
                elif kv is None:
                    # only an unacknowledged delete issued after this ack may have removed it
                    assert may_be_deleted_later(key), key
                else:
                    # a later unacknowledged write may have landed too; never an older state
                    assert kv is not None and kv.mod_revision >= want[0], key
                    if kv.mod_revision == want[0]:
                        assert kv.value == want[1]
        finally:
            await s.close()
        await asyncio.sleep(0)
