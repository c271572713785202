"""Store test fixtures.

`etcd_server`: a real etcd (Debian's etcd-server) on random free loopback ports with a temp data
dir, killed by PID at the end; session-scoped; a restart keeps ports and data dir.
`store_backend`: parametrized over sqlite and etcd, so the same test functions run against both.
"""

from __future__ import annotations

import asyncio
import functools
import json
import os
import shutil
import signal
import socket
import subprocess
import time
import urllib.request
import uuid
from collections.abc import Callable, Coroutine, Iterator
from pathlib import Path
from typing import Any

import pytest

from controlplane.store.base import Store
from controlplane.store.etcd import EtcdStore
from controlplane.store.sqlite import SQLiteStore

ETCD = shutil.which("etcd") or "/usr/bin/etcd"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class EtcdServer:
    def __init__(self, data_dir: Path) -> None:
        self.data_dir = data_dir
        self.client_port = free_port()
        self.peer_port = free_port()
        self.url = f"http://127.0.0.1:{self.client_port}"
        self.proc: subprocess.Popen[bytes] | None = None
        self.log_path = data_dir.parent / f"{data_dir.name}.log"

    def start(self, timeout: float = 20.0) -> None:
        peer = f"http://127.0.0.1:{self.peer_port}"
        log = open(self.log_path, "ab")  # noqa: SIM115 - owned by the child for its lifetime
        self.proc = subprocess.Popen(
            [
                ETCD,
                "--name",
                "kpx-test",
                "--data-dir",
                str(self.data_dir),
                "--listen-client-urls",
                self.url,
                "--advertise-client-urls",
                self.url,
                "--listen-peer-urls",
                peer,
                "--initial-advertise-peer-urls",
                peer,
                "--initial-cluster",
                f"kpx-test={peer}",
            ],
            stdout=log,
            stderr=log,
            stdin=subprocess.DEVNULL,
        )
        log.close()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"etcd exited with {self.proc.returncode}; see {self.log_path}")
            try:
                req = urllib.request.Request(
                    self.url + "/v3/kv/range", data=json.dumps({"key": "AA=="}).encode()
                )
                with urllib.request.urlopen(req, timeout=1) as r:
                    if r.status == 200:
                        return
            except OSError:
                pass
            time.sleep(0.05)
        self.stop()
        raise RuntimeError(f"etcd did not answer within {timeout}s; see {self.log_path}")

    def stop(self, sig: int = signal.SIGKILL) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.kill(self.proc.pid, sig)
            self.proc.wait(timeout=20)
        self.proc = None

    def restart(self, sig: int = signal.SIGKILL) -> None:
        self.stop(sig)
        self.start()


@pytest.fixture(scope="session")
def etcd_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EtcdServer]:
    server = EtcdServer(tmp_path_factory.mktemp("etcd") / "data")
    server.start()
    try:
        yield server
    finally:
        server.stop()


class StoreBackend:
    """Opens store clients on one backing store and restarts it; `prefix` is unique per test so
    tests sharing the session's etcd never see each other's keys."""

    def __init__(self, kind: str, tmp: Path, etcd: EtcdServer | None) -> None:
        self.kind = kind
        self.path = str(tmp / "kpx.db")
        self.etcd = etcd
        self.prefix = f"/registry/t{uuid.uuid4().hex[:10]}/"

    def new(self, **options: object) -> Store:
        options.setdefault("auto_compact", False)
        if self.kind == "sqlite":
            return SQLiteStore(self.path, **options)  # type: ignore[arg-type]
        assert self.etcd is not None
        return EtcdStore(self.etcd.url, **options)  # type: ignore[arg-type]

    async def open(self, **options: object) -> Store:
        store = self.new(**options)
        await store.start()
        return store

    def restart_backing(self) -> None:
        """etcd: SIGKILL the etcd process and start it again (sqlite: the file is the backing)."""
        if self.etcd is not None:
            self.etcd.restart(signal.SIGKILL)


@pytest.fixture(params=["sqlite", "etcd"])
def store_backend(request: pytest.FixtureRequest, tmp_path: Path) -> StoreBackend:
    etcd = request.getfixturevalue("etcd_server") if request.param == "etcd" else None
    return StoreBackend(request.param, tmp_path, etcd)


def async_test(fn: Callable[..., Coroutine[Any, Any, None]]) -> Callable[..., None]:
    """Run an async test body in a fresh event loop with a hard ceiling."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> None:
        asyncio.run(asyncio.wait_for(fn(*args, **kwargs), 120))

    return wrapper
