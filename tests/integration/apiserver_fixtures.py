"""apiserver test fixtures.

`apiserver`: ONE `kpx apiserver` (SQLite) for the whole session on a random free loopback port
with a temp data dir; attributes `.url`, `.kubeconfig`, `.data_dir`, `.token`, `.ca`, `.port`.
Tests sharing it must use their own namespaces / unique names.
`apiserver_factory`: start extra servers with custom flags (etcd, small history...); each is
stopped (SIGTERM, then SIGKILL, by PID) at the end of the test that made it.
"""

from __future__ import annotations

import os
import signal
import socket
import ssl
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

KPX = [sys.executable, "-m", "kpx"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class ApiServerProc:
    def __init__(self, data_dir: Path, *args: str, port: int | None = None) -> None:
        self.data_dir = data_dir
        self.port = port or free_port()
        self.args = list(args)
        self.url = f"https://127.0.0.1:{self.port}"
        self.kubeconfig = data_dir / "kubeconfig"
        self.ca = data_dir / "pki" / "ca.crt"
        self.log_path = data_dir.parent / f"{data_dir.name}-apiserver.log"
        self.proc: subprocess.Popen[bytes] | None = None
        self.token = ""

    def start(self, timeout: float = 30.0) -> ApiServerProc:
        log = open(self.log_path, "ab")  # noqa: SIM115 - owned by the child
        self.proc = subprocess.Popen(
            [*KPX, "apiserver", "--data-dir", str(self.data_dir), "--secure-port", str(self.port), *self.args],
            stdout=log, stderr=log, stdin=subprocess.DEVNULL,
        )
        log.close()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"kpx apiserver exited with {self.proc.returncode}: {self.log()[-2000:]}")
            if self.kubeconfig.exists():
                try:
                    if self.get("/readyz") == b"ok":
                        break
                except (OSError, urllib.error.URLError):
                    pass
            time.sleep(0.1)
        else:
            self.stop()
            raise RuntimeError(f"kpx apiserver not ready in {timeout}s: {self.log()[-2000:]}")
        tokens = (self.data_dir / "tokens.csv").read_text().split(",")
        self.token = tokens[0]
        return self

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    def ssl_context(self) -> ssl.SSLContext:
        return ssl.create_default_context(cafile=str(self.ca))

    def request(self, method: str, path: str, body: bytes | None = None,
                headers: dict[str, str] | None = None, timeout: float = 10.0) -> tuple[int, dict[str, str], bytes]:
        req = urllib.request.Request(self.url + path, data=body, method=method, headers=headers or {})
        try:
            with urllib.request.urlopen(req, context=self.ssl_context(), timeout=timeout) as r:
                return r.status, dict(r.headers), r.read()
        except urllib.error.HTTPError as e:
            return e.code, dict(e.headers), e.read()

    def get(self, path: str) -> bytes:
        code, _, body = self.request("GET", path)
        if code != 200:
            raise OSError(f"GET {path}: {code}")
        return body

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 15.0) -> int | None:
        p = self.proc
        if p is None:
            return None
        if p.poll() is None:
            os.kill(p.pid, sig)
            try:
                p.wait(timeout)
            except subprocess.TimeoutExpired:
                os.kill(p.pid, signal.SIGKILL)
                p.wait(5)
        self.proc = None
        return p.returncode

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid


@pytest.fixture(scope="session")
def apiserver(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ApiServerProc]:
    d = tmp_path_factory.mktemp("apiserver") / "data"
    srv = ApiServerProc(d).start()
    try:
        yield srv
    finally:
        srv.stop()


@pytest.fixture
def apiserver_factory(tmp_path: Path) -> Iterator[Any]:
    started: list[ApiServerProc] = []

    def make(*args: str, name: str = "", data_dir: Path | None = None, port: int | None = None) -> ApiServerProc:
        d = data_dir or tmp_path / (name or f"apiserver{len(started)}")
        srv = ApiServerProc(d, *args, port=port)
        started.append(srv)
        return srv.start()

    try:
        yield make
    finally:
        for s in started:
            s.stop()
